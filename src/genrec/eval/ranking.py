"""Full-ranking evaluation: every held-out target is ranked against all items, in bounded memory.

For each evaluation example the model reads the history (the last ``max_len`` events before the
target) and produces one query vector. Items are scored in chunks of ``item_chunk``; the rank of the
target is the number of other items that score higher **or equal** (ties count against the target, so
a collapsed model that scores everything alike ranks last, never first), and a non-finite target score
ranks last. With ``exclude_history`` (default) the items of the user's whole history (not only the last
``max_len``; the HSTU reference excludes only those) are removed from the ranking, except the target
itself. The padding item 0 is never ranked. Sampled-negative metrics are not offered here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from genrec.data.batches import Batch, eval_batch
from genrec.data.split import EvalExamples, train_item_counts
from genrec.data.store import SequenceStore
from genrec.eval.metrics import ranking_metrics
from genrec.models import next_item_queries
from genrec.models.scoring import Scorer, scores_against


@dataclass
class Report:
    metrics: dict[str, float]
    protocol: str
    split: str
    num_users: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"split": self.split, "num_users": self.num_users, "protocol": self.protocol,
                "metrics": self.metrics, **self.extra}

    def table(self, title: str | None = None) -> str:
        keys = list(self.metrics)
        head = f"{title or self.split}  ({self.num_users:,} users)"
        names = "  ".join(f"{k:>9}" for k in keys)
        vals = "  ".join(f"{self.metrics[k]:9.4f}" for k in keys)
        return f"{head}\n  {names}\n  {vals}\nprotocol: {self.protocol}"


def describe_protocol(split_description: str, which: str, num_items: int, exclude_history: bool,
                      max_len: int) -> str:
    excl = "user's history excluded (target kept)" if exclude_history else "history not excluded"
    return (f"{which} targets of {split_description}; full ranking over all {num_items:,} items; {excl}; "
            f"model reads the last {max_len} events")


def history_pairs(store: SequenceStore, users: np.ndarray, target_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row-in-batch, item) for every event of each user's full history before the target."""
    starts = store.offsets[users]
    n = target_rows - starts
    b = np.repeat(np.arange(len(users)), n)
    within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    return b, np.asarray(store.items[np.repeat(starts, n) + within]).astype(np.int64)


@torch.no_grad()
def rank_targets(query_fn, item_table: torch.Tensor, store: SequenceStore, examples: EvalExamples,
                 max_len: int, batch_size: int = 512, item_chunk: int = 65536, exclude_history: bool = True,
                 device: torch.device | str = "cpu", progress: bool = False) -> np.ndarray:
    """0-based rank of each example's target among all items. ``query_fn(batch) -> (B, D)``."""
    from tqdm.auto import tqdm

    n_items = item_table.shape[0]  # includes padding row 0
    ranks = np.empty(len(examples), dtype=np.int64)
    # examples sorted by history length, longest first: batches of similar lengths carry little padding
    # (and HSTU's jagged attention needs no row permutation)
    history = np.minimum(examples.target_rows - store.offsets[examples.users], max_len)
    order = np.argsort(-history, kind="stable")
    starts = range(0, len(examples), batch_size)
    for s in tqdm(starts, desc="evaluate", disable=not progress, leave=False):
        idx = order[s:s + batch_size]
        users, rows = examples.users[idx], examples.target_rows[idx]
        batch = eval_batch(store, users, rows, max_len).to(device)
        q = query_fn(batch)  # (B, D)
        target = batch.target  # (B,)
        target_score = (q * item_table[target]).sum(-1)  # (B,)
        if exclude_history:
            hb, hi = history_pairs(store, users, rows)
            hb, hi = torch.from_numpy(hb).to(device), torch.from_numpy(hi).to(device)
        count = torch.zeros(len(users), dtype=torch.long, device=device)
        for c0 in range(0, n_items, item_chunk):
            c1 = min(n_items, c0 + item_chunk)
            scores = scores_against(q, item_table[c0:c1])  # (B, C)
            if c0 == 0:
                scores[:, 0] = -torch.inf  # padding
            if exclude_history:
                sel = (hi >= c0) & (hi < c1)
                scores[hb[sel], hi[sel] - c0] = -torch.inf
            in_chunk = (target >= c0) & (target < c1)
            scores[in_chunk.nonzero().squeeze(1), target[in_chunk] - c0] = -torch.inf  # the target itself
            beats = (scores >= target_score[:, None]) | scores.isnan()  # excluded items are -inf: never counted
            count += beats.sum(1)
        count = torch.where(torch.isfinite(target_score), count, n_items - 1)
        ranks[idx] = count.cpu().numpy()
    return ranks


def last_hidden(model: torch.nn.Module, scorer: Scorer):
    """query_fn for a sequence model: the scorer-normalised hidden state at each row's last event."""

    def query(batch: Batch) -> torch.Tensor:
        return scorer.queries(next_item_queries(model, batch))

    return query


def evaluate_model(model: torch.nn.Module, scorer: Scorer, store: SequenceStore, examples: EvalExamples,
                   which: str, split_description: str, max_len: int, ks: list[int], batch_size: int = 512,
                   item_chunk: int = 65536, exclude_history: bool = True, device="cpu",
                   progress: bool = False) -> Report:
    was_training = model.training
    model.eval()
    try:
        table = scorer.items(model.item_vectors())
        ranks = rank_targets(last_hidden(model, scorer), table, store, examples, max_len, batch_size,
                             item_chunk, exclude_history, device, progress)
    finally:
        model.train(was_training)
    return Report(ranking_metrics(ranks, ks),
                  describe_protocol(split_description, which, store.num_items, exclude_history, max_len),
                  which, len(examples))


def popularity_table(store: SequenceStore, train_end: np.ndarray) -> torch.Tensor:
    """(I + 1, 1) scores = training-event counts, ties broken towards lower item ids (unique scores)."""
    counts = train_item_counts(store, train_end)
    order = np.lexsort((-np.arange(len(counts)), counts))  # ascending count, then descending id
    score = np.empty(len(counts), dtype=np.float32)
    score[order] = np.arange(len(counts), dtype=np.float32)
    return torch.from_numpy(score)[:, None]


def evaluate_popularity(store: SequenceStore, train_end: np.ndarray, examples: EvalExamples, which: str,
                        split_description: str, max_len: int, ks: list[int],
                        exclude_history: bool = True) -> Report:
    table = popularity_table(store, train_end)
    ranks = rank_targets(lambda b: torch.ones(len(b.lengths), 1), table, store, examples, max_len,
                         exclude_history=exclude_history)
    return Report(ranking_metrics(ranks, ks),
                  describe_protocol(split_description, which, store.num_items, exclude_history, max_len),
                  which, len(examples), extra={"model": "popularity"})
