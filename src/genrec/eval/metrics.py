"""Ranking metrics from 0-based ranks of the held-out target (rank 0 = top of the list).

HR@K = share of users whose target is in the top K; NDCG@K = mean of 1 / log2(rank + 2) over users
whose target is in the top K (one relevant item, so the ideal DCG is 1); MRR = mean of 1 / (rank + 1)
over all users, uncut.
"""

from __future__ import annotations

import numpy as np


def ranking_metrics(ranks: np.ndarray, ks: list[int]) -> dict[str, float]:
    ranks = np.asarray(ranks, dtype=np.float64)
    if len(ranks) == 0:
        raise ValueError("no ranks to evaluate")
    out: dict[str, float] = {}
    gain = 1.0 / np.log2(ranks + 2.0)
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, gain, 0.0).mean())
    out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
    return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve with ties counted as half (Mann-Whitney U)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # average ranks for ties
    _, inv, counts = np.unique(sorted_scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = (ends - (counts - 1) / 2.0)[inv]  # 1-based average rank in sorted order
    ranks = np.empty_like(avg_rank)
    ranks[order] = avg_rank
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
