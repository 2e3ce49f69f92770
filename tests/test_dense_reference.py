"""The fast models equal the straightforward dense reference of benchmarks/ (outputs and gradients)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from dense_reference import dense_forward, dense_sampled_softmax  # noqa: E402

from genrec.data.batches import Batch  # noqa: E402
from genrec.losses import sampled_softmax  # noqa: E402
from genrec.models import HSTU, HSTUConfig, SASRec, SASRecConfig, kernels  # noqa: E402

MAX_LEN = 140


def make_batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([130, 3, 1, 70])  # longer than one attention block (64 rows)
    L = int(lengths.max())
    valid = torch.arange(L)[None] < lengths[:, None]
    items = torch.randint(1, 30, (4, L), generator=g) * valid
    ts = torch.cumsum(torch.randint(1, 10**5, (4, L), generator=g), 1) * valid
    qt = torch.cat([ts[:, 1:], ts[:, -1:] + 50], 1) * valid
    targets = torch.randint(1, 30, (4, L), generator=g) * valid
    return Batch(items=items, lengths=lengths, timestamps=ts, query_time=qt, targets=targets)


MODELS = {
    "sasrec": lambda: SASRec(SASRecConfig(dim=8, num_heads=2, ffn_dim=12, max_len=MAX_LEN, dropout=0.0), 30),
    "hstu": lambda: HSTU(HSTUConfig(dim=8, num_heads=2, qk_dim=4, v_dim=4, max_len=MAX_LEN, dropout=0.0,
                                    linear_dropout=0.0), 30),
    "hstu-visible": lambda: HSTU(HSTUConfig(dim=8, num_heads=2, qk_dim=4, v_dim=4, max_len=MAX_LEN, dropout=0.0,
                                            linear_dropout=0.0, attn_norm="visible", output="concat"), 30),
    "hstu-production": lambda: HSTU(HSTUConfig.production(dim=8, num_heads=2, qk_dim=4, v_dim=4, max_len=MAX_LEN,
                                                          dropout=0.0, linear_dropout=0.0), 30),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_equals_dense_outputs_and_gradients(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():  # move parameters off their initial values so every term matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = make_batch()
    valid = batch.padding_mask
    fast = model(batch)
    dense = dense_forward(model, batch)[:, :fast.shape[1]]
    torch.testing.assert_close(fast[valid], dense[valid], atol=1e-5, rtol=1e-4)
    g_fast = torch.autograd.grad(fast[valid].pow(2).sum(), list(model.parameters()), allow_unused=True)
    g_dense = torch.autograd.grad(dense[valid].pow(2).sum(), list(model.parameters()), allow_unused=True)
    for (pname, _), a, b in zip(model.named_parameters(), g_fast, g_dense):
        if a is None or b is None:
            assert a is None or a.abs().max() == 0, pname
            continue
        # float32 sums of many terms: the absolute error grows with the gradient's scale (up to ~20 here;
        # AVX-512 and AVX2 builds of the matmuls round differently), so the floor is relative to it
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-4, msg=pname)


def test_sampled_softmax_equals_dense():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(50, 8, requires_grad=True)
    items = torch.randn(31, 8, requires_grad=True)
    targets = torch.randint(1, 31, (50,), generator=g)
    with kernels.use_kernels(False):  # the stock path: negatives from torch.randint, as the dense reference's
        fast = sampled_softmax(q, targets, items, 30, 16, 0.1, generator=torch.Generator().manual_seed(7))
    negatives = torch.randint(1, 31, (50, 16), generator=torch.Generator().manual_seed(7))
    dense = dense_sampled_softmax(q, targets, items, negatives, 0.1)
    torch.testing.assert_close(fast, dense)
    ga = torch.autograd.grad(fast, [q, items])
    gb = torch.autograd.grad(dense, [q, items])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)
