"""Sequence models: ``forward(batch) -> hidden (B, L, D)``; ``item_vectors() -> (num_items + 1, D)``.

Models know nothing of datasets, losses or trainers. ``MODELS`` maps a config name to its
(config dataclass, model class); ``build_model`` wires one up.
"""

from __future__ import annotations

from torch import nn

from genrec.models.hstu import HSTU, HSTUConfig
from genrec.models.sasrec import SASRec, SASRecConfig

MODELS: dict[str, tuple[type, type]] = {
    "sasrec": (SASRecConfig, SASRec),
    "hstu": (HSTUConfig, HSTU),
}


def build_model(cfg, num_items: int) -> nn.Module:
    for cfg_cls, model_cls in MODELS.values():
        if type(cfg) is cfg_cls:
            return model_cls(cfg, num_items)
    raise TypeError(f"no model for config {type(cfg).__name__}")


__all__ = ["MODELS", "build_model", "HSTU", "HSTUConfig", "SASRec", "SASRecConfig"]
