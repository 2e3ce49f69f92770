"""Recommender: a trained run directory -> top-K raw item ids for raw histories.

    rec = Recommender.load("runs/hstu")
    result = rec.recommend([["1193", "661", "914"]], k=10)
    result[0].items, result[0].scores, result[0].unknown

Histories are lists of raw item ids (as in the input logs), oldest first, optionally with timestamps
(unix seconds). Models with a time bias (HSTU ``relative_bias = "position_time"``) were trained to
predict an event at a known time: pass ``timestamps`` and the time to recommend for, ``query_time``
(default: now); without timestamps such a model runs with its position bias only (a warning says so).
Unknown ids are dropped and counted. An empty history (or one made only of unknown ids) falls back to
the most popular training items (``fallback=True``, scores = training counts). Items in the history are
excluded from the results unless ``exclude_seen=False``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genrec.config import config_from_dict
from genrec.data.batches import Batch, next_event_times
from genrec.data.vocab import Vocab
from genrec.models import build_model, next_item_queries
from genrec.models.scoring import Scorer
from genrec.train.checkpoint import load_checkpoint


@dataclass
class Recommendation:
    items: list  # raw item ids, best first
    scores: list[float]
    unknown: int = 0  # history items that were not in the vocabulary (dropped)
    fallback: bool = False  # True when the popularity fallback was used
    unknown_candidates: int = 0  # candidate ids that were not in the vocabulary (dropped)


class Recommender:
    def __init__(self, model: torch.nn.Module, scorer: Scorer, vocab: Vocab, max_len: int,
                 item_counts: torch.Tensor | None = None, config: dict | None = None):
        self.model, self.scorer, self.vocab, self.max_len = model.eval(), scorer, vocab, max_len
        self.config = config or {}
        self.item_counts = item_counts
        # optional callable (items, lengths[, timestamps, query_time]) -> queries for batches of one history:
        # an exported and compiled UserEncoder (genrec.infer.export.compiled_encoder)
        self.single_encoder = None
        with torch.no_grad():
            self.item_table = scorer.items(model.item_vectors()).detach()  # (I + 1, D)

    @classmethod
    def load(cls, run_dir: str | Path, checkpoint: str = "best.pt", device: str = "cpu") -> "Recommender":
        path = Path(run_dir) / checkpoint
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run_dir} a finished `genrec train` run?")
        ckpt = load_checkpoint(path, map_location=device)
        cfg = config_from_dict(ckpt["config"])
        vocab = Vocab.from_state(ckpt["item_vocab"])
        model = build_model(cfg.model, len(vocab))
        model.load_state_dict(ckpt["model"])
        return cls(model.to(device), Scorer(l2_norm=cfg.loss.l2_norm), vocab, cfg.data.max_len,
                   ckpt.get("item_counts"), ckpt["config"])

    @property
    def uses_time(self) -> bool:
        return self.config.get("model", {}).get("relative_bias") == "position_time"

    def encode(self, histories: list[np.ndarray], timestamps: list[np.ndarray] | None = None,
               query_time: np.ndarray | None = None) -> torch.Tensor:
        """Dense-id histories (each non-empty) -> (B, D) scorer-normalised queries.

        ``query_time[b]`` is the time of the event to predict after history b (defaults to its last event).
        """
        hs = [h[-self.max_len:] for h in histories]
        lengths = np.array([len(h) for h in hs])
        L = int(lengths.max())
        items = np.zeros((len(hs), L), dtype=np.int64)
        for b, h in enumerate(hs):  # one row per request; the hot path is the model, not this copy
            items[b, :len(h)] = h
        ts = qt = None
        if timestamps is not None:
            ts = np.zeros_like(items)
            for b, t in enumerate(timestamps):
                t = np.asarray(t, dtype=np.int64)[-self.max_len:]
                ts[b, :len(t)] = t
            last = ts[np.arange(len(hs)), lengths - 1] if query_time is None else np.asarray(query_time, dtype=np.int64)
            ts, qt = torch.from_numpy(ts), torch.from_numpy(next_event_times(ts, lengths, last))
        if len(hs) == 1 and self.single_encoder is not None and (timestamps is not None) == self.uses_time:
            # one history: the compiled encoder (genrec serve --compile), same function, no Python per op
            inputs = [torch.from_numpy(items), torch.from_numpy(lengths)]
            if timestamps is not None:
                inputs += [ts, torch.from_numpy(np.atleast_1d(last).astype(np.int64))]
            with torch.no_grad():
                return self.single_encoder(*inputs)
        batch = Batch(items=torch.from_numpy(items), lengths=torch.from_numpy(lengths), timestamps=ts, query_time=qt)
        batch = batch.to(self.item_table.device)
        with torch.no_grad():
            return self.scorer.queries(next_item_queries(self.model, batch))

    def recommend(self, histories: list[list], k: int = 10, exclude_seen: bool | list[bool] = True,
                  candidates: list[list | None] | None = None, timestamps: list[list[int]] | None = None,
                  query_time: int | list[int] | None = None, batch_size: int = 256) -> list[Recommendation]:
        """Top-``k`` raw item ids per history; ``batch_size`` histories per forward pass.

        ``exclude_seen`` and ``query_time`` take one value for all histories or one per history.
        ``candidates`` restricts the ranking: one entry per history, ``None`` (all items) or a list of raw
        item ids (unknown candidates are dropped and counted in ``unknown_candidates``).
        """
        n = len(histories)
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        exclude = np.broadcast_to(np.asarray(exclude_seen, dtype=bool), (n,))
        if candidates is not None and len(candidates) != n:
            raise ValueError(f"candidates must have one entry (a list of item ids or None) per history: "
                             f"{len(candidates)} for {n} histories")
        if timestamps is not None:
            if len(timestamps) != n or any(len(t) != len(h) for t, h in zip(timestamps, histories)):
                raise ValueError("timestamps must give one time per history item")
            now = int(time.time()) if query_time is None else query_time
            query_time = np.broadcast_to(np.asarray(now, dtype=np.int64), (n,))
        elif self.uses_time:
            warnings.warn("this model was trained with a time bias; without timestamps it uses positions only "
                          "(pass timestamps= and query_time= for the scores it was evaluated with)", stacklevel=2)
        k = min(k, len(self.vocab))
        dense, unknown, known = self._lookup(histories)
        keep_ts = None
        if timestamps is not None:
            keep_ts = [np.asarray(t, dtype=np.int64)[m] for t, m in zip(timestamps, known)]
        cands, unknown_cands = [None] * n, [0] * n
        if candidates is not None:
            given = [i for i in range(n) if candidates[i] is not None]
            for i, d in zip(given, self._lookup([candidates[i] for i in given])[0]):
                cands[i] = np.unique(d)
                unknown_cands[i] = len(candidates[i]) - len(d)
        out: list[Recommendation | None] = [None] * n
        # batched internally: rows sorted by (window) length, longest first, so each forward pass pads
        # little and HSTU's jagged attention needs no permutation
        rows = sorted((i for i, d in enumerate(dense) if len(d)), key=lambda i: -min(len(dense[i]), self.max_len))
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            q = self.encode([dense[i] for i in chunk], [keep_ts[i] for i in chunk] if keep_ts is not None else None,
                            query_time[chunk] if keep_ts is not None else None)
            scores = q @ self.item_table.T  # (B, I + 1)
            self._mask(scores, [dense[i] if exclude[i] else None for i in chunk], [cands[i] for i in chunk])
            top = torch.topk(scores, k, dim=1)
            finite = torch.isfinite(top.values).sum(dim=1).tolist()  # fewer than k left after the exclusions
            raw = self.vocab.to_raw(top.indices.numpy().reshape(-1)).reshape(len(chunk), k).tolist()
            values = top.values.tolist()
            for j, i in enumerate(chunk):
                out[i] = Recommendation(raw[j][:finite[j]], values[j][:finite[j]], unknown[i],
                                        unknown_candidates=unknown_cands[i])
        for i in range(n):
            if out[i] is None:
                out[i] = self._popular(k, unknown[i], cands[i], unknown_cands[i])
        return out

    def _lookup(self, lists: list[list]) -> tuple[list[np.ndarray], list[int], list[np.ndarray]]:
        """Raw id lists -> per list: its known dense ids, its number of unknown ids, its known mask.

        One vocabulary lookup for all lists.
        """
        sizes = [len(h) for h in lists]
        flat = [x for h in lists for x in h]
        all_dense = self.vocab.to_dense(flat) if flat else np.zeros(0, dtype=np.int64)
        parts = np.split(all_dense, np.cumsum(sizes)[:-1]) if lists else []
        known = [d > 0 for d in parts]
        return [d[m] for d, m in zip(parts, known)], [int(len(d) - m.sum()) for d, m in zip(parts, known)], known

    @staticmethod
    def _mask(scores: torch.Tensor, seen: list[np.ndarray | None], cands: list[np.ndarray | None]) -> None:
        """-inf at padding, at each row's excluded history items and outside each row's candidates."""
        scores[:, 0] = -torch.inf

        def cells(lists):
            rows = np.repeat(np.arange(len(lists)), [0 if x is None else len(x) for x in lists])
            cols = np.concatenate([x for x in lists if x is not None] or [np.zeros(0, dtype=np.int64)])
            return torch.from_numpy(rows), torch.from_numpy(cols)

        if any(c is not None for c in cands):
            allowed = torch.zeros_like(scores, dtype=torch.bool)
            allowed[[j for j, c in enumerate(cands) if c is None]] = True
            allowed[cells(cands)] = True
            scores.masked_fill_(~allowed, -torch.inf)
        if any(x is not None for x in seen):
            scores[cells(seen)] = -torch.inf

    def _popular(self, k: int, unknown: int, cands: np.ndarray | None = None, unknown_cands: int = 0) -> Recommendation:
        if self.item_counts is None:
            raise ValueError("empty history and no popularity counts in this checkpoint")
        counts = self.item_counts.clone().float()
        self._mask(counts[None], [None], [cands])
        top = torch.topk(counts, k)
        n = int(torch.isfinite(top.values).sum())
        return Recommendation(self.vocab.to_raw(top.indices[:n].numpy()).tolist(), top.values[:n].tolist(), unknown,
                              True, unknown_cands)
