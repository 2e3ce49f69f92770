"""Candidate scoring in one pass (M-FALCON) equals scoring each candidate separately."""

from __future__ import annotations

import pytest
import torch

from genrec.data.batches import Batch
from genrec.infer.candidates import candidate_scores, candidate_states
from test_hstu_cache import VARIANTS, model_for


def separately(model, items, times, candidate, t_c):
    """The model's state at the candidate's position when it is appended alone (the reference)."""
    seq = torch.cat([items, candidate[None]])
    ts = torch.cat([times, torch.tensor([t_c])])
    qt = torch.cat([ts[1:], torch.tensor([t_c])])  # the history's last event is followed by the candidate
    batch = Batch(items=seq[None], lengths=torch.tensor([len(seq)]), timestamps=ts[None], query_time=qt[None])
    return model(batch)[0, -1]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("n,micro_batch", [(1, 256), (9, 4), (15, 3)])  # up to max_len - 1; several micro-batches
def test_candidate_states_equal_separate_forward_passes(name, n, micro_batch):
    model = model_for(VARIANTS[name])
    g = torch.Generator().manual_seed(n)
    items = torch.randint(1, 31, (n,), generator=g)
    times = 1_600_000_000 + torch.cumsum((10 ** (torch.rand(n, generator=g) * 5)).long() + 1, 0)
    candidates = torch.tensor([3, 17, 3, 29, 1, 8, 22, 11, 5, 30])  # a repeated candidate too
    t_c = int(times[-1]) + 7200
    got = candidate_states(model, items, candidates, times, query_time=t_c, micro_batch=micro_batch)
    want = torch.stack([separately(model, items, times, c, t_c) for c in candidates])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], got[2])  # candidates never see each other
    # and the history's time matters when the model uses it: another show time, other states
    if VARIANTS[name].relative_bias == "position_time":
        other = candidate_states(model, items, candidates, times, query_time=t_c + 10**7, micro_batch=micro_batch)
        assert not torch.allclose(other, got, atol=1e-4)


def test_candidate_limits():
    model = model_for(VARIANTS["reference"])
    items = torch.randint(1, 31, (16,))
    with pytest.raises(ValueError, match="exceed model.max_len"):
        candidate_states(model, items, torch.tensor([1, 2]))
    assert candidate_states(model, items[:3], torch.tensor([], dtype=torch.long)).shape == (0, 8)


@pytest.mark.parametrize("micro_batch", [3, 256])
def test_candidate_scores_equal_the_head_on_separate_passes(micro_batch):
    """A two-task ranking head over the candidates' states: the one-pass scores are the head applied to each
    candidate's own forward pass, in the candidates' order, one micro-batch at a time."""
    model = model_for(VARIANTS["reference"])
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(model.cfg.dim, 2), torch.nn.Sigmoid())
    calls = []
    counted = lambda states: calls.append(len(states)) or head(states)  # noqa: E731
    g = torch.Generator().manual_seed(5)
    items = torch.randint(1, 31, (9,), generator=g)
    times = 1_600_000_000 + torch.cumsum(torch.randint(1, 10**5, (9,), generator=g), 0)
    candidates = torch.tensor([4, 19, 4, 27, 2, 12, 30])
    got = candidate_scores(model, items, candidates, counted, times, micro_batch=micro_batch)
    with torch.no_grad():
        want = head(torch.stack([separately(model, items, times, c, int(times[-1])) for c in candidates]))
    assert got.shape == (7, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert calls == ([3, 3, 1] if micro_batch == 3 else [7])
    assert candidate_scores(model, items, candidates[:0], head).shape == (0, 2)
