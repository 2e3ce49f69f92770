"""Batches: collate row ranges of a SequenceStore into right-padded tensors. Vectorised gathers.

A :class:`Batch` is the only thing models see. Histories are right-padded with item 0 and carry
explicit lengths; the batch is trimmed to its longest history (never padded to ``max_len`` for
nothing). Positions are aligned left: position 0 is the oldest kept event.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from genrec.data.split import EvalExamples, Split
from genrec.data.store import SequenceStore


@dataclass
class Batch:
    items: torch.Tensor  # (B, L) int64 item ids, 0 = padding
    lengths: torch.Tensor  # (B,) int64 number of real events per row
    timestamps: torch.Tensor | None = None  # (B, L) int64 event times (unix s)
    query_time: torch.Tensor | None = None  # (B, L) int64 time of the event predicted at each position
    actions: torch.Tensor | None = None  # (B, L) int64 action ids, 0 = padding
    targets: torch.Tensor | None = None  # (B, L) training: next item at each position, 0 = none
    target: torch.Tensor | None = None  # (B,) evaluation: the single held-out item
    users: torch.Tensor | None = None  # (B,) dense user ids
    cloze: bool = False  # items carry [mask] tokens and targets sit at the masked positions (BERT4Rec)

    def to(self, device: torch.device | str) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=True)
                                for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})

    @property
    def padding_mask(self) -> torch.Tensor:
        """(B, L) bool, True at real events."""
        L = self.items.shape[1]
        return torch.arange(L, device=self.items.device)[None, :] < self.lengths[:, None]


def gather_rows(column: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """(B, width) array of ``column[starts[b] : starts[b] + lengths[b]]`` right-padded with 0."""
    pos = np.arange(width)[None, :]
    valid = pos < lengths[:, None]
    idx = np.where(valid, starts[:, None] + pos, 0)
    out = np.asarray(column[idx.ravel()]).reshape(idx.shape).astype(np.int64)
    out[~valid] = 0
    return out


def training_batch(store: SequenceStore, users: np.ndarray, train_end: np.ndarray, max_len: int) -> Batch:
    """Next-item training: inputs = the last ``max_len`` training events but one, targets shifted by one."""
    starts = np.maximum(store.offsets[users], train_end[users] - (max_len + 1))
    n = train_end[users] - starts  # events in the window (inputs + 1)
    lengths = np.maximum(n - 1, 0)
    width = max(1, int(lengths.max())) if len(lengths) else 1
    items = gather_rows(store.items, starts, lengths, width)
    targets = gather_rows(store.items, starts + 1, lengths, width)
    ts = qt = act = None
    if store.timestamps is not None:
        ts = torch.from_numpy(gather_rows(store.timestamps, starts, lengths, width))
        qt = torch.from_numpy(gather_rows(store.timestamps, starts + 1, lengths, width))
    if store.actions is not None:
        act = torch.from_numpy(gather_rows(store.actions, starts, lengths, width))
    return Batch(items=torch.from_numpy(items), lengths=torch.from_numpy(lengths.astype(np.int64)),
                 timestamps=ts, query_time=qt, actions=act, targets=torch.from_numpy(targets),
                 users=torch.from_numpy(users.astype(np.int64)))


def next_event_times(ts: np.ndarray, lengths: np.ndarray, last: np.ndarray) -> np.ndarray:
    """(B, L) time of the event each position predicts: event i + 1 inside the history, ``last[b]`` (the
    target's time, or the time to recommend for) at the last real position, 0 on padding."""
    qt = np.zeros_like(ts)
    qt[:, :-1] = ts[:, 1:]
    qt[np.arange(len(ts)), lengths - 1] = last
    qt[np.arange(ts.shape[1])[None, :] >= lengths[:, None]] = 0
    return qt


def eval_batch(store: SequenceStore, users: np.ndarray, target_rows: np.ndarray, max_len: int) -> Batch:
    """History = the last ``max_len`` events before the target; query time = the target's timestamp."""
    starts = np.maximum(store.offsets[users], target_rows - max_len)
    lengths = target_rows - starts
    width = max(1, int(lengths.max()))
    items = gather_rows(store.items, starts, lengths, width)
    ts = qt = act = None
    if store.timestamps is not None:
        ts_np = gather_rows(store.timestamps, starts, lengths, width)
        qt_np = next_event_times(ts_np, lengths, np.asarray(store.timestamps[target_rows]))
        ts, qt = torch.from_numpy(ts_np), torch.from_numpy(qt_np)
    if store.actions is not None:
        act = torch.from_numpy(gather_rows(store.actions, starts, lengths, width))
    return Batch(items=torch.from_numpy(items), lengths=torch.from_numpy(lengths.astype(np.int64)),
                 timestamps=ts, query_time=qt, actions=act,
                 target=torch.from_numpy(np.asarray(store.items[target_rows]).astype(np.int64)),
                 users=torch.from_numpy(users.astype(np.int64)))


class TrainLoader:
    """Iterates training batches over users with at least one training target, shuffled per epoch.

    With ``length_window = W > 0`` (length-aware batching), the shuffled users are cut into windows of
    W batches, each window is sorted by history length and cut into batches, and the batches are
    shuffled again: rows of a batch have similar lengths, so trimmed batches carry little padding,
    while every epoch still visits every user once in a random order of batches.

    Inside a batch the rows are ordered longest first, so the models' jagged attention needs no row
    permutation. The order depends only on (seed, epoch), so resuming at an epoch boundary replays
    exactly.
    """

    def __init__(self, store: SequenceStore, split: Split, batch_size: int, max_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, length_window: int = 0):
        self.store, self.split = store, split
        self.batch_size, self.max_len, self.seed = batch_size, max_len, seed
        n_train = split.train_end - store.offsets[:-1]
        self.users = np.flatnonzero(n_train >= 2)
        self.lengths = np.minimum(n_train[self.users] - 1, max_len)  # training positions per user
        self.rank, self.world_size = rank, world_size
        self.length_window = length_window

    def __len__(self) -> int:
        return (len(self.users) + self.batch_size - 1) // self.batch_size

    def num_tokens(self) -> int:
        """Training targets in one epoch (after max_len truncation)."""
        return int(self.lengths.sum())

    def batches(self, epoch: int) -> list[np.ndarray]:
        """The user ids of each batch of ``epoch``, in training order.

        ``batch_size`` is the global batch, its rows longest first; with ``world_size > 1`` each rank
        gets every ``world_size``-th row of it (its own rows stay longest first and the ranks' shares of
        tokens stay balanced), so all ranks together see exactly the single-process batches.
        """
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.users))
        B = self.batch_size
        if self.length_window > 0:
            window = np.arange(len(perm)) // (self.length_window * B)
            perm = perm[np.lexsort((self.lengths[perm], window))]  # sort by length inside each window
            cuts = [perm[s:s + B] for s in range(0, len(perm), B)]
            cuts = [cuts[i] for i in rng.permutation(len(cuts))]
        else:
            cuts = [perm[s:s + B] for s in range(0, len(perm), B)]
        # rows longest first: jagged attention then needs no row permutation (the loss is a mean over positions)
        cuts = [c[np.argsort(-self.lengths[c], kind="stable")] for c in cuts]
        if self.world_size > 1:  # every world_size-th row: the ranks get equal shares of long and short rows
            cuts = [c[self.rank::self.world_size] for c in cuts]
        return [self.users[c] for c in cuts]

    def epoch(self, epoch: int):
        for users in self.batches(epoch):
            yield training_batch(self.store, users, self.split.train_end, self.max_len)


def eval_batches(store: SequenceStore, examples: EvalExamples, batch_size: int, max_len: int):
    for s in range(0, len(examples), batch_size):
        yield eval_batch(store, examples.users[s:s + batch_size], examples.target_rows[s:s + batch_size], max_len)


def prefetch(iterable, depth: int = 2):
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead (numpy gathers release the GIL).

    Exceptions raised by the producer are re-raised in the consumer. When the consumer stops early
    (``break``, ``close``), the producer is told to stop, the queue is drained and the thread joined.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message) -> bool:
        while not stop.is_set():
            try:
                q.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterable:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer
            put(("error", e))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                break
        thread.join(timeout=5)
