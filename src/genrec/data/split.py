"""Train / validation / test splits over a SequenceStore, as row ranges (no data is copied).

Every split is described by, per user:
- ``train_end[u]``: training uses rows ``offsets[u] : train_end[u]`` and nothing after them;
- evaluation examples ``(user, target_row)``: the model reads rows ``offsets[u] : target_row`` and
  must predict the item at ``target_row``. The history never contains the target or anything later.

``leave_one_out``: test target = last event, validation target = second-to-last, training = the rest.
Users with fewer than 3 events train on all their events and are not evaluated.

``temporal``: two global cut-off times at the quantiles ``1 - valid - test`` and ``1 - test`` of all
timestamps. Training uses events before the first cut-off. A user's validation target is their first
event in the validation window, the test target their first event in the test window; each reads
every earlier event of the user as history.

``Split.train_on_valid()``: the same split with the validation events moved into training (leave-one-out:
everything but the last event; temporal: everything before the test cut-off) and no validation examples;
the test examples are unchanged. A refit trains on it for the number of epochs chosen on the ordinary
split's validation, which is how the published ML-1M numbers use the data (no test event is ever trained
on).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genrec.data.store import DatasetError, SequenceStore


@dataclass
class EvalExamples:
    users: np.ndarray  # (E,) dense user ids
    target_rows: np.ndarray  # (E,) row of the target event; history = offsets[u] : target_row

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class Split:
    name: str
    train_end: np.ndarray  # (U,) exclusive end row of each user's training events
    valid: EvalExamples
    test: EvalExamples
    description: str
    train_end_with_valid: np.ndarray | None = None  # (U,) train_end once the validation events are trained on

    def train_on_valid(self) -> "Split":
        """This split with the validation events trained on and no validation examples (for refits)."""
        if self.train_end_with_valid is None:
            raise ValueError(f"the {self.name} split does not say where training ends with its validation events")
        no_users = np.zeros(0, dtype=self.valid.users.dtype)
        return Split(self.name, self.train_end_with_valid, EvalExamples(no_users, no_users.copy()), self.test,
                     self.description + "; validation events trained on (refit)")

    def examples(self, which: str) -> EvalExamples:
        if which not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {which!r}")
        return self.valid if which == "valid" else self.test


def leave_one_out(store: SequenceStore) -> Split:
    starts, ends = store.offsets[:-1], store.offsets[1:]
    n = ends - starts
    evaluated = n >= 3
    users = np.flatnonzero(evaluated)
    train_end = np.where(evaluated, ends - 2, ends)
    return Split(
        name="leave_one_out",
        train_end=train_end,
        valid=EvalExamples(users, ends[users] - 2),
        test=EvalExamples(users, ends[users] - 1),
        description="leave-one-out (last event = test, second-to-last = validation)",
        train_end_with_valid=np.where(evaluated, ends - 1, ends),
    )


def temporal(store: SequenceStore, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> Split:
    if store.timestamps is None:
        raise DatasetError("the temporal split needs timestamps; this dataset has none (use leave_one_out)")
    if not (0 < valid_fraction and 0 < test_fraction and valid_fraction + test_fraction < 1):
        raise DatasetError("temporal split fractions must be positive and sum to less than 1")
    ts = np.asarray(store.timestamps)
    t_valid, t_test = np.quantile(ts, [1 - valid_fraction - test_fraction, 1 - test_fraction])
    starts, ends = store.offsets[:-1], store.offsets[1:]
    user_of_row = np.repeat(np.arange(store.num_users), np.diff(store.offsets))

    def first_row_at_or_after(t: float) -> np.ndarray:
        """Per user, the first row with timestamp >= t (rows are time-sorted within a user)."""
        after = ts >= t
        # number of rows before the cut-off per user = start + count of rows < t
        before = np.bincount(user_of_row[~after], minlength=store.num_users)
        return starts + before

    first_valid = first_row_at_or_after(t_valid)
    first_test = first_row_at_or_after(t_test)

    def examples(rows: np.ndarray, window_end: np.ndarray) -> EvalExamples:
        ok = (rows < window_end) & (rows > starts)  # an event in the window, with some history before it
        users = np.flatnonzero(ok)
        return EvalExamples(users, rows[users])

    return Split(
        name="temporal",
        train_end=first_valid,
        valid=examples(first_valid, first_test),
        test=examples(first_test, ends),
        description=(f"global temporal (train < t={int(t_valid)}, valid = first event in [t_valid, "
                     f"t_test={int(t_test)}), test = first event >= t_test)"),
        train_end_with_valid=first_test,
    )


def make_split(store: SequenceStore, name: str, valid_fraction: float = 0.1, test_fraction: float = 0.1,
               max_eval_users: int = 0, seed: int = 0) -> Split:
    if name == "leave_one_out":
        split = leave_one_out(store)
    elif name == "temporal":
        split = temporal(store, valid_fraction, test_fraction)
    else:
        raise DatasetError(f"unknown split {name!r}; use leave_one_out or temporal")
    return sample_eval_users(split, max_eval_users, seed) if max_eval_users else split


def sample_eval_users(split: Split, max_users: int, seed: int = 0) -> Split:
    """Keep the evaluation examples of at most ``max_users`` users drawn at random (the same users in
    validation and test where both have one). Training is unchanged; the description says so."""
    users = np.union1d(split.valid.users, split.test.users)
    if len(users) <= max_users:
        return split
    keep = np.sort(np.random.default_rng([seed, 7]).choice(users, size=max_users, replace=False))

    def subset(ex: EvalExamples) -> EvalExamples:
        sel = np.isin(ex.users, keep)
        return EvalExamples(ex.users[sel], ex.target_rows[sel])

    return Split(split.name, split.train_end, subset(split.valid), subset(split.test),
                 f"{split.description}, evaluated on a random sample of {max_users:,} of {len(users):,} users "
                 f"(seed {seed})", split.train_end_with_valid)


def train_item_counts(store: SequenceStore, train_end: np.ndarray, chunk_events: int = 1 << 23) -> np.ndarray:
    """(I + 1,) number of training events per item (index 0 = padding, always 0).

    Reads the store in chunks of whole users (about ``chunk_events`` events each), so memory stays
    bounded on a memory-mapped store of any size.
    """
    counts = np.zeros(store.num_items + 1, dtype=np.int64)
    offsets = store.offsets
    u0 = 0
    while u0 < store.num_users:
        u1 = max(u0 + 1, int(np.searchsorted(offsets, offsets[u0] + chunk_events, side="right")) - 1)
        u1 = min(u1, store.num_users)
        lo, hi = offsets[u0], offsets[u1]
        user_of_row = np.repeat(np.arange(u0, u1), np.diff(offsets[u0:u1 + 1]))
        keep = np.arange(lo, hi) < train_end[user_of_row]
        counts += np.bincount(np.asarray(store.items[lo:hi])[keep], minlength=len(counts))
        u0 = u1
    return counts
