"""Recommender: raw ids in and out, and the same query vectors as evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrec.config import load_config
from genrec.data.batches import eval_batch
from genrec.data.split import leave_one_out
from genrec.data.store import SequenceStore
from genrec.eval.ranking import last_hidden
from genrec.infer.recommender import Recommender
from genrec.train.trainer import train


@pytest.fixture(scope="module")
def hstu_run(tiny_data_dir, tmp_path_factory):
    cfg = load_config(base={
        "data": {"path": str(tiny_data_dir), "max_len": 12},
        "model": {"name": "hstu", "dim": 16, "num_blocks": 2, "num_heads": 2, "qk_dim": 8, "v_dim": 8},
        "loss": {"num_negatives": 16},
        "train": {"epochs": 2, "batch_size": 64, "threads": 1},
        "eval": {"ks": [10]},
    })
    run = tmp_path_factory.mktemp("rec") / "hstu"
    train(cfg, run, echo=lambda *a, **k: None)
    return run


def test_queries_equal_evaluation_queries(hstu_run, tiny_data_dir):
    """With the history's timestamps and the target's time, recommend() scores exactly as evaluate() ranks."""
    store = SequenceStore.load(tiny_data_dir)
    split = leave_one_out(store)
    rec = Recommender.load(hstu_run)
    users, rows = split.test.users[:20], split.test.target_rows[:20]
    batch = eval_batch(store, users, rows, rec.max_len)
    with torch.no_grad():
        want = last_hidden(rec.model, rec.scorer)(batch)
    hist = [np.asarray(store.items[max(store.offsets[u], r - rec.max_len):r]) for u, r in zip(users, rows)]
    times = [np.asarray(store.timestamps[max(store.offsets[u], r - rec.max_len):r]) for u, r in zip(users, rows)]
    got = rec.encode(hist, times, np.asarray(store.timestamps[rows]))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the time matters: another query time gives another query
    other = rec.encode(hist, times, np.asarray(store.timestamps[rows]) + 10**7)
    assert not torch.allclose(other, want, atol=1e-4)


def test_recommend_raw_ids_exclusion_and_fallback(hstu_run, tiny_data_dir):
    store = SequenceStore.load(tiny_data_dir)
    rec = Recommender.load(hstu_run)
    items = store.item_vocab.to_raw(store.user_items(0)).tolist()
    times = np.asarray(store.timestamps[store.offsets[0]:store.offsets[1]]).tolist()
    (r,) = rec.recommend([items], k=15, timestamps=[times], query_time=times[-1] + 60)
    assert len(r.items) == 15 and not set(r.items) & set(items)
    assert all(x in set(store.item_vocab.raw.tolist()) for x in r.items)
    (seen,) = rec.recommend([items], k=rec.vocab.raw.size, exclude_seen=False, timestamps=[times],
                            query_time=times[-1] + 60)
    assert set(items) <= set(seen.items)  # without exclusion the history items can come back
    with pytest.warns(UserWarning, match="time bias"):
        (plain,) = rec.recommend([items + ["unknown-id"]], k=5)
    assert plain.unknown == 1 and len(plain.items) == 5
    empty, = rec.recommend([[]], k=4, timestamps=[[]])
    assert empty.fallback and len(empty.items) == 4
    counts = rec.item_counts.clone()
    counts[0] = -1
    assert empty.items == rec.vocab.to_raw(torch.topk(counts, 4).indices.numpy()).tolist()
    with pytest.raises(ValueError, match="one time per history item"):
        rec.recommend([items], timestamps=[times[:-1]])
    with pytest.raises(ValueError, match="k must be positive"):
        rec.recommend([items], k=0)
