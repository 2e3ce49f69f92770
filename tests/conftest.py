"""Shared fixtures: the tiny synthetic dataset (in memory and saved) and a hand-made store builder; helpers
that train a tiny run and compare two ways of running a model."""

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


def output_and_grads(model, batch):
    """A model's output on ``batch`` and every parameter's gradient (None when it gets none) of a fixed
    weighting of that output: what two equivalent ways of running the model must agree on."""
    out = model(batch)
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    return out.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_same_output_and_grads(got, want, padding_mask, every_parameter: bool = False):
    """``output_and_grads`` results agree: outputs to 1e-5, zero at padding, the same parameters with
    gradients (all of them with ``every_parameter``), each to 1e-4."""
    (out, grads), (ref, ref_grads) = got, want
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.all(out[~padding_mask] == 0)
    assert {n for n, g in grads.items() if g is None} == {n for n, g in ref_grads.items() if g is None}
    if every_parameter:
        assert all(g is not None for g in ref_grads.values())
    for n, g in ref_grads.items():
        if g is not None:
            torch.testing.assert_close(grads[n], g, atol=1e-4, rtol=1e-4, msg=n)
