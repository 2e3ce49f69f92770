"""The compiled CPU attention kernel (genrec/models/kernels) against a plain float64 reference and the stock path."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from genrec.data.batches import Batch
from genrec.models import HSTU, kernels
from genrec.models.hstu import HSTUConfig, causal_silu_attention

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler on this machine: the kernel cannot be built")


def _reference(q, k, v, bias, lengths):
    """sum_{j <= i} SiLU(q_i . k_j + bias_ij) v_j in float64 over the full masked L x L scores."""
    L = q.shape[1]
    qh, kh, vh = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
    scores = qh @ kh.transpose(-1, -2) + (bias.double()[:, None] if bias is not None else 0)
    out = ((F.silu(scores) * torch.ones(L, L, dtype=torch.float64).tril()) @ vh).transpose(1, 2)
    real = (torch.arange(L)[None, :] < lengths[:, None])[:, :, None, None]
    return out * real, real


@needs_compiler
@pytest.mark.parametrize("dqk,dv", [(4, 5), (25, 25), (8, 16), (3, 33)])
@pytest.mark.parametrize("L", [1, 15, 16, 17, 70])
@pytest.mark.parametrize("bias_rows", [0, 1, 3])
def test_kernel_equals_reference(dqk, dv, L, bias_rows):
    g = torch.Generator().manual_seed(L * 100 + dqk)
    B, H = 3, 2
    lengths = torch.tensor([max(1, L // 3), L, max(1, L - 5)])
    # q, k, v are strided views of one projection, as in the layer; one huge score column tests that
    # the future never leaks through the mask and that SiLU saturates without inf or NaN
    proj = torch.randn(B, L, H * (2 * dqk + dv), generator=g)
    proj[..., 0] *= 1e3
    q, k, v = torch.split(proj, [H * dqk, H * dqk, H * dv], dim=-1)
    q, k, v = q.view(B, L, H, dqk), k.view(B, L, H, dqk), v.view(B, L, H, dv)
    bias = torch.randn(bias_rows, L, L, generator=g) if bias_rows else None
    with kernels.use_kernels(True):
        kernel = kernels.silu_attention()
    assert kernel is not None, kernels._state.get("error")
    got = kernel.causal_silu_attention(q, k, v, bias if bias is not None else torch.empty(0), lengths)
    want, real = _reference(q, k, v, bias, lengths)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double() * real, want, atol=2e-3, rtol=1e-4)
    assert (got * ~real).abs().max() == 0  # padding rows are exactly zero


@needs_compiler
def test_kernel_edge_lengths_and_extreme_scores():
    """Empty and over-long lengths, and scores far outside exp's range (SiLU -> 0 and -> x)."""
    B, L, H, d = 3, 9, 1, 2
    q = torch.zeros(B, L, H, d)
    k = torch.zeros(B, L, H, d)
    q[..., 0], k[..., 0] = 100.0, torch.linspace(-100, 100, L)[None, :, None]  # scores from -1e4 to 1e4
    v = torch.ones(B, L, H, d)
    with kernels.use_kernels(True):
        kernel = kernels.silu_attention()
    assert kernel is not None, kernels._state.get("error")
    lengths = torch.tensor([0, 4, 50])  # none, some, clamped to L
    got = kernel.causal_silu_attention(q, k, v, torch.empty(0), lengths)
    want, _ = _reference(q, k, v, None, lengths.clamp(max=L))
    assert got[0].abs().max() == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


@needs_compiler
@pytest.mark.parametrize("relative_bias", ["position", "position_time"])
def test_model_outputs_equal_with_and_without_kernel(relative_bias):
    """HSTU's forward and next-item queries (inference) are the same with the kernel and the stock path."""
    torch.manual_seed(0)
    model = HSTU(HSTUConfig(dim=16, num_blocks=3, num_heads=2, qk_dim=8, v_dim=8, max_len=40,
                            relative_bias=relative_bias), 50).eval()
    lengths = torch.tensor([40, 3, 17, 1])
    items = torch.randint(1, 51, (4, 40)) * (torch.arange(40)[None] < lengths[:, None])
    times = torch.cumsum(torch.randint(1, 10_000, (4, 40)), 1)
    batch = Batch(items=items, lengths=lengths, timestamps=times)
    outs = {}
    for enabled in (False, True):
        with kernels.use_kernels(enabled), torch.no_grad():
            outs[enabled] = (model(batch), model.next_item_queries(batch))
    assert kernels.silu_attention() is not None or kernels.mode() == "off"
    for a, b in zip(outs[False], outs[True]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_training_never_uses_the_kernel(monkeypatch):
    """With autograd recording, the stock recomputing path runs (the kernel has no backward)."""
    class Exploding:
        def causal_silu_attention(self, *args):
            raise AssertionError("kernel called under autograd")

    monkeypatch.setattr(kernels, "silu_attention", lambda: Exploding())
    q = torch.randn(2, 5, 1, 3, requires_grad=True)
    out = causal_silu_attention(q, q, q, None, torch.tensor([5, 2]))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad(), pytest.raises(AssertionError, match="kernel called"):
        causal_silu_attention(q, q, q, None, torch.tensor([5, 2]))


def test_modes_and_build_failure(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("GENREC_KERNELS", "off")
    assert kernels.silu_attention() is None and kernels._state == {}  # never built

    monkeypatch.setenv("GENREC_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="GENREC_KERNELS='sometimes': choose one of auto, off, require"):
        kernels.silu_attention()

    def broken():
        raise OSError("no compiler here")

    monkeypatch.setattr(kernels, "_build", broken)
    monkeypatch.setenv("GENREC_KERNELS", "require")
    with pytest.raises(RuntimeError, match="did not build: no compiler here"):
        kernels.silu_attention()

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("GENREC_KERNELS", "auto")
    with pytest.warns(RuntimeWarning, match="did not build .*OSError: no compiler here.*stock PyTorch path"):
        assert kernels.silu_attention() is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.silu_attention() is None  # decided once: no second attempt, no second warning
    assert caught == []
    q = torch.randn(2, 5, 1, 3)
    want, _ = _reference(q, q, q, None, torch.tensor([5, 5]))
    torch.testing.assert_close(causal_silu_attention(q, q, q, None).double(), want, rtol=1e-4, atol=1e-5)
