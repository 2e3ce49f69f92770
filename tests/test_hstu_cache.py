"""HSTU cached inference: appending events to a key/value cache equals a full recompute."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from genrec.data.batches import Batch
from genrec.infer.hstu_cache import extend
from genrec.models import HSTU
from genrec.models.hstu import HSTUConfig

BASE = HSTUConfig(dim=8, num_blocks=3, num_heads=2, qk_dim=4, v_dim=4, max_len=16)
VARIANTS = {"reference": BASE, "position-only": replace(BASE, relative_bias="position"),
            "no-bias": replace(BASE, relative_bias="none"), "visible": replace(BASE, attn_norm="visible"),
            "production-like": replace(BASE, silu="u", attn_scale=True, output="concat", ln_affine=True)}


def model_for(cfg, seed=0):
    torch.manual_seed(seed)
    model = HSTU(cfg, 30)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    return model.eval()


def full(model, items, times, query_time):
    """next_item_queries of the whole history (the reference)."""
    L = len(items)
    qt = torch.cat([times[1:], torch.tensor([query_time])])
    batch = Batch(items=items[None], lengths=torch.tensor([L]), timestamps=times[None], query_time=qt[None])
    return model.next_item_queries(batch)[0]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("splits", [[12], [7, 5], [1, 1, 1, 9], [4, 4, 4]])
def test_cache_equals_recompute(name, splits):
    model = model_for(VARIANTS[name])
    g = torch.Generator().manual_seed(3)
    items = torch.randint(1, 31, (12,), generator=g)
    times = 1_600_000_000 + torch.cumsum((10 ** (torch.rand(12, generator=g) * 5)).long() + 1, 0)
    target_time = int(times[-1]) + 3600
    cache, start = None, 0
    for i, n in enumerate(splits):
        end = start + n
        last = i == len(splits) - 1
        q, cache = extend(model, cache, items[start:end], times[start:end],
                          query_time=target_time if last else None)
        # after each step the query equals a recompute of the history so far
        want = full(model, items[:end], times[:end], target_time if last else int(times[end - 1]))
        torch.testing.assert_close(q, want, atol=1e-5, rtol=1e-5)
        start = end
    assert cache.length == 12


def test_cache_limits_and_errors():
    model = model_for(BASE)
    items, times = torch.arange(1, 17), torch.arange(16) * 60 + 1_600_000_000
    _, cache = extend(model, None, items, times)
    with pytest.raises(ValueError, match="exceed model.max_len"):
        extend(model, cache, torch.tensor([3]), torch.tensor([1_700_000_000]))
    with pytest.raises(ValueError, match="batch_max"):
        extend(model_for(replace(BASE, attn_norm="batch_max")), None, items[:3], times[:3])
    with pytest.raises(ValueError, match="eval mode"):
        extend(model.train(), None, items[:3], times[:3])
