"""How hidden states are compared with items: dot product, or cosine when ``l2_norm`` is on.

Shared by the losses (training) and the evaluator / recommender (ranking), so both always score the
same way. The temperature only rescales logits inside the losses; it never changes a ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Scorer:
    l2_norm: bool = True
    eps: float = 1e-6

    def queries(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(hidden, dim=-1, eps=self.eps) if self.l2_norm else hidden

    def items(self, table: torch.Tensor) -> torch.Tensor:
        return F.normalize(table, dim=-1, eps=self.eps) if self.l2_norm else table

    def scores(self, hidden: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(B, D) x (I, D) -> (B, I)."""
        return scores_against(self.queries(hidden), self.items(table))


SCORE_COLUMNS = 512  # items per matmul when scoring many queries against a large item table on CPU ...
BLOCKED_FROM = 2**20  # ... from this many scores per thread (smaller products: one matmul is as fast)


def scores_against(q: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``q @ table.T``, (B, D) x (I, D) -> (B, I). On CPU outside autocast, for large products,
    SCORE_COLUMNS items at a time, each product written straight into its columns of the result: for a
    whole large table MKL picks a slow blocking (D = 64: one thread, 512 x 12,102 scores 23 ms whole
    against 15 in blocks, 128 x 12,102 6.6 against 4.7, 512 x 3,707 7.8 against 5.5; two threads
    512 x 12,102 12.9 against 9.0, the smaller ones equal or faster whole), and the blocks give the same
    bits. One query (a request) or a small table: one matmul."""
    if (q.device.type != "cpu" or torch.is_autocast_enabled("cpu") or q.dim() != 2 or len(table) <= SCORE_COLUMNS
            or len(q) * len(table) < BLOCKED_FROM * torch.get_num_threads()):
        return q @ table.T
    out = q.new_empty(len(q), len(table))
    for s in range(0, len(table), SCORE_COLUMNS):
        torch.mm(q, table[s:s + SCORE_COLUMNS].T, out=out[:, s:s + SCORE_COLUMNS])
    return out
