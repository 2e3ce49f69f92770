"""Sequence models: causality, padding invariance, row independence, HSTU parity with the reference equations."""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from genrec.data.batches import Batch
from genrec.models import HSTU, SASRec, build_model, kernels
from genrec.models.gru4rec import GRU4RecConfig
from genrec.models.hstu import HSTUConfig, RelativeBias, gather_scalars, toeplitz
from genrec.models.mamba4rec import Mamba4RecConfig
from genrec.models.sasrec import SASRecConfig

from conftest import assert_same_output_and_grads, output_and_grads

NUM_ITEMS = 30
ATOL = 1e-5

_HSTU_SMALL = HSTUConfig(dim=8, num_blocks=2, num_heads=2, qk_dim=4, v_dim=4, dropout=0.1, linear_dropout=0.1,
                         max_len=16)
CONFIGS = {
    "sasrec": SASRecConfig(dim=8, num_blocks=2, num_heads=2, ffn_dim=16, dropout=0.1, max_len=16),
    "hstu": _HSTU_SMALL,
    "hstu-silu-u": replace(_HSTU_SMALL, silu="u"),
    "hstu-attn-scale": replace(_HSTU_SMALL, attn_scale=True),
    "hstu-norm-visible": replace(_HSTU_SMALL, attn_norm="visible"),
    "hstu-norm-batch-max": replace(_HSTU_SMALL, attn_norm="batch_max"),
    "hstu-rab-none": replace(_HSTU_SMALL, relative_bias="none"),
    "hstu-rab-position": replace(_HSTU_SMALL, relative_bias="position"),
    "hstu-output-concat": replace(_HSTU_SMALL, output="concat"),
    "hstu-ln-affine": replace(_HSTU_SMALL, ln_affine=True),
    "hstu-production": HSTUConfig.production(dim=8, num_blocks=2, num_heads=2, qk_dim=4, v_dim=4, dropout=0.1,
                                             linear_dropout=0.1, max_len=16),
    # chunk_size 4 < the test lengths: the chunked scan carries state across chunks
    "mamba4rec": Mamba4RecConfig(dim=8, num_blocks=2, d_state=4, expand=2, head_dim=4, chunk_size=4, ffn_dim=16,
                                 dropout=0.1, max_len=16),
    "gru4rec": GRU4RecConfig(dim=8, hidden_size=12, num_layers=2, dropout=0.1, max_len=16),
}
# the batch-max normaliser makes a row depend on the other rows' lengths (by design)
ROW_INDEPENDENT = [k for k, c in CONFIGS.items() if getattr(c, "attn_norm", None) != "batch_max"]


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter away from its init (LayerNorm 1/0, tiny rab tables) so all of them matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if ".rab." in name:
                p.copy_(noise * 0.5)
            else:
                p.add_(noise * 0.2)
    return model


def make_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = randomise(build_model(CONFIGS[name], NUM_ITEMS), seed)
    return model.eval()


def make_batch(lengths, width: int | None = None, seed: int = 0, num_items: int = NUM_ITEMS) -> Batch:
    """Right-padded random batch with timestamps whose gaps span many log-time buckets."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.long)
    B, L = len(lengths), width or int(lengths.max())
    mask = torch.arange(L)[None, :] < lengths[:, None]
    items = torch.randint(1, num_items + 1, (B, L), generator=g) * mask
    gaps = (10 ** (torch.rand(B, L + 1, generator=g) * 6)).long() + 1  # 1 s .. ~11 days
    times = 1_600_000_000 + torch.cumsum(gaps, dim=1)
    return Batch(items=items, lengths=lengths, timestamps=times[:, :L] * mask, query_time=times[:, 1:] * mask)


def widen(batch: Batch, extra: int) -> Batch:
    pad = lambda t: torch.cat([t, torch.zeros(t.shape[0], extra, dtype=t.dtype)], dim=1)  # noqa: E731
    return Batch(items=pad(batch.items), lengths=batch.lengths, timestamps=pad(batch.timestamps),
                 query_time=pad(batch.query_time))


def clone(batch: Batch) -> Batch:
    return Batch(items=batch.items.clone(), lengths=batch.lengths.clone(), timestamps=batch.timestamps.clone(),
                 query_time=batch.query_time.clone())


def real_positions(batch: Batch) -> torch.Tensor:
    return batch.padding_mask


# ----------------------------------------------------------------------------------------------
# invariants, every model and every HSTU variant


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_causality(name, training):
    """No position sees a later one: in evaluation (the no-autograd paths) and in training (dropout masks,
    SASRec's dropout attention, HSTU's recomputing attention under autograd; with the same seed every
    dropout mask is the same)."""
    model = make_model(name).train(training)
    batch = make_batch([6, 4, 1, 5], seed=1)
    with torch.set_grad_enabled(training):
        torch.manual_seed(0)
        base = model(batch).detach()
        for t in range(batch.items.shape[1]):
            changed = clone(batch)
            rows = batch.lengths > t
            # a different item, a different time and a different query time at position t only
            changed.items[rows, t] = batch.items[rows, t] % NUM_ITEMS + 1
            changed.timestamps[rows, t] += 12345
            changed.query_time[rows, t] += 54321
            torch.manual_seed(0)
            out = model(changed)
            assert out.requires_grad == training
            out = out.detach()
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=ATOL, rtol=0)
            # and the change is visible at position t itself (the test can fail)
            assert not torch.allclose(out[rows, t], base[rows, t], atol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_extra_padding_columns_change_nothing(name):
    model = make_model(name)
    batch = make_batch([5, 2, 3], seed=2)
    with torch.no_grad():
        base = model(batch)
        wide = model(widen(batch, 4))
    mask = real_positions(batch)
    assert wide.shape[1] == base.shape[1] + 4
    torch.testing.assert_close(wide[:, :5][mask], base[mask], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_padding_content_changes_nothing(name):
    model = make_model(name)
    batch = widen(make_batch([5, 2, 3], seed=3), 2)
    noisy = clone(batch)
    pad = ~batch.padding_mask
    g = torch.Generator().manual_seed(7)
    noisy.items[pad] = torch.randint(1, NUM_ITEMS + 1, (int(pad.sum()),), generator=g)
    noisy.timestamps[pad] = torch.randint(0, 2_000_000_000, (int(pad.sum()),), generator=g)
    noisy.query_time[pad] = torch.randint(0, 2_000_000_000, (int(pad.sum()),), generator=g)
    with torch.no_grad():
        base, out = model(batch), model(noisy)
    mask = batch.padding_mask
    torch.testing.assert_close(out[mask], base[mask], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_row_does_not_depend_on_other_rows_content(name):
    """Holds for every variant (batch_max depends only on the other rows' lengths)."""
    model = make_model(name)
    batch = make_batch([4, 6, 2], seed=4)
    other = make_batch([4, 6, 2], seed=5)
    mixed = clone(other)
    for field in ("items", "timestamps", "query_time"):
        getattr(mixed, field)[0] = getattr(batch, field)[0]
    with torch.no_grad():
        a, b = model(batch), model(mixed)
    torch.testing.assert_close(a[0, :4], b[0, :4], atol=ATOL, rtol=0)
    assert not torch.allclose(a[1, :6], b[1, :6], atol=1e-4)


@pytest.mark.parametrize("name", ROW_INDEPENDENT)
def test_row_alone_equals_row_in_batch(name):
    model = make_model(name)
    batch = make_batch([3, 7, 5, 1], seed=6)
    with torch.no_grad():
        full = model(batch)
        for b, n in enumerate(batch.lengths.tolist()):
            alone = Batch(items=batch.items[b:b + 1, :n], lengths=batch.lengths[b:b + 1],
                          timestamps=batch.timestamps[b:b + 1, :n], query_time=batch.query_time[b:b + 1, :n])
            torch.testing.assert_close(model(alone)[0], full[b, :n], atol=ATOL, rtol=0)


def test_batch_max_normaliser_depends_on_batch_max_length():
    """The documented exception: with attn_norm="batch_max" a longer neighbour rescales the attention."""
    model = make_model("hstu-norm-batch-max")
    batch = make_batch([3, 7], seed=6)
    alone = Batch(items=batch.items[:1, :3], lengths=batch.lengths[:1], timestamps=batch.timestamps[:1, :3],
                  query_time=batch.query_time[:1, :3])
    with torch.no_grad():
        assert not torch.allclose(model(alone)[0], model(batch)[0, :3], atol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_padding_outputs_are_zero_and_length_is_checked(name):
    model = make_model(name)
    batch = widen(make_batch([3, 5], seed=8), 1)
    with torch.no_grad():
        out = model(batch)
    assert out.shape == (2, 6, 8)
    assert torch.all(out[~batch.padding_mask] == 0)
    too_long = make_batch([17], seed=0)
    with pytest.raises(ValueError, match="max_len"):
        model(too_long)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_item_vectors(name):
    torch.manual_seed(0)
    model = build_model(CONFIGS[name], NUM_ITEMS)
    table = model.item_vectors()
    assert table.shape == (NUM_ITEMS + 1, 8)
    assert torch.all(table[0] == 0)
    assert torch.all(table[1:].abs().sum(-1) > 0)


def test_build_model_types():
    assert isinstance(build_model(CONFIGS["sasrec"], 5), SASRec)
    assert isinstance(build_model(CONFIGS["hstu"], 5), HSTU)
    with pytest.raises(TypeError):
        build_model(object(), 5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dropout_active_only_in_training(name):
    model = make_model(name)
    batch = make_batch([5, 3], seed=9)
    with torch.no_grad():
        e1, e2 = model(batch), model(batch)
        model.train()
        t1, t2 = model(batch), model(batch)
    torch.testing.assert_close(e1, e2, atol=0, rtol=0)
    assert not torch.allclose(t1, t2)


# ----------------------------------------------------------------------------------------------
# HSTU parity with the reference equations, written as explicit loops


def _ln(x: torch.Tensor, weight=None, bias=None, eps: float = 1e-6) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.detach().double() + bias.detach().double()
    return y


def _silu(x):
    return x * torch.sigmoid(x)


def reference_hstu(model: HSTU, batch: Batch) -> torch.Tensor:
    cfg = model.cfg
    H, dqk, dv, D, M = cfg.num_heads, cfg.qk_dim, cfg.v_dim, cfg.dim, cfg.max_len
    B, L = batch.items.shape
    lengths = batch.lengths.tolist()
    E = model.item_embedding.weight.detach().double()
    P = model.position_embedding.weight.detach().double()
    x = torch.zeros(B, L, D, dtype=torch.float64)
    for b in range(B):
        for i in range(lengths[b]):
            x[b, i] = E[batch.items[b, i]] * math.sqrt(D) + P[i]
    use_time = cfg.relative_bias == "position_time" and batch.timestamps is not None
    for layer in model.layers:
        affine = cfg.ln_affine
        xn = _ln(x, layer.in_norm.weight if affine else None, layer.in_norm.bias if affine else None, cfg.ln_eps)
        h = xn @ layer.uvqk.detach().double()
        u, v = h[..., :H * dv], h[..., H * dv:2 * H * dv]
        q, k = h[..., 2 * H * dv:2 * H * dv + H * dqk], h[..., 2 * H * dv + H * dqk:]
        if cfg.silu == "uvqk":
            u, v, q, k = _silu(u), _silu(v), _silu(q), _silu(k)
        else:
            u = _silu(u)
        o = torch.zeros(B, L, H * dv, dtype=torch.float64)
        for b in range(B):
            for hd in range(H):
                for i in range(lengths[b]):
                    for j in range(i + 1):
                        s = float(q[b, i, hd * dqk:(hd + 1) * dqk] @ k[b, j, hd * dqk:(hd + 1) * dqk])
                        if cfg.attn_scale:
                            s /= math.sqrt(dqk)
                        if cfg.relative_bias != "none":
                            s += float(layer.rab.position.detach()[j - i + M - 1])
                        if use_time:
                            dt = abs(int(batch.query_time[b, i]) - int(batch.timestamps[b, j]))
                            bucket = min(max(math.floor(math.log(max(dt, 1)) / cfg.time_log_base), 0),
                                         cfg.num_time_buckets)
                            s += float(layer.rab.time.detach()[bucket])
                        if cfg.attn_norm == "max_len":
                            n = M
                        elif cfg.attn_norm == "visible":
                            n = i + 1
                        else:
                            n = max(lengths)
                        a = s / (1 + math.exp(-s)) / n
                        o[b, i, hd * dv:(hd + 1) * dv] += a * v[b, j, hd * dv:(hd + 1) * dv]
        lo = _ln(o, layer.attn_norm.weight if affine else None, layer.attn_norm.bias if affine else None, cfg.ln_eps)
        z = torch.cat([u, o, u * lo], dim=-1) if cfg.output == "concat" else u * lo
        y = z @ layer.out.weight.detach().double().T + layer.out.bias.detach().double() + x
        x = y * batch.padding_mask[..., None]
    if cfg.output_l2_norm:
        x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    return x




def _parity_batch() -> Batch:
    # L = 5, lengths 5 and 3; gaps from seconds to weeks so several time buckets are used
    items = torch.tensor([[3, 17, 8, 8, 25], [11, 2, 29, 0, 0]])
    ts = torch.tensor([[1_600_000_000, 1_600_000_007, 1_600_003_600, 1_600_090_000, 1_601_000_000],
                       [1_600_000_000, 1_600_000_100, 1_600_500_000, 0, 0]])
    qt = torch.tensor([[1_600_000_007, 1_600_003_600, 1_600_090_000, 1_601_000_000, 1_602_000_000],
                       [1_600_000_100, 1_600_500_000, 1_600_500_002, 0, 0]])
    return Batch(items=items, lengths=torch.tensor([5, 3]), timestamps=ts, query_time=qt)


_PARITY_SIZE = dict(dim=8, num_heads=2, qk_dim=4, v_dim=4, dropout=0.0, linear_dropout=0.0, max_len=6,
                    relative_bias="position_time")
PARITY_BASE = HSTUConfig(**_PARITY_SIZE)
PARITY_CASES = {
    "reference-1-layer": replace(PARITY_BASE, num_blocks=1),
    "reference-2-layers": replace(PARITY_BASE, num_blocks=2),
    "visible-2-layers": replace(PARITY_BASE, num_blocks=2, attn_norm="visible"),
    "production-1-layer": HSTUConfig.production(num_blocks=1, **_PARITY_SIZE),
    "production-2-layers": HSTUConfig.production(num_blocks=2, **_PARITY_SIZE),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_hstu_parity_with_reference_equations(case):
    cfg = PARITY_CASES[case]
    if case.startswith("production"):
        assert (cfg.silu, cfg.attn_scale, cfg.attn_norm, cfg.output, cfg.ln_affine) == (
            "u", True, "batch_max", "concat", True)
    torch.manual_seed(0)
    model = randomise(HSTU(cfg, NUM_ITEMS), seed=1).eval()
    batch = _parity_batch()
    with torch.no_grad():
        out = model(batch)
    ref = reference_hstu(model, batch)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_hstu_time_bias_is_used_and_falls_back_without_timestamps():
    cfg = replace(PARITY_BASE, num_blocks=2)
    torch.manual_seed(0)
    model = randomise(HSTU(cfg, NUM_ITEMS), seed=1).eval()
    batch = _parity_batch()
    no_time = Batch(items=batch.items, lengths=batch.lengths)
    pos_only = HSTU(replace(cfg, relative_bias="position"), NUM_ITEMS).eval()
    missing, unexpected = pos_only.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.endswith("rab.time") for k in unexpected)
    with torch.no_grad():
        with_time, without = model(batch), model(no_time)
        assert not torch.allclose(with_time, without, atol=1e-4)
        torch.testing.assert_close(without, pos_only(no_time), atol=1e-6, rtol=0)


def test_hstu_gradients_reach_relative_bias_tables():
    cfg = replace(PARITY_BASE, num_blocks=2)
    torch.manual_seed(0)
    model = randomise(HSTU(cfg, NUM_ITEMS), seed=1).eval()
    out = model(_parity_batch())
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    for layer in model.layers:
        assert layer.rab.position.grad is not None and layer.rab.position.grad.abs().sum() > 0
        assert layer.rab.time.grad is not None and layer.rab.time.grad.abs().sum() > 0
        # only relative positions j - i <= 0 are ever used: the future half of the table gets no gradient
        assert torch.all(layer.rab.position.grad[cfg.max_len:] == 0)


@pytest.mark.parametrize("L, max_len", [(1, 1), (1, 5), (4, 5), (5, 5), (200, 200)])
def test_toeplitz_equals_the_relative_index_gather(L, max_len):
    """The inference bias (strided windows) is the training bias (gather at j - i + max_len - 1)."""
    table = torch.randn(2 * max_len - 1, generator=torch.Generator().manual_seed(L))
    i, j = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
    assert torch.equal(toeplitz(table, L), table[j - i + max_len - 1])
    with pytest.raises(ValueError, match="reaches"):
        toeplitz(table, max_len + 1)


def test_relative_bias_is_the_same_with_and_without_autograd():
    rab = RelativeBias(max_len=6, use_time=False, num_buckets=4, base=0.3)
    with torch.no_grad():
        inference = rab(5, None)
    assert torch.equal(inference, rab(5, None).detach())


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 4, 4)])
def test_gather_scalars_backward_matches_autograd(shape):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(9, generator=g)
    index = torch.randint(0, 9, shape, generator=g)  # many repeats
    weight = torch.randn(shape, generator=g)
    a = table.clone().requires_grad_(True)
    b = table.clone().requires_grad_(True)
    ya, yb = gather_scalars(a, index), b[index]
    torch.testing.assert_close(ya, yb, atol=0, rtol=0)
    (ya * weight).sum().backward()
    (yb * weight).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)
    assert a.grad.abs().sum() > 0


def test_gather_scalars_backward_under_broadcast():
    """Used as bias[None] + scores: the broadcast batch dimension must be summed into the table gradient."""
    g = torch.Generator().manual_seed(1)
    table = torch.randn(11, generator=g)
    index = torch.randint(0, 11, (4, 4), generator=g)
    other = torch.randn(3, 4, 4, generator=g)
    a = table.clone().requires_grad_(True)
    b = table.clone().requires_grad_(True)
    (torch.sin(gather_scalars(a, index)[None] + other)).sum().backward()
    (torch.sin(b[index][None] + other)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sasrec", "hstu", "mamba4rec", "bert4rec"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    from genrec.data.batches import Batch
    from genrec.models import BERT4Rec, BERT4RecConfig, HSTU, HSTUConfig, Mamba4Rec, SASRec, SASRecConfig

    def build():
        torch.manual_seed(0)
        if name == "sasrec":
            return SASRec(SASRecConfig(dim=8, num_heads=2, ffn_dim=8, max_len=6, dropout=0.3), 20)
        if name == "mamba4rec":
            return Mamba4Rec(replace(CONFIGS["mamba4rec"], dropout=0.3), 20)
        if name == "bert4rec":
            return BERT4Rec(BERT4RecConfig(dim=8, num_heads=2, ffn_dim=8, max_len=6, dropout=0.3, attn_dropout=0.3), 20)
        return HSTU(HSTUConfig(dim=8, num_heads=2, qk_dim=4, v_dim=4, max_len=6, dropout=0.3, linear_dropout=0.3), 20)

    # mostly padding, so the packed tokens and length groups are what gets checkpointed
    batch = Batch(items=torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0], [7, 0, 0, 0]]), lengths=torch.tensor([4, 2, 1]),
                  cloze=name == "bert4rec")
    grads = []
    for ckpt in (False, True):
        model = build().train()
        model.grad_checkpointing = ckpt
        torch.manual_seed(1)  # same dropout masks; checkpointing replays them in the recomputation
        model(batch).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


@pytest.mark.parametrize("tile", [1 << 18, 1, 3000])  # one tile; one batch row per tile; a few
@pytest.mark.parametrize("bias_rows", [0, 1, 3])  # no bias, shared bias (position) or per batch row (time)
@pytest.mark.parametrize("L,block", [(150, 64), (150, 7), (10, 64), (64, 64), (65, 64), (1, 64)])
@pytest.mark.parametrize("jagged", [False, True])  # with lengths: rows sorted, tiles stop at their longest row
def test_blocked_causal_attention_equals_full(L, block, tile, bias_rows, jagged):
    """Tiled forward and the recomputing backward equal plain autograd over the full masked L x L scores."""
    from genrec.models.hstu import causal_silu_attention

    g = torch.Generator().manual_seed(L + block)
    B, H = 3, 3
    lengths = torch.tensor([max(1, L // 3), L, max(1, L - 5)])  # unsorted, one full row
    # q, k, v are strided views of one (B, L, H * (4 + 4 + 5)) projection, as in the layer
    proj = torch.randn(B, L, H * 13, generator=g)
    with torch.no_grad():  # large scores must not leak through the mask
        proj[..., 0] *= 1e3
    proj.requires_grad_(True)
    q, k, v = torch.split(proj, [H * 4, H * 4, H * 5], dim=-1)
    q, k, v = q.view(B, L, H, 4), k.view(B, L, H, 4), v.view(B, L, H, 5)
    bias = torch.randn(bias_rows, L, L, generator=g, requires_grad=True) if bias_rows else None
    lens = lengths if jagged else None
    with kernels.use_kernels(False):  # the stock tiles (tests/test_kernels.py: the compiled forward)
        got = causal_silu_attention(q, k, v, bias, lens, block=block, tile=tile)  # (B, L, H, 5)
    mask = torch.ones(L, L).tril()
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
    scores = qh @ kh.transpose(-1, -2) + (bias[:, None] if bias is not None else 0)
    want = ((F.silu(scores) * mask) @ vh).transpose(1, 2)
    real = (torch.arange(L)[None, :] < lengths[:, None])[:, :, None, None] if jagged else torch.ones(1, 1, 1, 1)
    torch.testing.assert_close(got * real, want * real, atol=1e-3, rtol=1e-4)
    with torch.no_grad(), kernels.use_kernels(False):
        torch.testing.assert_close(causal_silu_attention(q, k, v, bias, lens, block=block, tile=tile) * real,
                                   want * real, atol=1e-3, rtol=1e-4)
    inputs = [proj] + ([bias] if bias is not None else [])
    weights = torch.randn(got.shape, generator=g) * real  # padding outputs carry no gradient
    ga = torch.autograd.grad((got * weights).sum(), inputs)
    gb = torch.autograd.grad((want * weights).sum(), inputs)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-4)


@pytest.mark.parametrize("name", ["hstu", "hstu-production", "hstu-norm-visible", "sasrec", "mamba4rec"])
def test_packed_tokens_equal_padded_tokens(name, monkeypatch):
    """Per-token work on packed real tokens (random batches) equals the padded layout, with gradients."""
    import genrec.models.layers as layers

    batch = make_batch([9, 2, 5, 1], seed=11)
    results = []
    for threshold in (0.0, 2.0):  # never pack / always pack
        monkeypatch.setattr(layers, "PACK_BELOW", threshold)
        results.append(output_and_grads(make_model(name), batch))
    assert_same_output_and_grads(results[1], results[0], batch.padding_mask)


def test_gru4rec_packed_sequence_equals_the_padded_recurrence():
    """GRU4Rec steps only through each row's real events on a batch of mixed lengths: the same outputs
    and gradients as stepping through the whole padded batch (the static-shape path)."""
    from genrec.models.layers import static_shapes

    batch = make_batch([9, 2, 5, 1, 9], seed=12)
    results = []
    for static in (True, False):
        with static_shapes() if static else contextlib.nullcontext():
            results.append(output_and_grads(make_model("gru4rec"), batch))
    assert_same_output_and_grads(results[1], results[0], batch.padding_mask, every_parameter=True)


@pytest.mark.parametrize("group", [1, 2, 16])
def test_in_length_groups_equals_the_whole_batch(group):
    """Rows in any order, groups cut to their longest row: the same result as the whole padded batch for
    a function that works along each row, and zero past each group's longest row; gradients too."""
    from genrec.models.layers import in_length_groups

    lengths = torch.tensor([3, 7, 1, 7, 2, 5])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    seen = []

    def along_rows(part, part_lengths):  # a running sum over each row's real positions
        seen.append((part.shape[1], part_lengths.tolist()))
        real = torch.arange(part.shape[1])[None, :, None] < part_lengths[:, None, None]
        return torch.cumsum(part * real, dim=1) * real

    got = in_length_groups(along_rows, x, lengths, group)
    real = (torch.arange(9)[None, :] < lengths[:, None])[..., None]
    want = torch.cumsum(x * real, dim=1) * real
    torch.testing.assert_close(got, want)
    assert all(m == max(n) for m, n in seen)  # each group cut to its longest row
    assert len(seen) == -(-6 // group)
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad((got * w).sum(), x)[0], torch.autograd.grad((want * w).sum(), x)[0])


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("lengths", [[6, 4, 1, 5], [5, 5]])  # packed tokens / full rows
def test_next_item_queries_equal_forward_at_the_last_event(name, lengths):
    from genrec.models import next_item_queries

    model = make_model(name)
    batch = make_batch(lengths, seed=12)
    with torch.no_grad():
        want = model(batch)[torch.arange(len(lengths)), batch.lengths - 1]
        torch.testing.assert_close(next_item_queries(model, batch), want, atol=1e-5, rtol=1e-5)
