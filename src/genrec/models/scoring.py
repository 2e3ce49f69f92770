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
        return self.queries(hidden) @ self.items(table).T
