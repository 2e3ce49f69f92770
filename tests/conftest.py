"""Shared fixtures: the tiny synthetic dataset (in memory and saved) and a hand-made store builder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrec.data.ingest import build_store
from genrec.config import load_config
from genrec.data.synthetic import PRESETS, generate
from genrec.train.trainer import train


# The tensors here are tiny: one thread avoids OpenMP synchronisation costs on a busy machine (10x faster).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_store():
    return generate(PRESETS["tiny"])


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory, tiny_store):
    path = tmp_path_factory.mktemp("data") / "tiny"
    tiny_store.save(path)
    return path


def _store_from_sequences(sequences, with_time: bool = True):
    """{raw user: [(raw item, timestamp), ...]} -> SequenceStore (events given in time order)."""
    users, items, times = [], [], []
    for u, events in sequences.items():
        for item, t in events:
            users.append(u)
            items.append(item)
            times.append(t)
    return build_store(np.array(users), np.array(items, dtype=np.int64),
                       np.array(times, dtype=np.int64) if with_time else None)


@pytest.fixture
def store_from_sequences():
    return _store_from_sequences


def train_tiny(data_dir, out, model: dict, epochs: int = 2, **sections):
    """Train a small model on the tiny dataset into ``out`` (quietly); returns ``out``."""
    base = {"data": {"path": str(data_dir), "max_len": 12}, "model": model, "loss": {"num_negatives": 16},
            "train": {"epochs": epochs, "batch_size": 64, "threads": 1}, "eval": {"ks": [10]}}
    train(load_config(base={**base, **sections}), out, echo=lambda *a, **k: None)
    return out


@pytest.fixture(scope="session")
def hstu_run(tiny_data_dir, tmp_path_factory):
    """A tiny trained HSTU run with the time bias (for the Recommender, the batch CLI, the server)."""
    return train_tiny(tiny_data_dir, tmp_path_factory.mktemp("rec") / "hstu",
                      {"name": "hstu", "dim": 16, "num_blocks": 2, "num_heads": 2, "qk_dim": 8, "v_dim": 8})
