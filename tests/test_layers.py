"""The shared building blocks: the fast CPU dropout and SASRec's dropout attention."""

import math

import pytest
import torch
import torch.nn.functional as F

from genrec.models import kernels
from genrec.models.layers import Dropout, dropout, keep_mask
from genrec.models.sasrec import dropout_attention


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_keep_mask_probability_in_both_halves_of_each_random_word(p):
    torch.manual_seed(0)
    n = 1 << 20
    keep = keep_mask((n,), p).float()
    sigma = math.sqrt(p * (1 - p) / (n / 2))
    # even and odd positions come from the low and high 32 bits of each 64-bit draw
    for half in (keep[0::2], keep[1::2]):
        assert abs(half.mean().item() - (1 - p)) < 5 * sigma
    # neighbouring positions are independent (no bit reuse between the two halves)
    both = (keep[0::2] * keep[1::2]).mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * sigma


def test_keep_mask_shapes_and_extremes():
    assert keep_mask((3, 5, 7), 0.3).shape == (3, 5, 7)  # odd element count
    assert keep_mask((1000,), 0.0).all()
    assert keep_mask((0,), 0.5).numel() == 0


@pytest.mark.parametrize("compiled", [False, True])
def test_dropout_forward_backward_and_modes(compiled):
    """Both masks: the bulk-integer one (kernels off) and the compiled hashed one (skipped without a compiler)."""
    if compiled and not kernels.can_build():
        pytest.skip("no C++ compiler (c++ or $CXX) or no ninja: the compiled dropout cannot be built")
    with kernels.use_kernels(compiled):
        assert (kernels.silu_attention() is not None) == compiled
        _check_dropout()


def _check_dropout():
    x = torch.randn(400, 300, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.25)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)  # kept entries scaled by 1 / (1 - p)
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    (g,) = torch.autograd.grad((y * 2).sum(), [x])
    torch.testing.assert_close(g, kept.float() * 2 / 0.75)  # backward uses the same mask
    torch.manual_seed(1)
    again = dropout(x, 0.25)
    torch.testing.assert_close(again, y)  # seeded: reproducible
    assert dropout(x, 0.25, training=False) is x and dropout(x, 0.0) is x
    module = Dropout(0.4).eval()
    assert module(x) is x
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.5)


def test_dropout_attention_equals_sdpa_without_dropout_and_applies_a_mask_with_it():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 2, 9, 4, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(dropout_attention(q, k, v, 0.0), want)
    torch.manual_seed(3)
    got = dropout_attention(q, k, v, 0.3)
    # reference: causal softmax weights, the same mask (same seed, same shape), scaled
    scores = (q @ k.transpose(-1, -2)) / 2.0
    weights = torch.softmax(scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf")), -1)
    torch.manual_seed(3)
    mask = dropout(torch.ones(3, 2, 9, 9), 0.3) * 0.7  # the mask the same seed gives (hashed or bulk integers)
    assert 0 < mask.sum() < mask.numel()
    torch.testing.assert_close(got, (weights * mask / 0.7) @ v)
