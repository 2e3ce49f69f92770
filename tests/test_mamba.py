"""Mamba-2's chunked SSD scan equals the step-by-step recurrence (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from genrec.models.mamba4rec import Mamba2Layer, Mamba4RecConfig, ssd_recurrence, ssd_scan


def inputs(b, l, h, p, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=g, dtype=torch.float64)
    a = -torch.rand(b, l, h, generator=g, dtype=torch.float64) * 2  # log decays in (-2, 0]
    B = torch.randn(b, l, h, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, l, h, n, generator=g, dtype=torch.float64)
    return [t.requires_grad_(True) for t in (x, a, B, C)]


@pytest.mark.parametrize("l,chunk", [(1, 4), (7, 4), (8, 4), (13, 5), (20, 64), (33, 8)])
def test_chunked_scan_equals_recurrence(l, chunk):
    x, a, B, C = inputs(2, l, 3, 4, 5, seed=l * 100 + chunk)
    want = ssd_recurrence(x, a, B, C)
    got = ssd_scan(x, a, B, C, chunk)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    weights = torch.randn(want.shape, dtype=torch.float64)
    gw = torch.autograd.grad((want * weights).sum(), [x, a, B, C])
    gg = torch.autograd.grad((got * weights).sum(), [x, a, B, C])
    for u, v in zip(gg, gw):
        torch.testing.assert_close(u, v, atol=1e-8, rtol=1e-8)


def test_strong_decay_does_not_overflow():
    """Large log decays: exp of the (masked) upper triangle would overflow if it were not masked first."""
    x, a, B, C = inputs(1, 40, 2, 3, 4, seed=1)
    with torch.no_grad():
        a.mul_(50)  # log decays down to -100 per step
    got = ssd_scan(x, a, B, C, 16)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ssd_recurrence(x, a, B, C), atol=1e-9, rtol=1e-9)


def test_layer_is_causal_and_uses_the_scan_on_cpu():
    cfg = Mamba4RecConfig(dim=8, d_state=4, head_dim=4, chunk_size=3, max_len=16)
    layer = Mamba2Layer(cfg).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    y = layer(x)
    x2 = x.clone()
    x2[:, 6] += 1.0
    y2 = layer(x2)
    torch.testing.assert_close(y2[:, :6], y[:, :6])  # the conv and the scan only look back
    assert not torch.allclose(y2[:, 6], y[:, 6])
    # the step-by-step definition of the whole layer, through ssd_recurrence, gives the same output
    import genrec.models.mamba4rec as m

    original = m.ssd_scan
    try:
        m.ssd_scan = lambda x, a, B, C, chunk: ssd_recurrence(x, a, B, C)
        torch.testing.assert_close(layer(x), y)
    finally:
        m.ssd_scan = original


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        Mamba4RecConfig(dim=10, expand=2, head_dim=8).validate()
