"""Retrieval indexes over the item table: exact top-K and approximate (FAISS HNSW / IVF).

Both answer ``search(queries (B, D), k, exclude=None) -> (scores (B, k), ids (B, k))`` by inner
product, with dense item ids (1..I; row 0 of the table is padding and never returned). ``exclude``
gives, per query, dense ids that must not be returned (the user's history); rows that run out of
candidates are padded with id 0 and score -inf.

- ``ExactIndex``: chunked matmul + running top-k; memory bounded by ``chunk`` x B scores.
- ``FaissIndex``: ``kind = "hnsw"`` (graph, no training) or ``"ivf"`` (inverted lists trained by k-means
  on the items); needs the optional ``faiss-cpu`` package (``pip install 'genrec[ann]'``). Excluded ids
  are handled by asking for ``k`` plus the longest exclusion list and filtering.
"""

from __future__ import annotations

import numpy as np
import torch


def _exclusion_mask_pairs(exclude: list[np.ndarray] | None, lo: int, hi: int):
    """(rows, cols) of excluded ids falling in [lo, hi), cols relative to lo."""
    if not exclude:
        return None
    rows = np.repeat(np.arange(len(exclude)), [len(e) for e in exclude])
    cols = np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude]) if len(rows) else np.zeros(0, np.int64)
    keep = (cols >= lo) & (cols < hi)
    return torch.from_numpy(rows[keep]), torch.from_numpy(cols[keep] - lo)


class ExactIndex:
    def __init__(self, vectors: torch.Tensor, chunk: int = 65536):
        """vectors: (I + 1, D) item table, row 0 = padding."""
        self.vectors = vectors.detach().float()
        self.chunk = chunk

    def __len__(self) -> int:
        return self.vectors.shape[0] - 1

    def search(self, queries: torch.Tensor, k: int, exclude: list[np.ndarray] | None = None):
        B = queries.shape[0]
        k = min(k, len(self))
        best_s = torch.full((B, k), -torch.inf)
        best_i = torch.zeros(B, k, dtype=torch.long)
        q = queries.detach().float()
        for lo in range(1, self.vectors.shape[0], self.chunk):
            hi = min(self.vectors.shape[0], lo + self.chunk)
            scores = q @ self.vectors[lo:hi].T  # (B, n)
            pairs = _exclusion_mask_pairs(exclude, lo, hi)
            if pairs is not None:
                scores[pairs] = -torch.inf
            top = torch.topk(scores, min(k, hi - lo), dim=1)
            cand_s = torch.cat([best_s, top.values], dim=1)
            cand_i = torch.cat([best_i, top.indices + lo], dim=1)
            keep = torch.topk(cand_s, k, dim=1).indices
            best_s, best_i = cand_s.gather(1, keep), cand_i.gather(1, keep)
        best_i[~torch.isfinite(best_s)] = 0
        return best_s, best_i


class FaissIndex:
    def __init__(self, vectors: torch.Tensor, kind: str = "hnsw", hnsw_m: int = 32, ef_construction: int = 200,
                 ef_search: int = 256, nlist: int | None = None, nprobe: int = 32, threads: int = 0):
        try:
            import faiss
        except ImportError:
            raise ImportError("FAISS indexes need the faiss-cpu package: pip install 'genrec[ann]'") from None
        if kind not in ("hnsw", "ivf"):
            raise ValueError(f"unknown index kind {kind!r}; use hnsw or ivf (or the exact index)")
        if threads:
            faiss.omp_set_num_threads(threads)
        items = np.ascontiguousarray(vectors.detach().float().numpy()[1:])  # without the padding row
        d = items.shape[1]
        self.kind = kind
        if kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = ef_construction
            self.index.add(items)
            self.index.hnsw.efSearch = ef_search
        else:
            nlist = nlist or max(1, int(4 * np.sqrt(len(items))))
            quantizer = faiss.IndexFlatIP(d)
            self.index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.train(items)
            self.index.add(items)
            self.index.nprobe = nprobe
            self._quantizer = quantizer  # keep it alive as long as the index
        self.size = len(items)

    def __len__(self) -> int:
        return self.size

    def search(self, queries: torch.Tensor, k: int, exclude: list[np.ndarray] | None = None):
        k = min(k, self.size)
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        want = min(self.size, k + extra)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, want)
        scores, ids = self.index.search(np.ascontiguousarray(queries.detach().float().numpy()), want)
        ids = np.where(ids >= 0, ids + 1, 0)  # back to dense ids (1..I); -1 = no result
        scores = np.where(ids > 0, scores, -np.inf)
        if extra:
            for b, e in enumerate(exclude):
                if len(e):
                    scores[b, np.isin(ids[b], e)] = -np.inf
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        else:
            scores, ids = scores[:, :k], ids[:, :k]
        ids = np.where(np.isfinite(scores), ids, 0)
        return torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(ids.astype(np.int64))


def build_index(vectors: torch.Tensor, kind: str = "exact", **options):
    """``exact`` | ``hnsw`` | ``ivf``."""
    if kind == "exact":
        return ExactIndex(vectors, **options)
    return FaissIndex(vectors, kind=kind, **options)
