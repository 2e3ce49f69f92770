"""GRU4Rec: a recurrent next-item baseline.

Hidasi et al., "Session-based Recommendations with Recurrent Neural Networks", ICLR 2016, in the
form later sequential-recommendation benchmarks use (e.g. RecBole): item embedding -> dropout -> GRU
layers -> linear projection back to the embedding size; the state after each event is that
position's next-item query, scored against the item table by the library's losses. Causal by
construction; right padding comes after every real event, so it never changes a real position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from genrec.data.batches import Batch
from genrec.models.layers import Dropout, check_length, is_static


@dataclass
class GRU4RecConfig:
    dim: int = 64  # item embedding size D (and the output size)
    hidden_size: int = 128
    num_layers: int = 1
    dropout: float = 0.3  # on the embeddings
    max_len: int = 200  # histories longer than this are cut

    def validate(self) -> None:
        for key in ("dim", "hidden_size", "num_layers", "max_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


class GRU4Rec(nn.Module):
    def __init__(self, cfg: GRU4RecConfig, num_items: int):
        super().__init__()
        self.cfg = cfg
        self.item_embedding = nn.Embedding(num_items + 1, cfg.dim, padding_idx=0)
        self.dropout = Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.dim, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True, bias=False)
        self.out = nn.Linear(cfg.hidden_size, cfg.dim)
        nn.init.xavier_normal_(self.item_embedding.weight)
        for name, p in self.gru.named_parameters():
            nn.init.xavier_uniform_(p) if "weight_ih" in name else nn.init.orthogonal_(p)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def forward(self, batch: Batch) -> torch.Tensor:
        B, L = batch.items.shape
        check_length(L, self.cfg.max_len)
        x = self.dropout(self.item_embedding(batch.items))  # (B, L, D)
        lengths = batch.lengths.clamp(min=1, max=L).cpu()  # (pack_padded_sequence takes CPU lengths)
        if is_static() or bool((lengths == L).all()):
            h, _ = self.gru(x)  # (B, L, hidden)
        else:  # the recurrence steps only through each row's real events (a random batch is mostly padding)
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            h, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=L)
        return self.out(h) * batch.padding_mask.unsqueeze(-1)  # (B, L, D)

    def item_vectors(self) -> torch.Tensor:
        return self.item_embedding.weight
