"""Retrieval indexes: exact top-K equals brute force (with exclusions); FAISS agrees with exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrec.infer.index import ExactIndex, build_index


def table(n=500, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n + 1, d, generator=g)
    v[0] = 100.0  # the padding row scores highest: it must never come back
    return v


def brute(v, q, k, exclude):
    s = q @ v.T
    s[:, 0] = -torch.inf
    for b, e in enumerate(exclude or []):
        s[b, torch.as_tensor(e, dtype=torch.long)] = -torch.inf
    top = torch.topk(s, k, dim=1)
    return top.values, top.indices


@pytest.mark.parametrize("chunk", [65536, 37])  # one chunk; many, the last partial
def test_exact_index_equals_brute_force(chunk):
    v, q = table(), torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    exclude = [np.array([], dtype=np.int64)] + [np.random.default_rng(b).choice(np.arange(1, 501), 40, replace=False)
                                                for b in range(5)]
    got_s, got_i = ExactIndex(v, chunk=chunk).search(q, 20, exclude)
    want_s, want_i = brute(v, q, 20, exclude)
    torch.testing.assert_close(got_s, want_s)
    assert torch.equal(got_i, want_i)
    assert not (got_i == 0).any()


def test_exact_index_runs_out_of_candidates():
    v = table(n=5)
    s, i = ExactIndex(v).search(torch.ones(1, 16), 5, [np.array([1, 2, 3])])
    assert i[0, :2].tolist() != [0, 0] and i[0, 2:].tolist() == [0, 0, 0] and torch.isinf(s[0, 2:]).all()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_faiss_index_matches_exact(kind):
    pytest.importorskip("faiss", reason="the optional faiss-cpu package (genrec[ann]) is not installed")
    v, q = table(n=2000), torch.randn(20, 16, generator=torch.Generator().manual_seed(2))
    exclude = [np.arange(1, 30)] * 20
    index = build_index(v, kind, **({"nlist": 16, "nprobe": 16} if kind == "ivf" else {}))
    got_s, got_i = index.search(q, 10, exclude)
    want_s, want_i = brute(v, q, 10, exclude)
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(got_i, want_i)])
    assert recall >= 0.95  # nprobe = nlist makes IVF exact; HNSW with a large efSearch on 2,000 items
    assert not np.isin(got_i.numpy(), np.arange(0, 30)).any()  # neither padding nor excluded ids


def test_unknown_kind_is_an_error():
    pytest.importorskip("faiss", reason="the optional faiss-cpu package (genrec[ann]) is not installed")
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index(table(), "lsh")
