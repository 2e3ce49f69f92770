"""Sequence models: ``forward(batch) -> hidden (B, L, D)``; ``item_vectors() -> (num_items + 1, D)``.

Models know nothing of datasets, losses or trainers. ``MODELS`` maps a config name to its
(config dataclass, model class); ``build_model`` wires one up.
"""

from __future__ import annotations

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


def build_model(cfg, num_items: int) -> nn.Module:
    for cfg_cls, model_cls in MODELS.values():
        if type(cfg) is cfg_cls:
            return model_cls(cfg, num_items)
    raise TypeError(f"no model for config {type(cfg).__name__}")


__all__ = ["MODELS", "build_model", "BERT4Rec", "BERT4RecConfig", "GRU4Rec", "GRU4RecConfig", "HSTU", "HSTUConfig",
           "Mamba4Rec", "Mamba4RecConfig", "SASRec", "SASRecConfig"]
