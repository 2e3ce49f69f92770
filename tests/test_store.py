"""SequenceStore persistence and build_store: ordering, filters, vocabularies, atomic writes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from genrec.data import store as store_mod
from genrec.data.ingest import build_store, kcore_mask, timestamps_to_numpy
from genrec.data.store import DatasetError, SequenceStore
from genrec.data.vocab import Vocab


def small_store() -> SequenceStore:
    users = np.array(["b", "a", "b", "a", "b", "c"], dtype=object)
    items = np.array([30, 10, 20, 30, 10, 20])
    ts = np.array([5, 9, 5, 1, 3, 7])
    return build_store(users, items, ts, actions=np.array(["buy", "view", "view", "buy", "view", "view"], dtype=object))


def test_sorted_by_time_with_stable_ties():
    s = small_store()
    assert s.user_vocab.raw.tolist() == ["a", "b", "c"]
    assert s.item_vocab.raw.tolist() == [10, 20, 30]
    # user a: (30 @1), (10 @9); user b: (10 @3), then the tie at t=5 keeps file order: 30 before 20
    assert s.item_vocab.to_raw(s.user_items(0)).tolist() == [30, 10]
    assert s.item_vocab.to_raw(s.user_items(1)).tolist() == [10, 30, 20]
    assert s.timestamps.tolist() == [1, 9, 3, 5, 5, 7]
    assert s.manifest["actions"] == ["buy", "view"]
    assert s.actions.tolist() == [1, 2, 2, 1, 2, 2]
    assert s.offsets.tolist() == [0, 2, 5, 6]


def test_without_timestamps_file_order_is_time_order():
    s = build_store(np.array([2, 1, 2, 1]), np.array([7, 8, 9, 7]))
    assert s.item_vocab.to_raw(s.user_items(0)).tolist() == [8, 7]
    assert s.item_vocab.to_raw(s.user_items(1)).tolist() == [7, 9]


def test_dedup_modes():
    users, items, ts = np.array([1, 1, 1, 1]), np.array([5, 5, 5, 6]), np.array([1, 1, 2, 3])
    assert build_store(users, items, ts, dedup="none").num_events == 4
    assert build_store(users, items, ts, dedup="exact").num_events == 3
    pair = build_store(users, items, ts, dedup="pair")
    assert pair.num_events == 2 and pair.timestamps.tolist() == [1, 3]  # the earliest interaction is kept
    with pytest.raises(DatasetError, match="dedup"):
        build_store(users, items, ts, dedup="bogus")


def test_kcore_is_iterative_and_vocab_shrinks():
    # item 9 has 1 event; removing it leaves user 3 with 1 event, which must then go too
    users = np.array([1, 1, 1, 2, 2, 2, 3, 3])
    items = np.array([5, 6, 7, 5, 6, 7, 5, 9])
    keep = kcore_mask(users, items, min_user=2, min_item=2)
    assert keep.tolist() == [True] * 6 + [False, False]
    s = build_store(users, items, min_user_count=2, min_item_count=2)
    assert s.num_users == 2 and s.item_vocab.raw.tolist() == [5, 6, 7]
    with pytest.raises(DatasetError, match="no interactions left"):
        build_store(users, items, min_user_count=100)


def test_save_load_round_trip(tmp_path):
    s = small_store()
    s.save(tmp_path / "ds")
    t = SequenceStore.load(tmp_path / "ds")
    assert isinstance(t.items, np.memmap)
    np.testing.assert_array_equal(t.items, s.items)
    np.testing.assert_array_equal(t.timestamps, s.timestamps)
    assert t.user_vocab.raw.tolist() == ["a", "b", "c"] and t.item_vocab.to_dense([30, 99]).tolist() == [3, -1]
    assert t.manifest["counts"] == {"users": 3, "items": 3, "interactions": 6}
    with pytest.raises(DatasetError, match="already exists"):
        s.save(tmp_path / "ds")


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    real_save = np.save
    calls = {"n": 0}

    def failing_save(path, arr, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(store_mod.np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        small_store().save(tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []  # no dataset, no temporary directory


def test_failed_overwrite_keeps_old_dataset(tmp_path, monkeypatch):
    small_store().save(tmp_path / "ds")
    before = (tmp_path / "ds" / "items.npy").read_bytes()
    new = build_store(np.array([1, 1]), np.array([4, 5]))
    monkeypatch.setattr(store_mod.Vocab, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        new.save(tmp_path / "ds", overwrite=True)
    assert (tmp_path / "ds" / "items.npy").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_load_errors(tmp_path):
    with pytest.raises(DatasetError, match="genrec prepare"):
        SequenceStore.load(tmp_path)


def test_vocab_lookup_mixed_inputs():
    v = Vocab(np.array([100, 7, 42]))
    assert v.to_dense([7, "42", 100, 5, "x"]).tolist() == [2, 3, 1, -1, -1]
    assert v.to_dense([10**30, 7, -(2**70), 2**63]).tolist() == [-1, 2, -1, -1]  # beyond int64: unknown, no error
    assert v.to_raw(np.array([1, 3])).tolist() == [100, 42]
    s = Vocab(["x", "y"])
    assert s.to_dense(["y", "z"]).tolist() == [2, -1]
    assert Vocab.from_state(v.state()).to_dense([42]).tolist() == [3]


@pytest.mark.parametrize("values,expected", [
    (pa.array([3, 1]), [3, 1]),
    (pa.array([3.7, 1.2]), [3, 1]),
    (pa.array([" 13", "14 "]), [13, 14]),
    (pa.array(["1970-01-01T00:00:10", "1970-01-01T00:00:11.900"]), [10, 11]),
    (pa.array(["1970-01-01T01:00:00+01:00"]), [0]),
    (pa.array([1500, 2500], pa.timestamp("ms")), [1, 2]),
])
def test_timestamp_parsing(values, expected):
    assert timestamps_to_numpy(pa.chunked_array([values]), "f.csv", "ts").tolist() == expected


def test_timestamp_error_names_row():
    with pytest.raises(DatasetError, match=r"f.csv: row 2: timestamp 'soon'"):
        timestamps_to_numpy(pa.chunked_array([pa.array(["1", "soon"])]), "f.csv", "ts")


def test_ratings_column_round_trip(tmp_path):
    from genrec.data.datasets import grouplens, table

    csv = tmp_path / "log.csv"
    csv.write_text("u,i,t,r\n1,a,2,4.5\n1,b,1,3\n2,a,1,5\n")
    s = table(csv, user_col="u", item_col="i", time_col="t", rating_col="r")
    assert s.ratings.tolist() == [3.0, 4.5, 5.0]  # sorted with their events
    s.save(tmp_path / "ds")
    assert SequenceStore.load(tmp_path / "ds").ratings.tolist() == [3.0, 4.5, 5.0]
    with pytest.raises(DatasetError, match="rating column 'i'"):
        table(csv, user_col="u", item_col="i", rating_col="i")
    dat = tmp_path / "ratings.dat"
    dat.write_text("1::10::5::100\n1::11::3::50\n")
    g = grouplens(dat)
    assert g.ratings.tolist() == [3.0, 5.0] and g.manifest["actions"] == ["3", "5"]


def test_table_ids_follow_the_shared_rule(tmp_path):
    from genrec.data.datasets import table

    csv = tmp_path / "log.csv"
    csv.write_text("user,item,ts\nu1,007,1\nu1,7,2\nu1,1.0,3\nu2,007,1\n")
    s = table(csv, time_col="ts")
    assert sorted(s.item_vocab.raw.tolist()) == ["007", "1.0", "7"]  # three distinct items, kept as text
    csv.write_text("user,item\n1,7\n2,8\n")
    assert table(csv).item_vocab.raw.dtype == np.int64


def test_overwrite_only_replaces_a_dataset(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("important")
    with pytest.raises(DatasetError, match="not a genrec dataset"):
        small_store().save(precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "important"
    small_store().save(tmp_path / "ds")
    small_store().save(tmp_path / "ds", overwrite=True)  # a dataset may be replaced
    assert SequenceStore.load(tmp_path / "ds").num_events == 6


def test_load_reports_missing_and_corrupt_files(tmp_path):
    small_store().save(tmp_path / "ds")
    (tmp_path / "ds" / "timestamps.npy").unlink()
    with pytest.raises(DatasetError, match="timestamps.npy is missing"):
        SequenceStore.load(tmp_path / "ds")
    (tmp_path / "ds" / "manifest.json").write_text("{oops")
    with pytest.raises(DatasetError, match="manifest.json is corrupt"):
        SequenceStore.load(tmp_path / "ds")


def test_ragged_csv_names_the_line(tmp_path):
    from genrec.data.ingest import read_table

    csv = tmp_path / "log.csv"
    csv.write_text("user,item,ts\nu1,a,1\nu1,b,2\nu2,c\nu2,d,5\n")
    with pytest.raises(DatasetError, match=r"log.csv: line 4: 2 fields, but the first line has 3"):
        read_table(csv)


def test_streamed_synthetic_equals_in_memory(tmp_path):
    from dataclasses import replace

    from genrec.data.synthetic import PRESETS, generate, generate_to

    cfg = replace(PRESETS["tiny"], chunk_users=37)  # several chunks, the last one partial
    generate(cfg).save(tmp_path / "mem")
    generate_to(cfg, tmp_path / "stream")
    a, b = SequenceStore.load(tmp_path / "mem"), SequenceStore.load(tmp_path / "stream")
    for name in ("offsets", "items", "timestamps", "actions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.item_vocab.raw.tolist() == b.item_vocab.raw.tolist()
    assert a.user_vocab.raw.tolist() == b.user_vocab.raw.tolist()
    assert a.manifest["counts"] == b.manifest["counts"] and a.manifest["actions"] == b.manifest["actions"]
    assert np.all(np.diff(b.timestamps)[np.diff(np.repeat(np.arange(b.num_users), b.lengths)) == 0] >= 0)
