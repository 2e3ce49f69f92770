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


SCORE_COLUMNS = 512  # items per matmul when scoring queries against a whole item table on CPU


def scores_against(q: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``q @ table.T``, (B, D) x (I, D) -> (B, I). On CPU outside autocast, SCORE_COLUMNS items at a time,
    each product written straight into its columns of the result: for a whole table MKL picks a slow
    blocking (K = 64, N = 12k: about 30 GFLOP/s on one thread, against 60 for the loss's other matmuls;
    512 x 12,102 x 64 took 21-24 ms whole, 16 ms in blocks), and the blocks give the same bits."""
    if q.device.type != "cpu" or torch.is_autocast_enabled("cpu") or len(table) <= SCORE_COLUMNS or q.dim() != 2:
        return q @ table.T
    out = q.new_empty(len(q), len(table))
    for s in range(0, len(table), SCORE_COLUMNS):
        torch.mm(q, table[s:s + SCORE_COLUMNS].T, out=out[:, s:s + SCORE_COLUMNS])
    return out
