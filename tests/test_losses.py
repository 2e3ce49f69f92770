"""Losses against straightforward per-position reference implementations, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genrec.config import LossConfig
from genrec.losses import Loss, bce, draw_seed, full_softmax, in_batch, negative_scores, sampled_softmax
from genrec.models import kernels


def _inputs(N=9, D=4, num_items=12, seed=0, duplicates=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, D, generator=g)
    items = torch.randn(num_items + 1, D, generator=g)
    targets = torch.randint(1, num_items + 1, (N,), generator=g)
    if duplicates:
        targets[1] = targets[0]
        targets[4] = targets[0]
        targets[5] = targets[3]
    return q, targets, items


def _grads(fn, q, items):
    q, items = q.clone().requires_grad_(True), items.clone().requires_grad_(True)
    loss = fn(q, items)
    loss.backward()
    return loss.detach(), q.grad, items.grad


def _log_softmax_at(logits: list[float], index: int) -> torch.Tensor:
    t = torch.stack(logits) if isinstance(logits[0], torch.Tensor) else torch.tensor(logits)
    return t[index] - torch.logsumexp(t, 0)


# ----------------------------------------------------------------------------------------------
# full softmax


def _full_softmax_brute(q, targets, items, temperature):
    total = 0.0
    for n in range(len(q)):
        logits = [q[n] @ items[i] / temperature for i in range(1, len(items))]  # item 0 is never a candidate
        total = total - _log_softmax_at(logits, int(targets[n]) - 1)
    return total / len(q)


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 9, 100])
def test_full_softmax_chunking_matches_brute_force(chunk_size):
    q, targets, items = _inputs()
    got = _grads(lambda q, it: full_softmax(q, targets, it, 0.5, chunk_size=chunk_size), q, items)
    want = _grads(lambda q, it: _full_softmax_brute(q, targets, it, 0.5), q, items)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert got[2][0].abs().sum() == 0  # the padding row gets no gradient


def _full_softmax_plain(q, targets, items, temperature):
    logits = q @ items[1:].T / temperature
    return F.cross_entropy(logits, targets - 1)


def test_full_softmax_many_chunks_and_upstream_scale():
    """Gradients made in the forward pass are scaled by the upstream gradient, chunk boundaries included."""
    g = torch.Generator().manual_seed(3)
    q, items = torch.randn(1100, 8, generator=g), torch.randn(301, 8, generator=g)
    targets = torch.randint(1, 301, (1100,), generator=g)
    for chunk_size in (7, 512, 4096):  # internal cap: 512 rows per chunk
        got = _grads(lambda q, it: 3.0 * full_softmax(q, targets, it, 0.7, chunk_size=chunk_size), q, items)
        want = _grads(lambda q, it: 3.0 * _full_softmax_plain(q, targets, it, 0.7), q, items)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_full_softmax_scores_items_in_column_blocks(monkeypatch):
    """On CPU the logits are made a block of items at a time, straight into their columns: the same
    products as one matmul (several blocks and a partial one here), and the same loss and gradients."""
    import genrec.models.scoring as scoring

    g = torch.Generator().manual_seed(4)
    q, items = torch.randn(30, 8, generator=g), torch.randn(45, 8, generator=g)  # 6 blocks of 7 and one of 3
    monkeypatch.setattr(scoring, "SCORE_COLUMNS", 7)
    monkeypatch.setattr(scoring, "BLOCKED_FROM", 0)
    torch.testing.assert_close(scoring.scores_against(q, items), q @ items.T, atol=1e-6, rtol=1e-6)
    targets = torch.randint(1, 45, (30,), generator=g)
    got = _grads(lambda q, it: full_softmax(q, targets, it, 0.7), q, items)
    want = _grads(lambda q, it: _full_softmax_plain(q, targets, it, 0.7), q, items)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_full_softmax_gradient_to_one_input_only():
    q, targets, items = _inputs()
    items_only = items.clone().requires_grad_(True)
    full_softmax(q, targets, items_only, 0.5).backward()
    _, _, want = _grads(lambda q, it: _full_softmax_brute(q, targets, it, 0.5), q, items)
    torch.testing.assert_close(items_only.grad, want, atol=1e-5, rtol=1e-5)
    q_only = q.clone().requires_grad_(True)
    full_softmax(q_only, targets, items, 0.5).backward()
    _, want, _ = _grads(lambda q, it: _full_softmax_brute(q, targets, it, 0.5), q, items)
    torch.testing.assert_close(q_only.grad, want, atol=1e-5, rtol=1e-5)


def test_full_softmax_under_bf16_autocast():
    q, targets, items = _inputs(N=40, D=16, num_items=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(lambda q, it: full_softmax(q, targets, it, 0.5, chunk_size=16), q, items)
    want = _grads(lambda q, it: _full_softmax_plain(q, targets, it, 0.5), q, items)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)


def test_full_softmax_bf16_gradients_with_confident_targets():
    """Under bf16 autocast the gradient matmuls take softmax - one_hot formed in fp32: with targets of
    probability ~1 the two terms nearly cancel, and rounding them separately would swamp the gradient."""
    g = torch.Generator().manual_seed(8)
    items = F.normalize(torch.randn(1001, 16, generator=g), dim=-1)
    targets = torch.randint(1, 1001, (64,), generator=g)
    q = F.normalize(items[targets] + 0.05 * torch.randn(64, 16, generator=g), dim=-1)
    want = _grads(lambda q, it: _full_softmax_plain(q, targets, it, 0.05), q, items)
    assert want[0] < 0.05  # confident: the loss is near 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(lambda q, it: full_softmax(q, targets, it, 0.05), q, items)
        plain = _grads(lambda q, it: _full_softmax_plain(q, targets, it, 0.05), q, items)
    for a, p_, b in zip(got[1:], plain[1:], want[1:]):
        err, plain_err = ((a - b).norm() / b.norm()).item(), ((p_ - b).norm() / b.norm()).item()
        assert err < 0.1 and err < 2 * plain_err + 0.02, (err, plain_err)


def test_full_softmax_without_autograd_makes_no_gradients(monkeypatch):
    import genrec.losses as losses

    calls = []
    real = losses._softmax_pass
    monkeypatch.setattr(losses, "_softmax_pass", lambda *a, **k: calls.append(k["grads"]) or real(*a, **k))
    q, targets, items = _inputs()
    q.requires_grad_(True)
    with torch.no_grad():
        full_softmax(q, targets, items, 0.5)
    full_softmax(q.detach(), targets, items, 0.5)
    full_softmax(q, targets, items, 0.5)
    assert calls == [False, False, True]
    fp64 = full_softmax(q.detach().double(), targets, items.double(), 0.5)
    assert fp64.dtype == torch.float64
    torch.testing.assert_close(fp64, _full_softmax_brute(q.detach().double(), targets, items.double(), 0.5))


def test_full_softmax_no_grad_path():
    q, targets, items = _inputs()
    with torch.no_grad():
        chunked = full_softmax(q, targets, items, 0.2, chunk_size=2)
    torch.testing.assert_close(chunked, _full_softmax_brute(q, targets, items, 0.2), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# sampled softmax


def _sampled_brute(q, targets, items, negatives, temperature, log_q=None):
    total = 0.0
    for n in range(len(q)):
        t = int(targets[n])
        logits = [q[n] @ items[t] / temperature - (log_q[t] if log_q is not None else 0.0)]
        for r in negatives[n].tolist():
            if r == t:
                continue  # accidental hit: not a negative
            logits.append(q[n] @ items[r] / temperature - (log_q[r] if log_q is not None else 0.0))
        total = total - _log_softmax_at(logits, 0)
    return total / len(q)


@pytest.mark.parametrize("num_items,num_negatives", [(12, 5), (5, 8), (300, 2), (40, 19)])
@pytest.mark.parametrize("with_log_q", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_sampled_softmax_matches_loop_with_same_negatives(num_items, num_negatives, with_log_q, compiled):
    """Stock path (negatives from torch.randint) and compiled kernel (negatives hashed from a seed drawn from
    the same generator; log Q keeps the stock path) against the per-position loop on the same negatives."""
    if compiled and not kernels.can_build():
        pytest.skip("no C++ compiler (c++ or $CXX) or no ninja: the compiled loss cannot be built")
    q, targets, items = _inputs(N=37, D=11, num_items=num_items, seed=1)
    log_q = torch.log_softmax(torch.randn(num_items + 1), 0) if with_log_q else None
    with kernels.use_kernels(compiled):
        if compiled and not with_log_q:
            seed = draw_seed(torch.Generator().manual_seed(123))
            negatives = kernels.silu_attention().hashed_negatives(len(q), num_negatives, num_items, seed)
        else:
            negatives = torch.randint(1, num_items + 1, (len(q), num_negatives),
                                      generator=torch.Generator().manual_seed(123))
        if num_items == 5:  # a small catalogue: accidental hits must occur for the check to mean anything
            assert (negatives == targets[:, None]).any()
        got = _grads(lambda q, it: sampled_softmax(q, targets, it, num_items, num_negatives, 0.1, log_q,
                                                   generator=torch.Generator().manual_seed(123)), q, items)
    want = _grads(lambda q, it: _sampled_brute(q, targets, it, negatives, 0.1, log_q), q, items)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_hashed_negatives_are_uniform_and_independent():
    """The compiled loss's negatives: every item about equally often, rows of a seed unrelated to the next seed's."""
    if not kernels.can_build():
        pytest.skip("no C++ compiler (c++ or $CXX) or no ninja: the compiled loss cannot be built")
    with kernels.use_kernels(True):
        kernel = kernels.silu_attention()
    num_items, N, R = 50, 4000, 25
    neg = kernel.hashed_negatives(N, R, num_items, 9)
    assert neg.min() == 1 and neg.max() == num_items
    counts = torch.bincount(neg.reshape(-1), minlength=num_items + 1)[1:].double()
    expected = N * R / num_items
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 100  # 49 degrees of freedom: the 99.99th percentile is about 95
    assert torch.equal(neg, kernel.hashed_negatives(N, R, num_items, 9))
    assert (neg == kernel.hashed_negatives(N, R, num_items, 10)).double().mean() < 2.0 / num_items


@pytest.mark.parametrize("compiled", [False, True])
def test_sampled_softmax_uses_global_rng_when_no_generator(monkeypatch, compiled):
    if compiled and not kernels.can_build():
        pytest.skip("no C++ compiler (c++ or $CXX) or no ninja: the compiled loss cannot be built")
    with kernels.use_kernels(compiled):
        _check_global_rng(monkeypatch, compiled)


def _check_global_rng(monkeypatch, compiled):
    q, targets, items = _inputs(seed=2)
    drawn = {}
    real_randint = torch.randint

    def spy(*args, **kwargs):
        out = real_randint(*args, **kwargs)
        drawn["neg"] = out
        return out

    monkeypatch.setattr(torch, "randint", spy)
    torch.manual_seed(5)
    loss = sampled_softmax(q, targets, items, 12, 6, 0.3)
    negatives = drawn["neg"]
    if compiled:  # one seed drawn from the global generator, the negatives hashed from it
        assert negatives.shape == ()
        negatives = kernels.silu_attention().hashed_negatives(len(q), 6, 12, int(negatives))
    assert negatives.shape == (len(q), 6) and negatives.min() >= 1 and negatives.max() <= 12
    torch.testing.assert_close(loss, _sampled_brute(q, targets, items, negatives, 0.3), atol=1e-5, rtol=1e-5)
    torch.manual_seed(5)
    torch.testing.assert_close(sampled_softmax(q, targets, items, 12, 6, 0.3), loss, atol=0, rtol=0)


def test_sampled_softmax_all_negatives_are_hits():
    """With a single item every negative is the target: all are masked and the loss is zero."""
    q, _, items = _inputs(num_items=1, seed=3)
    targets = torch.ones(len(q), dtype=torch.long)
    loss = sampled_softmax(q, targets, items, num_items=1, num_negatives=4, temperature=0.05)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_negative_scores_equal_plain_autograd_with_unsampled_items():
    """Gathered forward and embedding-bag backward vs autograd over an explicit (N, R, D) gather; items
    that were never drawn (including the padding row) get exactly zero gradient."""
    g = torch.Generator().manual_seed(4)
    N, D, R, I = 6, 5, 3, 200
    q = torch.randn(N, D, generator=g, requires_grad=True)
    table = torch.randn(I + 1, D, generator=g, requires_grad=True)
    negatives = torch.randint(1, 20, (N, R), generator=g)  # only items 1..19 are drawn
    negatives[2] = negatives[2, 0]  # one position draws the same item three times
    weights = torch.arange(1.0, N * R + 1).view(N, R)
    got = negative_scores(q, table, negatives)
    ga = torch.autograd.grad((got * weights).sum(), [q, table])
    want = torch.stack([torch.stack([q[n] @ table[r] for r in negatives[n]]) for n in range(N)])
    gb = torch.autograd.grad((want * weights).sum(), [q, table])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert torch.all(ga[1][20:] == 0) and torch.all(ga[1][0] == 0)
    with torch.no_grad():  # the no-autograd path gives the same scores
        torch.testing.assert_close(negative_scores(q, table, negatives), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# in-batch negatives


def _in_batch_brute(q, targets, items, temperature, log_q=None):
    total = 0.0
    N = len(q)
    for n in range(N):
        logits, label = [], None
        for m in range(N):
            if m != n and targets[m] == targets[n]:
                continue  # a copy of the target is not a negative
            if m == n:
                label = len(logits)
            t = int(targets[m])
            logits.append(q[n] @ items[t] / temperature - (log_q[t] if log_q is not None else 0.0))
        total = total - _log_softmax_at(logits, label)
    return total / N


@pytest.mark.parametrize("with_log_q", [False, True])
def test_in_batch_matches_loop_and_masks_duplicate_targets(with_log_q):
    q, targets, items = _inputs(duplicates=True, seed=5)
    log_q = torch.log_softmax(torch.randn(len(items)), 0) if with_log_q else None
    got = _grads(lambda q, it: in_batch(q, targets, it, 2.0, log_q), q, items)
    want = _grads(lambda q, it: _in_batch_brute(q, targets, it, 2.0, log_q), q, items)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # without the duplicate mask the value would differ (the check above is meaningful)
    unmasked = F.cross_entropy((q @ items[targets].T) / 2.0 - (log_q[targets][None] if with_log_q else 0),
                               torch.arange(len(q)))
    assert abs(float(got[0]) - float(unmasked)) > 1e-3


# ----------------------------------------------------------------------------------------------
# binary cross-entropy


def test_bce_matches_loop():
    num_items = 4  # small, so accidental hits occur
    q, targets, items = _inputs(num_items=num_items, N=12, seed=6)
    negatives = torch.randint(1, num_items + 1, targets.shape, generator=torch.Generator().manual_seed(9))
    assert (negatives == targets).any()

    def brute(q, it):
        total = 0.0
        for n in range(len(q)):
            pos = q[n] @ it[targets[n]] / 0.5
            total = total - F.logsigmoid(pos)
            if negatives[n] != targets[n]:
                neg = q[n] @ it[negatives[n]] / 0.5
                total = total - F.logsigmoid(-neg)
        return total / len(q)

    got = _grads(lambda q, it: bce(q, targets, it, num_items, 0.5, generator=torch.Generator().manual_seed(9)),
                 q, items)
    want = _grads(brute, q, items)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# the Loss wrapper


def _hidden_and_targets(seed=7, B=3, L=5, D=4, num_items=12):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, D, generator=g) * 3
    targets = torch.randint(1, num_items + 1, (B, L), generator=g)
    targets[0, 3:] = 0
    targets[2, 1:] = 0
    table = torch.randn(num_items + 1, D, generator=g) * 2
    return hidden, targets, table


@pytest.mark.parametrize("name", ["full_softmax", "sampled_softmax", "in_batch", "bce"])
@pytest.mark.parametrize("l2_norm", [True, False])
def test_loss_wrapper_ignores_padding_targets(name, l2_norm):
    cfg = LossConfig(name=name, num_negatives=5, temperature=0.3, l2_norm=l2_norm, chunk_size=2)
    loss_fn = Loss(cfg, num_items=12)
    hidden, targets, table = _hidden_and_targets()
    h1 = hidden.clone().requires_grad_(True)
    torch.manual_seed(0)
    l1 = loss_fn(h1, targets, table)
    l1.backward()
    assert torch.all(h1.grad[targets == 0] == 0)
    assert h1.grad[targets > 0].abs().sum() > 0
    h2 = hidden.clone()
    h2[targets == 0] = torch.randn(int((targets == 0).sum()), hidden.shape[-1]) * 100
    torch.manual_seed(0)
    torch.testing.assert_close(loss_fn(h2, targets, table), l1.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["full_softmax", "sampled_softmax", "in_batch", "bce"])
def test_loss_wrapper_l2_norm(name):
    hidden, targets, table = _hidden_and_targets()
    valid = targets > 0
    q, t = hidden[valid], targets[valid]
    qn, tn = q / q.norm(dim=-1, keepdim=True), table / table.norm(dim=-1, keepdim=True)
    direct = {
        "full_softmax": lambda q, it: full_softmax(q, t, it, 0.3),
        "sampled_softmax": lambda q, it: sampled_softmax(q, t, it, 12, 5, 0.3),
        "in_batch": lambda q, it: in_batch(q, t, it, 0.3),
        "bce": lambda q, it: bce(q, t, it, 12, 0.3),
    }[name]
    for l2_norm, (qq, it) in [(True, (qn, tn)), (False, (q, table))]:
        loss_fn = Loss(LossConfig(name=name, num_negatives=5, temperature=0.3, l2_norm=l2_norm), num_items=12)
        torch.manual_seed(1)
        got = loss_fn(hidden, targets, table)
        torch.manual_seed(1)
        torch.testing.assert_close(got, direct(qq, it), atol=1e-5, rtol=1e-5)
    # cosine scoring is invariant to the scale of queries and items; dot scoring is not
    cos = Loss(LossConfig(name=name, num_negatives=5, temperature=0.3, l2_norm=True), num_items=12)
    dot = Loss(LossConfig(name=name, num_negatives=5, temperature=0.3, l2_norm=False), num_items=12)
    results = []
    for fn in (cos, dot):
        torch.manual_seed(2)
        a = fn(hidden, targets, table)
        torch.manual_seed(2)
        b = fn(hidden * 7, targets, table * 0.5)
        results.append(torch.allclose(a, b, atol=1e-5))
    assert results == [True, False]


def test_loss_wrapper_in_batch_logq_uses_training_frequencies():
    hidden, targets, table = _hidden_and_targets()
    counts = torch.arange(13) * 3
    counts[0] = 0
    loss_fn = Loss(LossConfig(name="in_batch", temperature=0.3, l2_norm=True, logq_correction=True), 12, counts)
    p = counts.float().clamp(min=1)
    log_q = torch.log(p / p.sum())
    valid = targets > 0
    q = F.normalize(hidden[valid], dim=-1)
    want = _in_batch_brute(q, targets[valid], F.normalize(table, dim=-1), 0.3, log_q)
    torch.testing.assert_close(loss_fn(hidden, targets, table), want, atol=1e-5, rtol=1e-5)


def test_loss_wrapper_unknown_name():
    hidden, targets, table = _hidden_and_targets()
    with pytest.raises(ValueError, match="unknown loss"):
        Loss(LossConfig(name="nope"), 12)(hidden, targets, table)


def test_sampled_softmax_logq_correction_is_a_noop_for_uniform_negatives():
    """BUG CHECK. losses/__init__.py says the sampled-softmax logQ correction is "a no-op for uniform
    sampling" and LossConfig.logq_correction says "subtract log sampling probability"; the negatives
    are drawn uniformly, yet ``Loss`` passes the items' *training frequencies* as log_q, which changes
    the objective. With uniform negatives, the correction must leave the loss unchanged."""
    hidden, targets, table = _hidden_and_targets()
    counts = torch.tensor([0, 100, 1, 1, 50, 1, 1, 1, 20, 1, 1, 1, 7])
    cfg = LossConfig(name="sampled_softmax", num_negatives=5, temperature=0.3)
    plain = Loss(cfg, 12, counts)
    corrected = Loss(LossConfig(**{**cfg.__dict__, "logq_correction": True}), 12, counts)
    torch.manual_seed(3)
    a = plain(hidden, targets, table)
    torch.manual_seed(3)
    b = corrected(hidden, targets, table)
    assert math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-6)


def test_loss_on_a_batch_without_targets_is_zero_with_gradients():
    from genrec.config import LossConfig
    from genrec.losses import Loss

    for name in ("sampled_softmax", "in_batch", "full_softmax", "bce"):
        hidden = torch.randn(2, 3, 4, requires_grad=True)
        table = torch.randn(6, 4, requires_grad=True)
        loss = Loss(LossConfig(name=name, num_negatives=3), 5)(hidden, torch.zeros(2, 3, dtype=torch.long), table)
        loss.backward()
        assert loss.item() == 0.0 and torch.all(hidden.grad == 0) and torch.all(table.grad == 0)


def test_negative_scores_chunking_is_exact(monkeypatch):
    """Both forwards (the sampled matmul, and the gather loop with partial chunks) equal plain autograd."""
    import genrec.losses as losses

    g = torch.Generator().manual_seed(5)
    q = torch.randn(50, 4, generator=g, requires_grad=True)
    table = torch.randn(11, 4, generator=g, requires_grad=True)
    negatives = torch.randint(1, 11, (50, 3), generator=g)
    negatives[0, 1] = negatives[0, 0]  # a repeated negative: its gradient must be counted twice
    weights = torch.randn(50, 3, generator=g)
    want = torch.einsum("nd,nrd->nr", q, table[negatives])
    gw = torch.autograd.grad((want * weights).sum(), [q, table])
    with torch.no_grad():
        torch.testing.assert_close(losses._sampled_scores(q, table, negatives), want)
    monkeypatch.setattr(losses, "_sampled_scores", losses._gather_multiply_sum)  # the loop path (bf16 takes it)
    for gather_chunk in (losses.GATHER_CHUNK, 7):  # 7: several chunks, the last one partial
        monkeypatch.setattr(losses, "GATHER_CHUNK", gather_chunk)
        got = negative_scores(q, table, negatives)
        gg = torch.autograd.grad((got * weights).sum(), [q, table])
        torch.testing.assert_close(got, want)
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("num_items", [300, 2**15 - 1, 2**15 + 5])
def test_negative_scores_item_gradient_with_either_sort_key(num_items):
    """Item gradients group the draws by item with a 2-byte sort key up to 2^15 rows, 4 bytes beyond."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(40, 3, generator=g, requires_grad=True)
    table = torch.randn(num_items + 1, 3, generator=g, requires_grad=True)
    negatives = torch.randint(1, num_items + 1, (40, 5), generator=g)
    negatives[3, :] = num_items  # the largest id, drawn repeatedly
    weights = torch.randn(40, 5, generator=g)
    got = torch.autograd.grad((negative_scores(q, table, negatives) * weights).sum(), [q, table])
    want = torch.autograd.grad((torch.einsum("nd,nrd->nr", q, table[negatives]) * weights).sum(), [q, table])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("num_items", [20, 3])  # 3: more draws per row than items (the gather path)
def test_negative_scores_under_bf16_autocast_and_tiny_catalogs(num_items):
    g = torch.Generator().manual_seed(7)
    q, table = torch.randn(30, 8, generator=g), torch.randn(num_items + 1, 8, generator=g)
    negatives = torch.randint(1, num_items + 1, (30, 6), generator=g)
    want = torch.einsum("nd,nrd->nr", q, table[negatives])
    torch.testing.assert_close(negative_scores(q, table, negatives), want)
    got = negative_scores(q.bfloat16(), table.bfloat16(), negatives).float()
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.02)


def test_compiled_sampled_softmax_propagates_nan():
    if not kernels.can_build():
        pytest.skip("no C++ compiler (c++ or $CXX) or no ninja: the compiled loss cannot be built")
    q, targets, items = _inputs(N=20, D=11, num_items=40, seed=2)
    q[3, 0] = float("nan")
    with kernels.use_kernels(True):
        loss = sampled_softmax(q, targets, items, 40, 9, 0.1)
    assert torch.isnan(loss)
