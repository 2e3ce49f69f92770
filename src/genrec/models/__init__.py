"""Sequence models: ``forward(batch) -> hidden (B, L, D)``; ``item_vectors() -> (num_items + 1, D)``.

Models know nothing of datasets, losses or trainers. ``MODELS`` maps a config name to its
(config dataclass, model class); ``build_model`` wires one up.
"""

from __future__ import annotations

import torch
from torch import nn

from genrec.models.bert4rec import BERT4Rec, BERT4RecConfig
from genrec.models.gru4rec import GRU4Rec, GRU4RecConfig
from genrec.models.hstu import HSTU, HSTUConfig
from genrec.models.mamba4rec import Mamba4Rec, Mamba4RecConfig
from genrec.models.sasrec import SASRec, SASRecConfig

MODELS: dict[str, tuple[type, type]] = {
    "sasrec": (SASRecConfig, SASRec),
    "hstu": (HSTUConfig, HSTU),
    "bert4rec": (BERT4RecConfig, BERT4Rec),
    "mamba4rec": (Mamba4RecConfig, Mamba4Rec),
    "gru4rec": (GRU4RecConfig, GRU4Rec),
}


def next_item_queries(model: nn.Module, batch) -> torch.Tensor:
    """(B, D) hidden state at each row's last event: what evaluation and recommendation score against
    the item table. Uses the model's own ``next_item_queries`` when it has a cheaper path (HSTU)."""
    own = getattr(model, "next_item_queries", None)
    if own is not None:
        return own(batch)
    h = model(batch)  # (B, L, D)
    return h[torch.arange(h.shape[0], device=h.device), batch.lengths - 1]


def build_model(cfg, num_items: int) -> nn.Module:
    for cfg_cls, model_cls in MODELS.values():
        if type(cfg) is cfg_cls:
            return model_cls(cfg, num_items)
    raise TypeError(f"no model for config {type(cfg).__name__}")


__all__ = ["MODELS", "build_model", "next_item_queries", "BERT4Rec", "BERT4RecConfig", "GRU4Rec", "GRU4RecConfig", "HSTU", "HSTUConfig",
           "Mamba4Rec", "Mamba4RecConfig", "SASRec", "SASRecConfig"]
