"""Splits and batches: no target inside its own history, no evaluation event in training, shifts right."""

from __future__ import annotations

import numpy as np
import pytest

from genrec.data.batches import TrainLoader, eval_batch, eval_batches, training_batch
from genrec.data.split import leave_one_out, make_split, temporal
from genrec.data.store import DatasetError


def _check_examples_never_leak(store, split):
    """History = offsets[u]:target_row; training rows end before every evaluation target of the user."""
    starts, ends = store.offsets[:-1], store.offsets[1:]
    assert np.all(split.train_end >= starts) and np.all(split.train_end <= ends)
    for which in ("valid", "test"):
        ex = split.examples(which)
        assert len(ex.users) == len(ex.target_rows) == len(np.unique(ex.users))
        for u, row in zip(ex.users, ex.target_rows):
            assert starts[u] < row < ends[u]  # a target with at least one event of history
            assert split.train_end[u] <= row  # no training row at or after the target


def _check_training_batch(store, split, users, max_len):
    batch = training_batch(store, users, split.train_end, max_len)
    B, L = batch.items.shape
    assert batch.targets.shape == (B, L)
    for b, u in enumerate(users):
        n_train = split.train_end[u] - store.offsets[u]
        n = int(batch.lengths[b])
        assert n == max(0, min(n_train - 1, max_len))
        first = split.train_end[u] - n - 1  # window start: the most recent training events
        np.testing.assert_array_equal(batch.items[b, :n].numpy(), store.items[first:first + n])
        np.testing.assert_array_equal(batch.targets[b, :n].numpy(), store.items[first + 1:first + n + 1])
        # target at i is the input at i + 1
        np.testing.assert_array_equal(batch.targets[b, :n - 1].numpy(), batch.items[b, 1:n].numpy())
        assert first + n < split.train_end[u]  # the last target is the last training row, never beyond
        assert np.all(batch.items[b, n:].numpy() == 0) and np.all(batch.targets[b, n:].numpy() == 0)
        if store.timestamps is not None:
            np.testing.assert_array_equal(batch.timestamps[b, :n].numpy(), store.timestamps[first:first + n])
            np.testing.assert_array_equal(batch.query_time[b, :n].numpy(),
                                          store.timestamps[first + 1:first + n + 1])
            assert np.all(batch.query_time[b, n:].numpy() == 0)
    return batch


def _check_eval_batch(store, examples, max_len):
    batch = eval_batch(store, examples.users, examples.target_rows, max_len)
    for b, (u, row) in enumerate(zip(examples.users, examples.target_rows)):
        n = int(batch.lengths[b])
        assert n == min(row - store.offsets[u], max_len)
        # the history ends right before the target
        np.testing.assert_array_equal(batch.items[b, :n].numpy(), store.items[row - n:row])
        assert int(batch.target[b]) == store.items[row]
        assert np.all(batch.items[b, n:].numpy() == 0)
        if store.timestamps is not None:
            ts = batch.timestamps[b].numpy()
            qt = batch.query_time[b].numpy()
            np.testing.assert_array_equal(ts[:n], store.timestamps[row - n:row])
            assert qt[n - 1] == store.timestamps[row]  # the last query asks about the target's time
            np.testing.assert_array_equal(qt[:n - 1], ts[1:n])
            assert np.all(qt[n:] == 0) and np.all(ts[n:] == 0)
    return batch


# ----------------------------------------------------------------------------------------------
# leave-one-out


def test_leave_one_out_on_synthetic(tiny_store):
    store = tiny_store
    split = leave_one_out(store)
    ends = store.offsets[1:]
    assert np.all(store.lengths >= 3)  # the tiny preset: everyone is evaluated
    np.testing.assert_array_equal(split.valid.users, np.arange(store.num_users))
    np.testing.assert_array_equal(split.test.target_rows, ends - 1)
    np.testing.assert_array_equal(split.valid.target_rows, ends - 2)
    np.testing.assert_array_equal(split.train_end, ends - 2)
    _check_examples_never_leak(store, split)
    users = np.arange(0, store.num_users, 7)
    for max_len in (5, 200):
        _check_training_batch(store, split, users, max_len)
        _check_eval_batch(store, split.valid, max_len)
        _check_eval_batch(store, split.test, max_len)


def test_leave_one_out_short_users(store_from_sequences):
    seqs = {
        "a": [(1, 10)],
        "b": [(1, 10), (2, 20)],
        "c": [(3, 10), (1, 20), (2, 30)],
        "d": [(4, 10), (5, 20), (4, 30), (6, 40), (4, 50)],
    }
    store = store_from_sequences(seqs)
    split = leave_one_out(store)
    a, b, c, d = (int(store.user_vocab.to_dense([k])[0]) for k in "abcd")
    assert set(split.valid.users.tolist()) == set(split.test.users.tolist()) == {c, d}
    # users with fewer than 3 events train on everything and are not evaluated
    assert split.train_end[a] == store.offsets[a + 1] and split.train_end[b] == store.offsets[b + 1]
    assert split.train_end[c] == store.offsets[c] + 1 and split.train_end[d] == store.offsets[d] + 3
    _check_examples_never_leak(store, split)
    # only users with at least two training events produce a training example
    loader = TrainLoader(store, split, batch_size=2, max_len=10, seed=0)
    assert set(loader.users.tolist()) == {b, d}
    seen = np.concatenate([batch.users.numpy() for batch in loader.epoch(0)])
    assert sorted(seen.tolist()) == sorted([b, d])
    batch = _check_training_batch(store, split, np.array([b, d]), max_len=10)
    raw = lambda x: store.item_vocab.to_raw(x).tolist()  # noqa: E731
    assert raw(batch.items[1, :2].numpy()) == [4, 5] and raw(batch.targets[1, :2].numpy()) == [5, 4]
    # the test example of d reads all four earlier events; its target equals an earlier item
    ev = _check_eval_batch(store, split.test, max_len=10)
    row = list(split.test.users).index(d)
    assert raw(ev.items[row, :4].numpy()) == [4, 5, 4, 6] and raw(int(ev.target[row])) == 4
    assert int(ev.query_time[row, 3]) == 50


def test_training_batch_never_reaches_evaluation_rows(tiny_store):
    store = tiny_store
    split = leave_one_out(store)
    loader = TrainLoader(store, split, batch_size=64, max_len=7, seed=3)
    eval_rows = set(split.valid.target_rows.tolist()) | set(split.test.target_rows.tolist())
    n = 0
    for batch in loader.epoch(1):
        for b, u in enumerate(batch.users.tolist()):
            length = int(batch.lengths[b])
            first = split.train_end[u] - length - 1
            rows = set(range(first, first + length + 1))  # inputs and targets
            assert not rows & eval_rows
            n += 1
    assert n == len(loader.users) == store.num_users
    assert loader.num_tokens() == int(np.minimum(split.train_end - store.offsets[:-1] - 1, 7).sum())


def test_train_loader_order_depends_only_on_seed_and_epoch(tiny_store):
    split = leave_one_out(tiny_store)
    a = TrainLoader(tiny_store, split, batch_size=50, max_len=10, seed=1)
    b = TrainLoader(tiny_store, split, batch_size=50, max_len=10, seed=1)
    users = lambda loader, e: np.concatenate([x.users.numpy() for x in loader.epoch(e)])  # noqa: E731
    np.testing.assert_array_equal(users(a, 2), users(b, 2))
    assert not np.array_equal(users(a, 2), users(a, 3))
    assert sorted(users(a, 2).tolist()) == list(range(tiny_store.num_users))
    assert len(a) == 4


def test_eval_batches_cover_examples_in_order(tiny_store):
    split = leave_one_out(tiny_store)
    batches = list(eval_batches(tiny_store, split.test, batch_size=64, max_len=10))
    np.testing.assert_array_equal(np.concatenate([b.users.numpy() for b in batches]), split.test.users)
    np.testing.assert_array_equal(np.concatenate([b.target.numpy() for b in batches]),
                                  tiny_store.items[split.test.target_rows])


# ----------------------------------------------------------------------------------------------
# temporal


@pytest.mark.parametrize("valid_fraction,test_fraction", [(0.1, 0.1), (0.2, 0.3)])
def test_temporal_on_synthetic(tiny_store, valid_fraction, test_fraction):
    store = tiny_store
    split = temporal(store, valid_fraction, test_fraction)
    ts = np.asarray(store.timestamps)
    t_valid, t_test = np.quantile(ts, [1 - valid_fraction - test_fraction, 1 - test_fraction])
    starts, ends = store.offsets[:-1], store.offsets[1:]
    assert len(split.valid) > 0 and len(split.test) > 0
    for u in range(store.num_users):
        train = ts[starts[u]:split.train_end[u]]
        assert np.all(train < t_valid)  # every training event is before the validation cut-off
        assert np.all(ts[split.train_end[u]:ends[u]] >= t_valid)  # and nothing before it is left out
    for u, row in zip(split.valid.users, split.valid.target_rows):
        assert t_valid <= ts[row] < t_test
        assert np.all(ts[starts[u]:row] < t_valid)  # the first event of the user in the window
    for u, row in zip(split.test.users, split.test.target_rows):
        assert ts[row] >= t_test
        assert np.all(ts[starts[u]:row] < t_test)
    # users whose first window event is their first event ever have no history: not evaluated
    first_in_window = [u for u in range(store.num_users) if ts[starts[u]] >= t_test]
    assert not set(first_in_window) & set(split.test.users.tolist())
    _check_examples_never_leak(store, split)
    users = np.flatnonzero(split.train_end - starts >= 2)
    _check_training_batch(store, split, users[:40], max_len=6)
    _check_eval_batch(store, split.valid, max_len=6)
    _check_eval_batch(store, split.test, max_len=200)


def test_temporal_hand_made(store_from_sequences):
    seqs = {
        "a": [(1, 0), (2, 10), (3, 20), (4, 80), (5, 95)],
        "b": [(2, 5), (3, 85), (1, 90)],  # two events in the validation window: only the first is a target
        "c": [(6, 91), (7, 99)],  # no history before its first test-window event: not evaluated
        "d": [(1, 1), (2, 2), (3, 3), (4, 4), (5, 30)],  # everything before the cut-offs: training only
    }
    store = store_from_sequences(seqs)
    ts = np.asarray(store.timestamps)
    t_valid, t_test = np.quantile(ts, [0.6, 0.8])
    assert (t_valid, t_test) == pytest.approx((50.0, 90.2))
    split = make_split(store, "temporal", 0.2, 0.2)
    a, b, c, d = (int(store.user_vocab.to_dense([k])[0]) for k in "abcd")
    o = store.offsets
    np.testing.assert_array_equal(split.train_end, [o[a] + 3, o[b] + 1, o[c], o[d] + 5])
    valid = dict(zip(split.valid.users.tolist(), split.valid.target_rows.tolist()))
    test = dict(zip(split.test.users.tolist(), split.test.target_rows.tolist()))
    assert {u: int(ts[r]) for u, r in valid.items()} == {a: 80, b: 85}
    assert {u: int(ts[r]) for u, r in test.items()} == {a: 95}
    _check_examples_never_leak(store, split)
    ev = _check_eval_batch(store, split.test, max_len=10)
    assert store.item_vocab.to_raw(ev.items[0, :4].numpy()).tolist() == [1, 2, 3, 4]  # reads the valid event too
    assert int(ev.query_time[0, 3]) == 95
    loader = TrainLoader(store, split, batch_size=8, max_len=10)
    assert sorted(loader.users.tolist()) == sorted([a, d])


def test_temporal_needs_timestamps(store_from_sequences):
    store = store_from_sequences({"a": [(1, 0), (2, 1), (3, 2)]}, with_time=False)
    with pytest.raises(DatasetError, match="timestamps"):
        temporal(store)
    store = store_from_sequences({"a": [(1, 0), (2, 1), (3, 2)]})
    with pytest.raises(DatasetError):
        temporal(store, 0.6, 0.5)
    with pytest.raises(DatasetError, match="unknown split"):
        make_split(store, "random")


def test_leave_one_out_without_timestamps(store_from_sequences):
    store = store_from_sequences({"a": [(1, 0), (2, 0), (3, 0), (4, 0)], "b": [(5, 0)]}, with_time=False)
    split = leave_one_out(store)
    assert store.timestamps is None
    batch = _check_eval_batch(store, split.test, max_len=2)
    assert batch.timestamps is None and batch.query_time is None
    _check_training_batch(store, split, np.array([0]), max_len=5)


@pytest.mark.parametrize("window", [0, 1, 3, 1000])
def test_length_aware_batching_visits_every_user_once(tiny_store, window):
    from genrec.data.batches import TrainLoader

    split = leave_one_out(tiny_store)
    plain = TrainLoader(tiny_store, split, batch_size=16, max_len=20, seed=3)
    loader = TrainLoader(tiny_store, split, batch_size=16, max_len=20, seed=3, length_window=window)
    batches = loader.batches(epoch=2)
    assert sorted(np.concatenate(batches).tolist()) == sorted(plain.users.tolist())
    assert len(batches) == len(loader)
    # deterministic per (seed, epoch), different across epochs
    assert all(np.array_equal(a, b) for a, b in zip(batches, loader.batches(epoch=2)))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, loader.batches(epoch=3)))
    if window == 0:
        assert all(np.array_equal(a, b) for a, b in zip(batches, plain.batches(epoch=2)))


def test_length_aware_batching_reduces_padding(tiny_store):
    from genrec.data.batches import TrainLoader

    split = leave_one_out(tiny_store)

    def padded_cells(loader):
        return sum(b.items.numel() for b in loader.epoch(0))

    plain = TrainLoader(tiny_store, split, batch_size=16, max_len=60, seed=0)
    bucketed = TrainLoader(tiny_store, split, batch_size=16, max_len=60, seed=0, length_window=100)
    real = sum(int(b.lengths.sum()) for b in plain.epoch(0))
    assert real == sum(int(b.lengths.sum()) for b in bucketed.epoch(0))
    assert padded_cells(bucketed) < 0.8 * padded_cells(plain)


def test_prefetch_keeps_order_and_errors():
    from genrec.data.batches import prefetch

    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise ValueError("bad batch")

    it = prefetch(broken())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad batch"):
        next(it)
    for i, x in enumerate(prefetch(iter(range(1000)))):  # an early break does not hang
        if i == 3:
            break


@pytest.mark.parametrize("chunk", [1, 7, 1 << 23])
def test_train_item_counts_chunked_equals_direct(tiny_store, chunk):
    from genrec.data.split import train_item_counts

    split = leave_one_out(tiny_store)
    want = np.zeros(tiny_store.num_items + 1, dtype=np.int64)
    for u in range(tiny_store.num_users):
        np.add.at(want, tiny_store.items[tiny_store.offsets[u]:split.train_end[u]], 1)
    np.testing.assert_array_equal(train_item_counts(tiny_store, split.train_end, chunk_events=chunk), want)


def test_eval_user_sample_is_stated_and_consistent(tiny_store):
    full = make_split(tiny_store, "leave_one_out")
    part = make_split(tiny_store, "leave_one_out", max_eval_users=50, seed=3)
    assert len(part.valid) == len(part.test) == 50
    assert np.array_equal(part.valid.users, part.test.users)
    assert set(part.test.users) <= set(full.test.users)
    assert np.array_equal(part.train_end, full.train_end)  # training is unchanged
    assert "random sample of 50 of 200 users" in part.description
    again = make_split(tiny_store, "leave_one_out", max_eval_users=50, seed=3)
    assert np.array_equal(again.test.users, part.test.users)
    assert make_split(tiny_store, "leave_one_out", max_eval_users=500).description == full.description


def test_prefetch_early_stop_leaves_no_thread():
    import threading

    from genrec.data.batches import prefetch

    before = threading.active_count()
    for _ in range(5):
        g = prefetch(iter(range(3)), 2)
        next(g)
        g.close()

    def broken():
        yield 1
        raise ValueError("x")

    g = prefetch(broken(), 1)
    next(g)
    g.close()
    assert threading.active_count() == before


# ----------------------------------------------------------------------------------------------
# validation events trained on (refits)


def test_train_on_valid_leave_one_out(store_from_sequences):
    seqs = {
        "a": [(1, 10)],
        "c": [(3, 10), (1, 20), (2, 30)],
        "d": [(4, 10), (5, 20), (4, 30), (6, 40), (4, 50)],
    }
    store = store_from_sequences(seqs)
    split = leave_one_out(store)
    refit = split.train_on_valid()
    a, c, d = (int(store.user_vocab.to_dense([k])[0]) for k in "acd")
    o = store.offsets
    # everything but the test event; short users unchanged (all their events)
    assert refit.train_end[a] == o[a + 1] and refit.train_end[c] == o[c] + 2 and refit.train_end[d] == o[d] + 4
    np.testing.assert_array_equal(refit.test.users, split.test.users)
    np.testing.assert_array_equal(refit.test.target_rows, split.test.target_rows)
    assert len(refit.valid) == 0 and "validation events trained on" in refit.description
    _check_examples_never_leak(store, refit)  # still no training row at or after a test target
    batch = _check_training_batch(store, refit, np.array([d]), max_len=10)
    raw = store.item_vocab.to_raw
    assert raw(batch.targets[0, :3].numpy()).tolist() == [5, 4, 6]  # the validation event (6) is a target now


@pytest.mark.parametrize("max_eval_users", [0, 40])
def test_train_on_valid_temporal(tiny_store, max_eval_users):
    store = tiny_store
    split = make_split(store, "temporal", 0.2, 0.2, max_eval_users=max_eval_users)
    refit = split.train_on_valid()
    ts = np.asarray(store.timestamps)
    t_test = np.quantile(ts, 0.8)
    starts = store.offsets[:-1]
    for u in range(store.num_users):
        assert np.all(ts[starts[u]:refit.train_end[u]] < t_test)  # the validation window is training now
        assert np.all(ts[refit.train_end[u]:store.offsets[u + 1]] >= t_test)  # and nothing before t_test is left
        assert refit.train_end[u] >= split.train_end[u]
    assert int((refit.train_end - split.train_end).sum()) > 0
    np.testing.assert_array_equal(refit.test.target_rows, split.test.target_rows)
    _check_examples_never_leak(store, refit)
