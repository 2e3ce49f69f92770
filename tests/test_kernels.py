"""The compiled CPU kernels (genrec/models/kernels) against plain float64 references and the stock path."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from genrec.data.batches import Batch
from genrec.models import HSTU, kernels
from genrec.models.hstu import HSTUConfig, causal_silu_attention, compiled_silu_attention
from genrec.models.layers import layer_norm

needs_compiler = pytest.mark.skipif(
    not kernels.can_build(),
    reason="no C++ compiler (c++ or $CXX) or no ninja on this machine: the kernel cannot be built")


def _built():
    with kernels.use_kernels(True):
        kernel = kernels.silu_attention()
    assert kernel is not None, kernels._state.get("error")
    return kernel


def _spy_on_kernel(monkeypatch, hide: tuple[str, ...] = ()) -> list[str]:
    """Route ``kernels.silu_attention()`` to the built extension through a spy; returns the list that
    records the name of every extension function the code under test looks up. ``hide``: "bf16" makes the
    spy answer as an extension built without the bf16 dot-product kernels (has_bf16_attention() false)."""
    kernel, calls = _built(), []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            if "bf16" in hide and name == "has_bf16_attention":
                return lambda: False
            return getattr(kernel, name)

    monkeypatch.setattr(kernels, "silu_attention", lambda: Spy())
    return calls


def _reference(q, k, v, bias, lengths):
    """sum_{j <= i} SiLU(q_i . k_j + bias_ij) v_j in float64 over the full masked L x L scores."""
    L = q.shape[1]
    qh, kh, vh = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
    scores = qh @ kh.transpose(-1, -2) + (bias.double()[:, None] if bias is not None else 0)
    out = ((F.silu(scores) * torch.ones(L, L, dtype=torch.float64).tril()) @ vh).transpose(1, 2)
    real = (torch.arange(L)[None, :] < lengths[:, None])[:, :, None, None]
    return out * real, real


@needs_compiler
@pytest.mark.parametrize("dqk,dv", [(4, 5), (25, 25), (8, 16), (3, 33), (9, 70)])
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
    got = _built().causal_silu_attention(q, k, v, bias if bias is not None else torch.empty(0), lengths, torch.empty(0))
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
    kernel = _built()
    lengths = torch.tensor([0, 4, 50])  # none, some, clamped to L
    got = kernel.causal_silu_attention(q, k, v, torch.empty(0), lengths, torch.empty(0))
    want, _ = _reference(q, k, v, None, lengths.clamp(max=L))
    assert got[0].abs().max() == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


@needs_compiler
def test_kernel_silu_far_below_exp_range_and_nan():
    """Scores of -1e38 weigh about 0 (not x / 1.6e38 = -0.6); a NaN score gives NaN, as torch's SiLU does."""
    q = torch.tensor([1e19, 1e19, float("nan")]).view(1, 3, 1, 1)
    k = torch.tensor([-1e19, 1.0, 1.0]).view(1, 3, 1, 1)
    v = torch.ones(1, 3, 1, 1)
    got = _built().causal_silu_attention(q, k, v, torch.empty(0), torch.tensor([3]), torch.empty(0))[0, :, 0, 0]
    assert abs(got[0]) < 1e-30  # SiLU(-1e38) -> 0
    assert got[1] == F.silu(torch.tensor(1e19))  # SiLU(-1e38) + SiLU(1e19) = 1e19
    assert got[2].isnan()


@needs_compiler
def test_kernel_silu_matches_torch_over_its_range():
    """One key per row: the output is SiLU(score) itself, against torch's for scores across exp's range."""
    x = torch.cat([torch.linspace(-100, 100, 20_001), torch.tensor([0.0, 1e-8, -1e-8, 87.5, -87.5, 88.5, -88.5])])
    q, ones = x.view(-1, 1, 1, 1), torch.ones(len(x), 1, 1, 1)
    got = _built().causal_silu_attention(q, ones, ones, torch.empty(0), torch.ones(len(x), dtype=torch.long), torch.empty(0))
    want = F.silu(x.double())
    torch.testing.assert_close(got.flatten().double(), want, rtol=4e-7, atol=1e-30)


@needs_compiler
def test_kernel_takes_any_strides_int32_lengths_and_more_threads_than_tasks():
    """Transposed and expanded views, a size-1 last dimension with a stride, int32 lengths, 4 threads for 2 tasks."""
    g = torch.Generator().manual_seed(3)
    B, L, H = 2, 23, 1
    q = torch.randn(B, H, L, 6, generator=g).transpose(1, 2)  # (B, L, H, 6), non-standard strides
    k = torch.randn(1, L, H, 6, generator=g).expand(B, L, H, 6)  # batch stride 0
    v = torch.randn(B, L, 1, H, generator=g).transpose(2, 3)  # (B, L, H, 1): last dim of size 1, stride H
    lengths = torch.tensor([23, 9], dtype=torch.int32)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        got = _built().causal_silu_attention(q, k, v, torch.empty(0), lengths, torch.empty(0))
    finally:
        torch.set_num_threads(threads)
    want, real = _reference(q, k, v, None, lengths.long())
    torch.testing.assert_close(got.double() * real, want, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # inside torch's forward AD
def test_forward_mode_autodiff_keeps_its_tangent():
    """Dual tensors never reach the kernel (it has no tangent rule): the stock path propagates the tangent."""
    q = torch.randn(2, 5, 1, 3)
    direction = torch.randn_like(q)
    with fwAD.dual_level():
        dual = fwAD.make_dual(q, direction)
        assert not kernels.applies(dual)
        tangent = fwAD.unpack_dual(causal_silu_attention(dual, q, q, None)).tangent
    eps = 1e-3
    finite = (causal_silu_attention(q + eps * direction, q, q, None)
              - causal_silu_attention(q - eps * direction, q, q, None)) / (2 * eps)
    torch.testing.assert_close(tangent, finite, atol=1e-2, rtol=1e-2)


@needs_compiler
@pytest.mark.parametrize("variant,lengths,fused", [
    ({"relative_bias": "position"}, [40, 3, 17, 1], True),  # packed tokens (mostly padding)
    ({"relative_bias": "position_time"}, [40, 3, 17, 1], True),  # per-row time bias
    ({"relative_bias": "position"}, [40, 39, 38, 40], True),  # a (B * L) grid: too little padding to pack
    ({"attn_scale": True, "attn_norm": "batch_max", "relative_bias": "none"}, [40, 3, 17, 1], True),
    ({"attn_norm": "visible"}, [40, 3, 17, 1], False),  # per-query normaliser: attention kernel only
    ({"ln_affine": True}, [40, 3, 17, 1], False),
    ({"v_dim": 40}, [40, 3, 17, 1], True),  # 2 heads x 40 = 80 gated values per token: the any-width norm
])
def test_model_outputs_equal_with_and_without_kernel(variant, lengths, fused, monkeypatch):
    """HSTU's forward and next-item queries (inference) are the same with the kernels and the stock path,
    and the kernels actually ran: the fused layer where its options allow, the attention kernel otherwise."""
    torch.manual_seed(0)
    options = {"dim": 16, "num_blocks": 3, "num_heads": 2, "qk_dim": 8, "v_dim": 8, "max_len": 40, **variant}
    model = HSTU(HSTUConfig(**options), 50).eval()
    lengths = torch.tensor(lengths)
    items = torch.randint(1, 51, (4, 40)) * (torch.arange(40)[None] < lengths[:, None])
    times = torch.cumsum(torch.randint(1, 10_000, (4, 40)), 1)
    batch = Batch(items=items, lengths=lengths, timestamps=times)
    with kernels.use_kernels(False), torch.no_grad():
        want = (model(batch), model.next_item_queries(batch))
    kernel, calls = _built(), []

    class Spy:
        def __getattr__(self, name):
            def call(*args):
                calls.append(name)
                return getattr(kernel, name)(*args)
            return call

    monkeypatch.setattr(kernels, "silu_attention", lambda: Spy())
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got = (model(batch), model.next_item_queries(batch))
        for a, b in zip(want, got):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # every layer of forward; next_item_queries: the whole stack in one call where the fused layer applies
    # and the bias is the position table alone, else layer by layer (the last with one query per row)
    # (not fused: the input norm through layer_norm_train unless it has affine parameters)
    per_layer = (["layer_norm", "hstu_attention_gate"] if fused else
                 ["layer_norm_train"] * (not model.cfg.ln_affine) + ["causal_silu_attention"])
    if fused and model.cfg.relative_bias != "position_time":
        assert calls == (per_layer * 3 + ["hstu_next_item_queries"]) * 2
    else:
        # the last layer of next_item_queries: the fused layer, or both of its norms (its one query per row
        # goes through the stock attention)
        last = per_layer if fused else ["layer_norm_train"] * 2 * (not model.cfg.ln_affine)
        assert calls == (per_layer * 3 + per_layer * 2 + last) * 2


@needs_compiler
@pytest.mark.parametrize("dqk,dv", [(4, 6), (25, 25), (8, 16), (3, 33), (50, 50)])
@pytest.mark.parametrize("L", [1, 15, 16, 17, 70])
@pytest.mark.parametrize("bias_rows", [0, 1, 4])
def test_training_gradients_from_the_kernel_equal_autograd(dqk, dv, L, bias_rows, monkeypatch):
    """Under autograd the compiled forward and backward run (a spy checks both), and the outputs and the
    gradients of the projection and the bias equal float64 autograd over the full masked scores. Rows of
    mixed lengths (one empty), gradient weights on padding too: padding gets exactly zero gradient."""
    g = torch.Generator().manual_seed(L * 100 + dqk + bias_rows)
    B, H = 4, 2
    lengths = torch.tensor([max(1, L // 3), L, 0, max(1, L - 5)])
    proj = (torch.randn(B, L, H * (2 * dqk + dv), generator=g) * 0.5).requires_grad_()
    bias = (torch.randn(bias_rows, L, L, generator=g) * 0.5).requires_grad_() if bias_rows else None
    split = [H * dqk, H * dqk, H * dv]

    def attention(proj, bias):
        q, k, v = torch.split(proj, split, dim=-1)
        return causal_silu_attention(q.view(B, L, H, dqk), k.view(B, L, H, dqk), v.view(B, L, H, dv), bias, lengths)

    calls = _spy_on_kernel(monkeypatch)
    got = attention(proj, bias)
    weights = torch.randn(got.shape, generator=g)
    inputs = [proj] + ([bias] if bias is not None else [])
    got_grads = torch.autograd.grad((got * weights).sum(), inputs)
    assert calls == ["causal_silu_attention", "causal_silu_attention_backward"]
    proj64 = proj.detach().double().requires_grad_()
    bias64 = bias.detach().double().requires_grad_() if bias is not None else None
    q, k, v = torch.split(proj64, split, dim=-1)
    want, real = _reference(q.view(B, L, H, dqk), k.view(B, L, H, dqk), v.view(B, L, H, dv), bias64, lengths)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    want_grads = torch.autograd.grad((want * weights.double()).sum(), [proj64] + ([bias64] if bias64 is not None else []))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=1e-4)
    assert got_grads[0][~real[..., 0, 0]].abs().max() == 0 if (~real).any() else True


@needs_compiler
def test_backward_kernel_shared_bias_across_threads_strides_and_no_bias_gradient():
    """A bias shared by the batch summed from per-thread buffers (4 threads, more than rows), a transposed
    non-contiguous output gradient, int32 lengths, and no bias gradient when it is not asked for."""
    g = torch.Generator().manual_seed(7)
    B, L, H, d = 3, 29, 2, 5
    q, k, v = (torch.randn(B, L, H, d, generator=g) for _ in range(3))
    bias = torch.randn(1, L, L, generator=g)
    grad = torch.randn(B, H, L, d, generator=g).transpose(1, 2)  # (B, L, H, d), not contiguous
    lengths = torch.tensor([29, 11, 20], dtype=torch.int32)
    kernel = _built()
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        dq, dk, dv, dbias = kernel.causal_silu_attention_backward(q, k, v, bias, lengths, torch.empty(0), grad, True)
        none = kernel.causal_silu_attention_backward(q, k, v, bias, lengths, torch.empty(0), grad, False)
    finally:
        torch.set_num_threads(threads)
    inputs = [t.double().requires_grad_() for t in (q, k, v, bias)]
    want, _ = _reference(*inputs, lengths.long())
    want_grads = torch.autograd.grad((want * grad.double()).sum(), inputs)
    for a, b in zip((dq, dk, dv, dbias), want_grads):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)
    assert none[3].numel() == 0
    for a, b in zip(none[:3], (dq, dk, dv)):
        assert torch.equal(a, b)


@needs_compiler
@pytest.mark.parametrize("variant,lengths", [
    ({"relative_bias": "position"}, [40, 3, 17, 1]),  # packed tokens
    ({"relative_bias": "position_time"}, [40, 3, 17, 1]),  # the time bias's per-row gradient
    ({"relative_bias": "position"}, [40, 39, 38, 40]),  # the (B * L) grid, padding tokens in no row
    ({"attn_norm": "visible", "attn_scale": True, "qk_dim": 12}, [40, 3, 17, 1]),  # per-query normaliser
])
def test_model_training_gradients_equal_with_and_without_kernel(variant, lengths):
    """One HSTU training loss: the parameter gradients through the compiled forward and backward (reading the
    packed projection in place) equal the stock tiled path's."""
    torch.manual_seed(0)
    options = {"dim": 16, "num_blocks": 2, "num_heads": 2, "qk_dim": 8, "v_dim": 8, "max_len": 40,
               "dropout": 0.0, "linear_dropout": 0.0, **variant}
    model = HSTU(HSTUConfig(**options), 50).train()
    lengths = torch.tensor(lengths)
    items = torch.randint(1, 51, (4, 40)) * (torch.arange(40)[None] < lengths[:, None])
    times = torch.cumsum(torch.randint(1, 10_000, (4, 40)), 1)
    batch = Batch(items=items, lengths=lengths, timestamps=times)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        with kernels.use_kernels(enabled):
            out = model(batch)
        real = torch.arange(40)[None] < lengths[:, None]
        (out[real] * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


@needs_compiler
@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_hashed_dropout_keeps_1_minus_p_independently(p):
    """The hashed mask: P(keep) = 1 - p in both 16-bit halves of each hash (elements 0-7 and 8-15 of a block),
    no correlation between neighbours or between blocks, and unrelated masks for nearby seeds."""
    kernel = _built()
    n = 1 << 20
    keep = (kernel.hashed_dropout(torch.ones(n), p, 5) != 0).float()
    sigma = math.sqrt(p * (1 - p) / (n / 2))
    halves = keep.view(-1, 2, 8)
    for half in (halves[:, 0], halves[:, 1]):
        assert abs(half.mean().item() - (1 - p)) < 5 * sigma
    for lag in (1, 8, 16):
        both = (keep[:-lag] * keep[lag:]).mean().item()
        assert abs(both - (1 - p) ** 2) < 5 * sigma, lag
    other = (kernel.hashed_dropout(torch.ones(n), p, 6) != 0).float()  # the next seed
    assert abs((keep * other).mean().item() - (1 - p) ** 2) < 5 * sigma


@needs_compiler
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 33])
def test_hashed_dropout_sizes_seeds_and_checks(n):
    kernel = _built()
    x = torch.randn(n)
    y = kernel.hashed_dropout(x, 0.5, 123)
    assert torch.equal(y, kernel.hashed_dropout(x, 0.5, 123))  # a function of (seed, index)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] * 2)
    if n >= 16:  # a prefix gets the same mask: the tail block is cut, not re-drawn
        assert torch.equal(kernel.hashed_dropout(x[:n - 1].contiguous(), 0.5, 123), y[:n - 1])
    assert torch.equal(kernel.hashed_dropout(x, 0.0, 9), x)
    with pytest.raises(RuntimeError, match="probability"):
        kernel.hashed_dropout(x, 1.0, 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel.hashed_dropout(torch.randn(4, 4).t(), 0.5, 1)


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


@needs_compiler
@pytest.mark.parametrize("C", [1, 5, 8, 50, 64, 65, 130])  # in registers up to 64, through memory above
def test_layer_norm_equals_torch(C):
    x = torch.randn(37, C) * 3 + 1
    got = _built().layer_norm(x, 1e-6)
    torch.testing.assert_close(got, F.layer_norm(x, (C,), eps=1e-6), atol=1e-5, rtol=1e-5)


@needs_compiler
def test_fused_layer_checks_its_inputs():
    kernel = _built()
    uvqk = torch.randn(10, 2 * 2 * 3 + 2 * 2 * 4)  # H = 2, dv = 3, dqk = 4
    none = torch.empty(0)
    with pytest.raises(RuntimeError, match="uvqk has 28 columns; expected 2 H dv \\+ 2 H dqk"):
        kernel.hstu_attention_gate(uvqk, torch.tensor([0]), torch.tensor([5]), none, 2, 4, 4, 1.0, 1.0, 1e-6, False)
    with pytest.raises(RuntimeError, match="batch row 1 runs past the projection"):
        kernel.hstu_attention_gate(uvqk, torch.tensor([0, 6]), torch.tensor([5, 5]), none, 2, 4, 3, 1.0, 1.0, 1e-6, False)
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32"):
        kernel.hstu_attention_gate(uvqk, torch.tensor([0]), torch.tensor([5]), torch.zeros(1, 4, 4), 2, 4, 3,
                                   1.0, 1.0, 1e-6, False)
    out = kernel.hstu_attention_gate(uvqk, torch.tensor([2]), torch.tensor([5]), none, 2, 4, 3, 1.0, 1.0, 1e-6, False)
    assert out[:2].abs().max() == 0 and out[7:].abs().max() == 0 and out[2:7].abs().max() > 0  # other rows zero
    # last_only: one row per batch row, equal to the full result at its last token; empty rows zero
    last = kernel.hstu_attention_gate(uvqk, torch.tensor([2, 0, 7]), torch.tensor([5, 0, 3]), none, 2, 4, 3,
                                      1.0, 1.0, 1e-6, True)
    full = kernel.hstu_attention_gate(uvqk, torch.tensor([2, 0, 7]), torch.tensor([5, 0, 3]), none, 2, 4, 3,
                                      1.0, 1.0, 1e-6, False)
    assert last.shape == (3, 6) and last[1].abs().max() == 0
    torch.testing.assert_close(last[[0, 2]], full[[6, 9]])


@needs_compiler
@pytest.mark.parametrize("M", [7, 8, 30])  # the longest row is 7: a table of exactly that reach, and longer
@pytest.mark.parametrize("last_only", [False, True])
def test_fused_layer_reads_a_relative_position_table_as_the_square_bias(M, last_only):
    """A (2 M - 1) table gives what its (1, L, L) Toeplitz bias gives (rows of mixed length, one empty)."""
    kernel = _built()
    g = torch.Generator().manual_seed(M)
    uvqk = torch.randn(14, 2 * 2 * 3 + 2 * 2 * 4, generator=g)  # H = 2, dv = 3, dqk = 4
    starts, lengths = torch.tensor([0, 7, 7, 11]), torch.tensor([7, 0, 4, 3])
    table = torch.randn(2 * M - 1, generator=g)
    i, j = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    square = table[j - i + M - 1][None].contiguous()
    args = (2, 4, 3, 0.5, 0.2, 1e-6, last_only)
    got = kernel.hstu_attention_gate(uvqk, starts, lengths, table, *args)
    want = kernel.hstu_attention_gate(uvqk, starts, lengths, square, *args)
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for bad in (table[:-1], torch.randn(11)):  # an even size; a table that does not reach back 7 positions
        with pytest.raises(RuntimeError, match="relative-position table of 2 M - 1 entries"):
            kernel.hstu_attention_gate(uvqk, starts, lengths, bad, *args)


@needs_compiler
def test_packed_attention_empty_batch_overlapping_rows_and_reproducible_shared_bias_gradient():
    """An empty batch (a DDP rank's empty slice) trains through the packed path; rows that share tokens are
    refused; a bias shared by the batch gets the same gradient bit for bit in every run (fixed summation)."""
    kernel = _built()
    H, d = 2, 4
    empty = torch.zeros(0, H, d, requires_grad=True)
    none = torch.zeros(0, dtype=torch.long)
    out = compiled_silu_attention(empty, empty, empty, torch.zeros(1, 5, 5), none, none)
    assert out.shape == (0, H, d)
    out.sum().backward()
    assert empty.grad.shape == (0, H, d)
    x = torch.randn(10, H, d)
    with pytest.raises(RuntimeError, match="share tokens"):
        kernel.causal_silu_attention(x, x, x, torch.empty(0), torch.tensor([4, 4]), torch.tensor([0, 3]))
    g = torch.Generator().manual_seed(8)
    B, L = 9, 33
    q, k, v, grad = (torch.randn(B, L, H, d, generator=g) for _ in range(4))
    bias = torch.randn(1, L, L, generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [kernel.causal_silu_attention_backward(q, k, v, bias, lengths, torch.empty(0), grad, True)[3]
                for _ in range(4)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@needs_compiler
def test_hashed_dropout_keeps_nan_and_is_twice_differentiable():
    kernel = _built()
    x = torch.full((64,), float("nan"))
    assert torch.isnan(kernel.hashed_dropout(x, 0.5, 3)).all()  # dropped NaN stays NaN, as in F.dropout
    from genrec.models.layers import dropout
    with kernels.use_kernels(True):
        t = torch.randn(200, requires_grad=True)
        torch.manual_seed(0)
        y = dropout(t, 0.3)
        (g,) = torch.autograd.grad((y ** 2).sum(), t, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), t)
    keep = (y != 0).float()
    torch.testing.assert_close(gg, 2 * keep / 0.7 ** 2)  # d/dt of 2 (t m / 0.7) m / 0.7


@needs_compiler
def test_compiled_inference_says_when_the_stack_runs_in_one_call():
    options = {"dim": 16, "num_blocks": 2, "num_heads": 2, "qk_dim": 8, "v_dim": 8, "max_len": 20}
    model = HSTU(HSTUConfig(**options, relative_bias="position"), 30).eval()
    assert model.compiled_inference()
    assert not model.train().compiled_inference()  # dropout: layer by layer
    model.eval().layers[1].dropout.train()  # one module in training mode is enough
    assert not model.compiled_inference()
    assert not HSTU(HSTUConfig(**options, relative_bias="position", ln_affine=True), 30).eval().compiled_inference()
    # a time-bias model's requests with timestamps go layer by layer (without them, the stack runs)
    assert not HSTU(HSTUConfig(**options, relative_bias="position_time"), 30).eval().compiled_inference()
    with kernels.use_kernels(False):
        assert not model.eval().compiled_inference()


@needs_compiler
def test_stack_without_timestamps_equals_the_stock_path_for_a_time_model(monkeypatch):
    """A time-bias model asked without timestamps runs the one-call stack with its position table, and
    gives what the stock path gives (a table reaching further than the longest row, rows of mixed length)."""
    torch.manual_seed(1)
    model = HSTU(HSTUConfig(dim=16, num_blocks=3, num_heads=2, qk_dim=8, v_dim=8, max_len=50), 40).eval()
    lengths = torch.tensor([30, 1, 12])
    batch = Batch(items=torch.randint(1, 41, (3, 30)) * (torch.arange(30)[None] < lengths[:, None]), lengths=lengths)
    with kernels.use_kernels(False), torch.no_grad():
        want = model.next_item_queries(batch)
    calls = _spy_on_kernel(monkeypatch)
    with torch.no_grad():
        got = model.next_item_queries(batch)
    assert calls == ["hstu_next_item_queries"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@needs_compiler
def test_attention_kernels_scale_output_and_gradient():
    """causal_silu_attention(..., scale) = scale * the unscaled output, and its backward with scale = the
    unscaled backward of scale * grad (HSTU folds its 1 / n normaliser in there)."""
    kernel = _built()
    torch.manual_seed(3)
    B, L, H, d = 3, 21, 2, 9
    q, k, v = (torch.randn(B, L, H, d) for _ in range(3))
    bias = torch.randn(1, L, L)
    lengths, none = torch.tensor([21, 5, 13]), torch.empty(0)
    plain = kernel.causal_silu_attention(q, k, v, bias, lengths, none)
    torch.testing.assert_close(kernel.causal_silu_attention(q, k, v, bias, lengths, none, 0.125), plain * 0.125)
    grad = torch.randn(B, L, H, d)
    want = kernel.causal_silu_attention_backward(q, k, v, bias, lengths, none, grad * 0.125, True)
    got = kernel.causal_silu_attention_backward(q, k, v, bias, lengths, none, grad, True, 0.125)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@needs_compiler
@pytest.mark.parametrize("attn_norm", ["max_len", "batch_max", "visible"])
def test_hstu_training_equals_the_stock_path(attn_norm, monkeypatch):
    """In training, HSTU through the compiled kernels (the normaliser folded into the attention kernels
    when it is one number) gives the stock path's outputs and gradients, on packed rows of mixed length."""
    from conftest import assert_same_output_and_grads, output_and_grads

    torch.manual_seed(0)
    cfg = HSTUConfig(dim=16, num_blocks=2, num_heads=2, qk_dim=8, v_dim=8, max_len=30, dropout=0.0,
                     linear_dropout=0.0, attn_norm=attn_norm, output="concat", relative_bias="position")
    model = HSTU(cfg, 40).train()  # "concat": the attention output reaches the model un-normalised too
    lengths = torch.tensor([30, 4, 17, 1])
    batch = Batch(items=torch.randint(1, 41, (4, 30)) * (torch.arange(30)[None] < lengths[:, None]), lengths=lengths)
    with kernels.use_kernels(False):
        want = output_and_grads(model, batch)
    model.zero_grad()
    calls = _spy_on_kernel(monkeypatch)
    got = output_and_grads(model, batch)
    assert calls.count("causal_silu_attention") == 2 and calls.count("causal_silu_attention_backward") == 2
    # the layer's middle from the raw projection: SiLU' over one (N, W) gradient in backward
    assert calls.count("silu_backward_") == 2
    assert_same_output_and_grads(got, want, batch.padding_mask, every_parameter=True)


@needs_compiler
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1003])
def test_silu_backward_in_place_equals_torch_for_float32_and_bfloat16_inputs(n):
    """silu_backward_(grad, x) writes grad * SiLU'(x) over grad, x float32 or bf16 (read as its float32
    value): against torch, tails of every length, NaN and extremes; bad inputs are refused."""
    kernel = _built()
    torch.manual_seed(n)
    x = torch.randn(n) * 6
    x[0] = float("nan") if n > 1 else x[0]
    x[-1] = -100.0
    grad = torch.randn(n)
    for xs in (x, x.bfloat16()):
        want = torch.ops.aten.silu_backward(grad, xs.float())
        g = grad.clone()
        got = kernel.silu_backward_(g, xs)
        assert got.data_ptr() == g.data_ptr() and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, equal_nan=True)
    with pytest.raises(RuntimeError, match="contiguous float32 or bfloat16"):
        kernel.silu_backward_(grad.clone(), x.double())
    with pytest.raises(RuntimeError, match="shaped as x"):
        kernel.silu_backward_(torch.zeros(n + 1), x)


@needs_compiler
@pytest.mark.parametrize("covered", [True, False])
def test_backward_kernel_writes_into_column_slices(covered):
    """causal_silu_attention_backward(..., into=[dq, dk, dv]) writes the gradients into the given views (column
    slices of one (N, W) buffer) and they equal the ones it allocates; tokens of no row get zero."""
    kernel = _built()
    torch.manual_seed(5)
    H, d = 2, 5
    lengths = torch.tensor([6, 3, 9])
    N = int(lengths.sum()) + (0 if covered else 4)  # not covered: 4 tokens at the end belong to no row
    starts = torch.tensor([0, 6, 9])
    q, k, v, grad = (torch.randn(N, H, d) for _ in range(4))
    bias = torch.randn(1, 9, 9)
    want = kernel.causal_silu_attention_backward(q, k, v, bias, lengths, starts, grad, True, 0.5)
    buf = torch.full((N, 4 * H * d), float("nan"))
    views = [buf[:, i * H * d:(i + 1) * H * d].view(N, H, d) for i in (2, 3, 1)]  # dq, dk, dv where Q, K, V sit
    got = kernel.causal_silu_attention_backward(q, k, v, bias, lengths, starts, grad, True, 0.5, views)
    for a, b, view in zip(got[:3], want[:3], views):
        assert a.data_ptr() == view.data_ptr()
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(got[3], want[3])
    assert torch.isnan(buf[:, :H * d]).all()  # U's columns untouched
    with pytest.raises(RuntimeError, match="shaped as q, k, v"):
        kernel.causal_silu_attention_backward(q, k, v, bias, lengths, starts, grad, True, 1.0, views[:2] + [q.double()])


@needs_compiler
@pytest.mark.parametrize("preset", ["reference", "production"])
@pytest.mark.parametrize("bf16_dots", [True, False], ids=["bf16-dots", "float32-kernels"])
def test_hstu_training_under_bf16_autocast_runs_the_kernels(preset, bf16_dots, monkeypatch):
    """Under CPU bf16 autocast the projections run in bf16 and the layer's middle runs compiled kernels, and
    outputs and gradients stay within bf16 rounding of the float32 model's. The reference layer takes the bf16
    dot-product kernels where the CPU has them (silu_attention_bf16: SiLU inside, bf16 gradient out), else
    the fused float32 middle; the production layer casts the projection back for the float32 attention kernel."""
    if bf16_dots and not _built().has_bf16_attention():
        pytest.skip("this CPU has no AVX512-BF16: the bf16 dot-product kernels are not built")
    torch.manual_seed(0)
    base = dict(dim=16, num_blocks=2, num_heads=2, qk_dim=8, v_dim=8, max_len=30, dropout=0.0, linear_dropout=0.0,
                relative_bias="position")
    cfg = HSTUConfig(**base) if preset == "reference" else HSTUConfig.production(**base)
    model = HSTU(cfg, 40).train()
    lengths = torch.tensor([30, 4, 17, 1])
    batch = Batch(items=torch.randint(1, 41, (4, 30)) * (torch.arange(30)[None] < lengths[:, None]), lengths=lengths)

    def run():
        model.zero_grad()
        out = model(batch)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = run()
    calls = _spy_on_kernel(monkeypatch, hide=() if bf16_dots else ("bf16",))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = run()
    if bf16_dots and preset == "reference":
        assert calls.count("silu_attention_bf16") == 2 and calls.count("silu_attention_bf16_backward") == 2
        assert "causal_silu_attention" not in calls and "silu_backward_" not in calls
    else:
        assert calls.count("causal_silu_attention") == 2 and calls.count("causal_silu_attention_backward") == 2
        assert (calls.count("silu_backward_") == 2) == (preset == "reference")
    assert got_grads.keys() == want_grads.keys()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    for name, g in want_grads.items():  # relative to each gradient's scale: bf16 keeps 8 bits
        torch.testing.assert_close(got_grads[name], g, atol=3e-2 * float(g.abs().max()), rtol=5e-2, msg=name)


def _split_attention_reference(raw, bias, lengths, starts, H, dqk, dv, scale):
    """(U, O): U, V, Q, K = split(SiLU(raw)) and O the causal SiLU attention of each row's tokens times scale,
    row by row over full masked scores; differentiable in raw and bias."""
    y = F.silu(raw)
    u, v, q, k = torch.split(y, [H * dv, H * dv, H * dqk, H * dqk], dim=-1)
    rows = []
    out = torch.zeros(raw.shape[0], H * dv, dtype=raw.dtype)
    for b, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        if n == 0:
            continue
        qh, kh, vh = (t[s:s + n].view(n, H, -1).transpose(0, 1) for t in (q, k, v))
        scores = qh @ kh.transpose(1, 2) + (bias[b if bias.shape[0] > 1 else 0, :n, :n] if bias is not None else 0)
        o = (F.silu(scores) * torch.ones(n, n, dtype=raw.dtype).tril()) @ vh
        rows.append((s, n, o.transpose(0, 1).reshape(n, H * dv) * scale))
    for s, n, o in rows:
        out = out.index_put((torch.arange(s, s + n),), o)
    return u, out


@pytest.mark.parametrize("H,dqk,dv,per_row,gap", [(2, 25, 25, False, 0), (1, 16, 8, True, 0), (2, 7, 9, False, 2),
                                                  (3, 33, 17, True, 1)])
def test_bf16_attention_kernels_match_float64_within_bf16_rounding(H, dqk, dv, per_row, gap):
    """silu_attention_bf16 and its backward (SiLU inside, bf16 dot products, the bf16 gradient of the raw
    projection written by the kernel) against the float64 computation on the same bf16 projection: SiLU(U)
    to float32 precision, the attention output, the projection's gradient and the bias gradient within bf16
    rounding (relative Frobenius error < 1e-2, observed ~3e-3); no dU gives zero in U's columns; tokens of
    no row get zero attention and gradient. Odd lengths, a row of one token, head widths that are not
    multiples of 8 or 16, and gaps between rows."""
    kernel = _built()
    if not kernel.has_bf16_attention():
        pytest.skip("this CPU has no AVX512-BF16: the bf16 dot-product kernels are not built")
    torch.manual_seed(1)
    lengths = torch.tensor([1, 37, 20, 5, 64, 17])
    starts = torch.cumsum(lengths + gap, 0) - lengths - gap
    N, W = int((lengths + gap).sum()), 2 * H * dv + 2 * H * dqk
    raw = (torch.randn(N, W) * 1.5).bfloat16()
    bias = torch.randn(6 if per_row else 1, 70, 70) * 0.3
    grad = torch.randn(N, H * dv)
    du = torch.randn(N, H * dv)
    u, out = kernel.silu_attention_bf16(raw, bias, lengths, starts, H, dqk, dv, 0.7)
    draw = torch.full_like(raw, 7.0)
    dbias = kernel.silu_attention_bf16_backward(raw, bias, lengths, starts, du, grad, True, 0.7, draw, H, dqk, dv)
    draw_no_du = torch.full_like(raw, 7.0)
    kernel.silu_attention_bf16_backward(raw, bias, lengths, starts, torch.empty(0), grad, False, 0.7, draw_no_du, H,
                                        dqk, dv)

    x = raw.double().requires_grad_()
    b = bias.double().requires_grad_()
    want_u, want = _split_attention_reference(x, b, lengths, starts, H, dqk, dv, 0.7)
    ((want * grad.double()).sum() + (want_u * du.double()).sum()).backward()

    def rel(got, ref):
        return float((got.double() - ref).norm() / ref.norm())

    assert out.dtype == u.dtype == torch.float32 and rel(out, want.detach()) < 1e-2
    assert rel(u, want_u.detach()) < 1e-4  # SiLU of every token, no bf16 rounding after it
    assert draw.dtype == torch.bfloat16 and rel(draw, x.grad) < 1e-2
    assert rel(dbias, b.grad) < 1e-2
    assert bool((draw_no_du[:, :H * dv] == 0).all()) and torch.equal(draw_no_du[:, H * dv:], draw[:, H * dv:])
    if gap:
        free = torch.ones(N, dtype=torch.bool)
        for s, n in zip(starts.tolist(), lengths.tolist()):
            free[s:s + n] = False
        assert bool((out[free] == 0).all()) and bool((draw[free, H * dv:] == 0).all())


def test_bf16_attention_kernels_check_their_inputs():
    kernel = _built()
    if not kernel.has_bf16_attention():
        pytest.skip("this CPU has no AVX512-BF16: the bf16 dot-product kernels are not built")
    lengths, starts = torch.tensor([3]), torch.tensor([0])
    raw = torch.randn(3, 2 * 2 * 4 + 2 * 2 * 4).bfloat16()
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel.silu_attention_bf16(raw.float(), torch.empty(0), lengths, starts, 2, 4, 4)
    with pytest.raises(RuntimeError, match="columns"):
        kernel.silu_attention_bf16(raw, torch.empty(0), lengths, starts, 2, 4, 5)
    with pytest.raises(RuntimeError, match="runs past"):
        kernel.silu_attention_bf16(raw, torch.empty(0), torch.tensor([4]), starts, 2, 4, 4)
    with pytest.raises(RuntimeError, match="draw"):
        kernel.silu_attention_bf16_backward(raw, torch.empty(0), lengths, starts, torch.empty(0), torch.zeros(3, 8),
                                            False, 1.0, torch.empty(3, 32), 2, 4, 4)


@needs_compiler
@pytest.mark.parametrize("C", [1, 7, 8, 50, 130])
@pytest.mark.parametrize("gated", [False, True])
def test_layer_norm_kernel_equals_the_module_with_gradients(C, gated, monkeypatch):
    """layers.layer_norm (the compiled one-pass norm, optionally gated: u * LN(x)) gives the module's output
    and the same gradients for x and u; widths below, at and above one vector, with a tail; and the kernel
    actually ran."""
    torch.manual_seed(C)
    norm = torch.nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
    x = (torch.randn(37, C) * 3 + 1).requires_grad_()
    u = torch.randn(37, C).requires_grad_() if gated else None
    grad = torch.randn(37, C)
    want = norm(x) * (u if gated else 1)
    want_grads = torch.autograd.grad((want * grad).sum(), [x, u] if gated else [x])
    calls = _spy_on_kernel(monkeypatch)
    got = layer_norm(x, norm, u)
    got_grads = torch.autograd.grad((got * grad).sum(), [x, u] if gated else [x])
    assert calls.count("layer_norm_train") == 1
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5)


def test_layer_norm_takes_the_module_where_the_kernel_does_not_apply(monkeypatch):
    """Affine parameters, a non-contiguous gate or a bf16 input: the module's path (no kernel call)."""
    calls = _spy_on_kernel(monkeypatch) if kernels.can_build() else []
    x = torch.randn(5, 8)
    affine = torch.nn.LayerNorm(8)
    torch.testing.assert_close(layer_norm(x, affine), affine(x))
    plain = torch.nn.LayerNorm(8, elementwise_affine=False)
    u = torch.randn(8, 5).t()  # a non-contiguous gate
    torch.testing.assert_close(layer_norm(x, plain, u), u * plain(x))
    torch.testing.assert_close(layer_norm(x.bfloat16(), plain).float(), plain(x.bfloat16()).float())
    assert "layer_norm_train" not in calls
