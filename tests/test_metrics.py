"""Metrics and full-ranking evaluation against brute-force numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genrec.data.batches import eval_batch
from genrec.data.ingest import build_store
from genrec.data.split import EvalExamples, leave_one_out
from genrec.eval.metrics import auc, ranking_metrics
from genrec.eval.ranking import popularity_table, rank_targets

# ----------------------------------------------------------------------------------------------
# ranking_metrics


def _brute_metrics(scores: np.ndarray, targets: np.ndarray, ks) -> dict:
    """From a (U, I) score matrix with distinct scores: sort each row, find the target, compute by definition."""
    U = len(scores)
    out = {}
    positions = []
    for u in range(U):
        order = sorted(range(scores.shape[1]), key=lambda i: -scores[u, i])
        positions.append(order.index(targets[u]))
    for k in ks:
        hits = [p < k for p in positions]
        out[f"hr@{k}"] = sum(hits) / U
        # DCG with one relevant item; ideal DCG = 1
        out[f"ndcg@{k}"] = sum(sum(1.0 / math.log2(r + 2) for r in range(k) if r == p) for p in positions) / U
    out["mrr"] = sum(1.0 / (p + 1) for p in positions) / U
    return out


def test_ranking_metrics_vs_brute_force():
    rng = np.random.default_rng(0)
    U, I = 40, 30
    scores = rng.permutation(U * I).reshape(U, I).astype(float)  # distinct scores
    targets = rng.integers(0, I, size=U)
    ranks = (scores > scores[np.arange(U), targets][:, None]).sum(1)
    got = ranking_metrics(ranks, [1, 5, 10, 30])
    want = _brute_metrics(scores, targets, [1, 5, 10, 30])
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["hr@30"] == 1.0


def test_ranking_metrics_known_values():
    got = ranking_metrics(np.array([0, 1, 9, 10]), [10])
    assert got["hr@10"] == pytest.approx(0.75)
    assert got["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 4)
    assert got["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11) / 4)
    with pytest.raises(ValueError):
        ranking_metrics(np.array([]), [10])


# ----------------------------------------------------------------------------------------------
# auc


def _brute_auc(scores, labels):
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_auc_vs_pair_counting_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    assert auc(scores, labels) == pytest.approx(_brute_auc(scores, labels), abs=1e-12)


def test_auc_edge_cases():
    assert auc([0.1, 0.9], [0, 1]) == 1.0
    assert auc([0.9, 0.1], [0, 1]) == 0.0
    assert auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    with pytest.raises(ValueError):
        auc([0.1, 0.2], [1, 1])


# ----------------------------------------------------------------------------------------------
# rank_targets


def _ranking_store():
    """Users with repeats (a target also seen earlier), long histories and a few items never consumed."""
    rng = np.random.default_rng(3)
    users, items, times = [], [], []
    for u, n in enumerate([7, 3, 12, 5, 9, 4]):
        seq = rng.integers(1, 11, size=n)  # items 1..10 only; raw items 11..14 added below
        if u == 0:
            seq[2] = seq[-1]  # the test target was already consumed earlier
        if u == 2:
            seq[0] = seq[-2]  # the validation target too, far outside a short max_len window
        users += [u] * n
        items += seq.tolist()
        times += (1000 + np.arange(n) * 10 + u).tolist()
    users += [99] * 4  # a user holding the remaining items so the catalogue has 14 items
    items += [11, 12, 13, 14]
    times += [1, 2, 3, 4]
    return build_store(np.array(users), np.array(items), np.array(times))


def _query_fn(batch):
    """Deterministic, per-row (batch independent) integer-valued query from the history."""
    B, L = batch.items.shape
    out = torch.zeros(B, 3)
    for b in range(B):
        n = int(batch.lengths[b])
        last = batch.items[b, n - 1].item()
        out[b] = torch.tensor([float(last % 3) - 1, float(n % 4) - 2, float(batch.items[b, :n].sum() % 5) - 2])
    return out


def _brute_ranks(store, examples, table, max_len, exclude_history):
    table = table.numpy().astype(np.float64)
    ranks = []
    for u, row in zip(examples.users, examples.target_rows):
        start = max(store.offsets[u], row - max_len)
        hist = store.items[start:row]
        # the query of this example alone (a single-row batch): the history the model reads
        single = eval_batch(store, np.array([u]), np.array([row]), max_len)
        assert single.items[0].tolist() == hist.tolist()
        q = _query_fn(single)[0].numpy().astype(np.float64)
        target = int(store.items[row])
        seen = set(store.items[store.offsets[u]:row].tolist()) if exclude_history else set()
        t_score = table[target] @ q
        rank = 0
        for i in range(1, len(table)):  # item 0 is padding, never ranked
            if i == target or i in seen:
                continue
            if table[i] @ q >= t_score:  # ties count against the target
                rank += 1
        ranks.append(rank)
    return np.array(ranks)


@pytest.fixture(scope="module")
def ranking_setup():
    store = _ranking_store()
    split = leave_one_out(store)
    g = torch.Generator().manual_seed(0)
    table = torch.randint(-2, 3, (store.num_items + 1, 3), generator=g).float()  # exact ties are common
    table[0] = 10.0  # padding would beat every item if it were ranked
    return store, split, table


@pytest.mark.parametrize("which", ["valid", "test"])
@pytest.mark.parametrize("exclude_history", [True, False])
@pytest.mark.parametrize("max_len", [2, 50])
@pytest.mark.parametrize("score_columns", [512, 3])  # one matmul per item chunk / column blocks of 3 items
def test_rank_targets_vs_brute_force(ranking_setup, which, exclude_history, max_len, score_columns, monkeypatch):
    import genrec.models.scoring as scoring

    monkeypatch.setattr(scoring, "SCORE_COLUMNS", score_columns)
    monkeypatch.setattr(scoring, "BLOCKED_FROM", 0)
    store, split, table = ranking_setup
    examples = split.examples(which)
    want = _brute_ranks(store, examples, table, max_len, exclude_history)
    for batch_size, item_chunk in [(512, 65536), (1, 1), (2, 3), (4, 7)]:
        got = rank_targets(_query_fn, table, store, examples, max_len, batch_size=batch_size,
                           item_chunk=item_chunk, exclude_history=exclude_history)
        np.testing.assert_array_equal(got, want, err_msg=f"batch_size={batch_size} item_chunk={item_chunk}")
    # the data really contains ties and history repeats, so the brute-force rules matter
    scores_tie = False
    for u, row in zip(examples.users, examples.target_rows):
        q = _query_fn(eval_batch(store, np.array([u]), np.array([row]), max_len))[0]
        s = table @ q
        t = int(store.items[row])
        scores_tie |= bool(((s == s[t]).sum() > 1).item())
    assert scores_tie


def test_rank_targets_history_exclusion_keeps_target_and_uses_full_history(ranking_setup):
    store, split, table = ranking_setup
    examples = EvalExamples(np.array([0, 2]), np.array([store.offsets[1] - 1, store.offsets[3] - 2]))
    # user 0's test target and user 2's validation target both appear earlier in their histories
    for u, row in zip(examples.users, examples.target_rows):
        assert store.items[row] in store.items[store.offsets[u]:row]
    item_table = torch.eye(store.num_items + 1)  # query = one-hot of the target

    def query(batch):
        return torch.eye(store.num_items + 1)[batch.target]
    ranks = rank_targets(query, item_table, store, examples, max_len=2, exclude_history=True)
    np.testing.assert_array_equal(ranks, [0, 0])
    # with all scores tied (a constant query) the target ranks last: ties count against it
    ranks = rank_targets(lambda b: torch.zeros(len(b.lengths), store.num_items + 1), item_table, store,
                         examples, max_len=2, exclude_history=False)
    np.testing.assert_array_equal(ranks, [store.num_items - 1] * 2)
    # a collapsed model (NaN scores) ranks last too, never first
    ranks = rank_targets(lambda b: torch.full((len(b.lengths), store.num_items + 1), float("nan")), item_table,
                         store, examples, max_len=2, exclude_history=False)
    np.testing.assert_array_equal(ranks, [store.num_items] * 2)
    # a query that prefers every other item: rank = number of candidate items (all but target, padding, history)
    hist_sizes = [len(set(store.items[store.offsets[u]:row].tolist()) - {int(store.items[row])})
                  for u, row in zip(examples.users, examples.target_rows)]

    def anti(batch):
        q = torch.ones(len(batch.lengths), store.num_items + 1)
        q[torch.arange(len(batch.lengths)), batch.target] = -1
        return q

    np.testing.assert_array_equal(rank_targets(anti, item_table, store, examples, 2, exclude_history=False),
                                  [store.num_items - 1] * 2)
    np.testing.assert_array_equal(rank_targets(anti, item_table, store, examples, 2, item_chunk=4,
                                               exclude_history=True),
                                  [store.num_items - 1 - h for h in hist_sizes])


def test_popularity_table_orders_by_training_counts(ranking_setup):
    store, split, _ = ranking_setup
    table = popularity_table(store, split.train_end)[:, 0].numpy()
    user_of_row = np.repeat(np.arange(store.num_users), np.diff(store.offsets))
    in_train = np.arange(store.num_events) < split.train_end[user_of_row]
    counts = np.bincount(store.items[in_train], minlength=store.num_items + 1)
    assert len(set(table.tolist())) == len(table)  # unique scores: no ties
    for a in range(len(table)):
        for b in range(len(table)):
            if counts[a] > counts[b] or (counts[a] == counts[b] and a < b):
                assert table[a] > table[b]
