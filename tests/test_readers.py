"""Built-in dataset readers (genrec.data.datasets): small files written here, plus the real datasets when present."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrec.data import datasets as ds
from genrec.data.store import DatasetError, SequenceStore


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def _raw_sequences(store: SequenceStore) -> dict:
    """{raw user: [raw items in stored order]}"""
    raw_users = store.user_vocab.raw.tolist()
    return {raw_users[u]: store.item_vocab.to_raw(store.user_items(u)).tolist() for u in range(store.num_users)}


def _check_csr(store: SequenceStore) -> None:
    assert store.offsets[0] == 0 and store.offsets[-1] == len(store.items)
    assert np.all(np.diff(store.offsets) > 0)
    assert store.items.min() >= 1 and store.items.max() == store.num_items  # 0 is padding
    if store.timestamps is not None:
        for u in range(store.num_users):
            t = store.timestamps[store.offsets[u]:store.offsets[u + 1]]
            assert np.all(np.diff(t) >= 0)


# ----------------------------------------------------------------------------------------------
# s3rec


def test_s3rec_integer_ids_order_and_mapping(tmp_path):
    f = _write(tmp_path / "seq.txt", "10 5 3 7\n\n2 3 3 9\r\n10 8  \n   \n")
    store = ds.s3rec(f)
    _check_csr(store)
    assert (store.num_users, store.num_items, store.num_events) == (2, 5, 7)
    assert store.user_vocab.raw.dtype == np.int64 and store.item_vocab.raw.dtype == np.int64
    # raw -> dense: users dense 0.. in sorted raw order, items 1.. in sorted raw order
    assert store.user_vocab.raw.tolist() == [2, 10]
    assert store.item_vocab.raw.tolist() == [3, 5, 7, 8, 9]
    assert store.item_vocab.to_dense([3, 9, 4]).tolist() == [1, 5, -1]
    # file order is time order; a user on two lines keeps both lines in order; repeats are kept
    assert _raw_sequences(store) == {2: [3, 3, 9], 10: [5, 3, 7, 8]}
    assert store.timestamps is None and store.actions is None
    src = store.manifest["source"]
    assert src["format"] == "s3rec" and src["inputs"][0]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert src["inputs"][0]["path"] == str(f.resolve())


def test_s3rec_string_ids(tmp_path):
    f = _write(tmp_path / "seq.txt", "alice i1 i2 7\nbob 7 i1\nécole i2 i3\n")
    store = ds.s3rec(f)
    assert store.user_vocab.raw.dtype == object and store.item_vocab.raw.dtype == object
    assert _raw_sequences(store) == {"alice": ["i1", "i2", "7"], "bob": ["7", "i1"], "école": ["i2", "i3"]}


def test_s3rec_leading_zeros_stay_strings(tmp_path):
    store = ds.s3rec(_write(tmp_path / "seq.txt", "1 007 7 0\n"))
    assert store.item_vocab.raw.dtype == object and _raw_sequences(store) == {1: ["007", "7", "0"]}


def test_s3rec_filters_pass_through(tmp_path):
    f = _write(tmp_path / "seq.txt", "1 1 2 3\n2 1 2\n3 1 1 1 4\n")
    assert ds.s3rec(f, min_user_count=3).num_users == 2
    store = ds.s3rec(f, dedup="pair")
    assert _raw_sequences(store)[3] == [1, 4]
    assert store.manifest["filters"]["dedup"] == "pair"
    with pytest.raises(TypeError, match="min_users"):
        ds.s3rec(f, min_users=3)


def test_s3rec_user_without_items(tmp_path):
    f = _write(tmp_path / "seq.txt", "1 4 5\n\n2\n3 4\n")
    with pytest.raises(DatasetError, match=r"seq\.txt: line 3: user '2' has no items"):
        ds.s3rec(f)


@pytest.mark.parametrize("content", [b"", b"  \n\n \r\n"])
def test_s3rec_empty_file(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_bytes(content)
    with pytest.raises(DatasetError, match=r"empty\.txt: the file is empty"):
        ds.s3rec(f)


def test_s3rec_missing_file_and_bad_utf8(tmp_path):
    with pytest.raises(DatasetError, match="nope.txt: file not found"):
        ds.s3rec(tmp_path / "nope.txt")
    f = tmp_path / "bad.txt"
    f.write_bytes(b"1 2 3\n2 \xff\xfe 4\n")
    with pytest.raises(DatasetError, match=r"bad\.txt: line 2: not valid UTF-8"):
        ds.s3rec(f)


# ----------------------------------------------------------------------------------------------
# bert4rec


def test_bert4rec_pairs(tmp_path):
    f = _write(tmp_path / "beauty.txt", "1 10\n1 11\n2 10\n\n1 12\n2 13\n3 11\n")
    store = ds.bert4rec(f)
    _check_csr(store)
    assert (store.num_users, store.num_items, store.num_events) == (3, 4, 6)
    assert _raw_sequences(store) == {1: [10, 11, 12], 2: [10, 13], 3: [11]}
    assert store.manifest["source"]["format"] == "bert4rec"


@pytest.mark.parametrize("bad, n", [("1 12 5", 3), ("7", 1)])
def test_bert4rec_wrong_field_count(tmp_path, bad, n):
    f = _write(tmp_path / "beauty.txt", f"1 10\n1 11\n\n{bad}\n2 3\n")
    with pytest.raises(DatasetError, match=rf"beauty\.txt: line 4: expected 2 fields 'user item', got {n}"):
        ds.bert4rec(f)


# ----------------------------------------------------------------------------------------------
# ml1m_seq


def _ml1m_dir(root: Path) -> Path:
    d = root / "ml-1m"
    _write(d / "ml-1m_sequences_orig_ids.txt", "1 3186 1721 1022\n2 1721 48\n5 48 3186\n")
    _write(d / "movies.dat", "48::Pocahontas (1995)::Animation|Children's|Musical|Romance\n"
                             "1022::Cinderella (1950)::Animation|Children's|Musical\n"
                             "1721::Titanic (1997)::Drama|Romance\n"
                             "3186::Girl, Interrupted (1999)::Drama\n"
                             "2000::Café \"Noir\" (1990)::Film-Noir\n", encoding="iso-8859-1")
    _write(d / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n5::M::25::20::55455-1234\n")
    return d


def test_ml1m_seq_with_side_tables(tmp_path):
    d = _ml1m_dir(tmp_path)
    for arg in (d, d / "ml-1m_sequences_orig_ids.txt"):
        store = ds.ml1m_seq(arg)
        _check_csr(store)
        assert (store.num_users, store.num_items, store.num_events) == (3, 4, 7)
        assert _raw_sequences(store) == {1: [3186, 1721, 1022], 2: [1721, 48], 5: [48, 3186]}
        items, users = store.side["items"], store.side["users"]
        assert items.column_names == ["item_id", "title", "genres"]
        assert items.column("item_id").type == pa.int64()
        assert items.column("item_id").to_pylist() == [48, 1022, 1721, 3186, 2000]
        assert items.column("title").to_pylist()[3:] == ["Girl, Interrupted (1999)", 'Café "Noir" (1990)']
        assert items.column("genres").to_pylist()[0] == ["Animation", "Children's", "Musical", "Romance"]
        assert users.column_names == ["user_id", "gender", "age", "occupation", "zip_code"]
        assert users.column("age").to_pylist() == [1, 56, 25]
        assert users.column("zip_code").to_pylist()[2] == "55455-1234"
        assert len(store.manifest["source"]["inputs"]) == 3


def test_ml1m_seq_without_side_files_and_missing(tmp_path):
    d = tmp_path / "ml"
    _write(d / "ml-1m_sequences_orig_ids.txt", "1 2 3\n")
    store = ds.ml1m_seq(d)
    assert store.side == {} and store.num_events == 2
    with pytest.raises(DatasetError, match="ml-1m_sequences_orig_ids.txt: file not found"):
        ds.ml1m_seq(tmp_path)


def test_ml1m_seq_malformed_movies(tmp_path):
    d = _ml1m_dir(tmp_path)
    _write(d / "movies.dat", "48::Pocahontas (1995)::Animation\n1022::Cinderella (1950)\n")
    with pytest.raises(DatasetError, match=r"movies\.dat: line 2: expected 3 fields"):
        ds.ml1m_seq(d)


# ----------------------------------------------------------------------------------------------
# recbole


INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "u2\t20\t4\t300\n"
    "u1\t10\t5\t200.7\n"
    "u1\t11\t3\t100\n"
    "u2\t21\t1\t300\n"
    "u1\t12\t4\t200\n"
    "u2\t22\t2\t100\n"
)


def test_recbole_timestamps_actions_side(tmp_path):
    d = tmp_path / "toy"
    _write(d / "toy.inter", INTER)
    _write(d / "toy.item", "item_id:token\ttitle:token_seq\tyear:token\tscore:float\n"
                           "10\tThe Film\t1999\t0.5\n11\tOther One\t2001\t1.5\n")
    _write(d / "toy.user", "user_id:token\tage:token\tgender:token\nu1\t24\tM\nu2\t53\tF\n")
    for arg in (d, d / "toy.inter"):
        store = ds.recbole(arg)
        _check_csr(store)
        assert (store.num_users, store.num_items, store.num_events) == (2, 6, 6)
        assert store.user_vocab.raw.tolist() == ["u1", "u2"] and store.item_vocab.raw.dtype == np.int64
        # sorted by time per user; 200.7 is floored to 200, and ties keep file order (10 before 12,
        # 20 before 21)
        assert _raw_sequences(store) == {"u1": [11, 10, 12], "u2": [22, 20, 21]}
        assert store.timestamps.tolist() == [100, 200, 200, 100, 300, 300]
        assert store.manifest["actions"] == ["1", "2", "3", "4", "5"]
        assert store.actions.tolist() == [3, 5, 4, 2, 4, 1]  # codes: rating r -> r (1-based, 0 = none)
        items, users = store.side["items"], store.side["users"]
        assert items.column_names == ["item_id", "title", "year", "score"]
        assert items.column("item_id").to_pylist() == [10, 11]
        assert items.column("title").to_pylist() == ["The Film", "Other One"]  # token_seq stays a string
        assert items.column("score").type == pa.float64()
        assert users.column("user_id").to_pylist() == ["u1", "u2"] and users.column("age").to_pylist() == ["24", "53"]


def test_recbole_optional_columns(tmp_path):
    f = _write(tmp_path / "a.inter", "user_id:token\titem_id:token\n1\t5\n1\t6\n")
    store = ds.recbole(f)
    assert store.timestamps is None and store.actions is None and store.side == {}
    f2 = _write(tmp_path / "b" / "b.inter", INTER)
    store = ds.recbole(f2, time_col=None, action_col=None)
    assert store.timestamps is None and store.actions is None
    assert _raw_sequences(store)["u1"] == [10, 11, 12]  # file order without timestamps


def test_recbole_bad_header(tmp_path):
    f = _write(tmp_path / "x.inter", "user_id\titem_id:token\n1\t2\n")
    with pytest.raises(DatasetError, match=r"x\.inter: line 1: header field 'user_id' has no ':type'"):
        ds.recbole(f)
    f = _write(tmp_path / "y.inter", "user_id:token\titem_id:int\n1\t2\n")
    with pytest.raises(DatasetError, match=r"y\.inter: line 1: .*unknown type 'int'"):
        ds.recbole(f)


def test_recbole_malformed_rows(tmp_path):
    f = _write(tmp_path / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n1\t3\n")
    with pytest.raises(DatasetError, match=r"x\.inter: line 3: expected 3 fields"):
        ds.recbole(f)
    f = _write(tmp_path / "y.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n\n1\t3\tnoon\n")
    with pytest.raises(DatasetError, match=r"y\.inter: line 4: field 'timestamp' is 'noon'"):
        ds.recbole(f)
    f = _write(tmp_path / "z.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n1\t3\t\n")
    with pytest.raises(DatasetError, match=r"z\.inter: line 3: field 'timestamp' is empty"):
        ds.recbole(f)
    f = _write(tmp_path / "v.inter", "user_id:token\titem_id:token\n1\t2\n\t3\n")
    with pytest.raises(DatasetError, match=r"v\.inter: line 3: field 'user_id' is empty"):
        ds.recbole(f)
    f = _write(tmp_path / "w.inter", "uid:token\titem_id:token\n1\t2\n")
    with pytest.raises(DatasetError, match=r"w\.inter: no field 'user_id' for the user; fields are uid, item_id"):
        ds.recbole(f)


def test_recbole_folder_needs_one_inter(tmp_path):
    _write(tmp_path / "a.inter", "user_id:token\titem_id:token\n1\t2\n")
    _write(tmp_path / "b.inter", "user_id:token\titem_id:token\n1\t2\n")
    with pytest.raises(DatasetError, match="exactly one .inter file.*a.inter, b.inter"):
        ds.recbole(tmp_path)


# ----------------------------------------------------------------------------------------------
# grouplens


def test_grouplens_ratings_dat(tmp_path):
    d = _ml1m_dir(tmp_path)  # movies.dat + users.dat beside the ratings
    _write(d / "ratings.dat", "1::1721::4::978300760\n1::48::5::978300700\n2::48::3::978300760\n"
                              "1::3186::4::978300760\n5::1022::1::978200000\n")
    for arg in (d, d / "ratings.dat"):
        store = ds.grouplens(arg)
        _check_csr(store)
        assert (store.num_users, store.num_items, store.num_events) == (3, 4, 5)
        # time order with stable ties (1721 before 3186 at the same second)
        assert _raw_sequences(store) == {1: [48, 1721, 3186], 2: [48], 5: [1022]}
        assert store.timestamps.tolist() == [978300700, 978300760, 978300760, 978300760, 978200000]
        assert store.manifest["actions"] == ["1", "3", "4", "5"]
        assert store.actions.tolist() == [4, 3, 3, 2, 1]
        assert store.side["items"].num_rows == 5 and store.side["users"].num_rows == 3


def test_grouplens_ratings_csv_half_stars(tmp_path):
    d = tmp_path / "ml-20m"
    _write(d / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,5.0,1112484676\n"
                              "2,2,0.5,974820889\n")
    _write(d / "movies.csv", 'movieId,title,genres\n2,Jumanji (1995),Adventure|Children|Fantasy\n'
                             '29,"City of Lost Children, The (Cité des enfants perdus, La) (1995)",Adventure|Drama\n')
    store = ds.grouplens(d)
    assert _raw_sequences(store) == {1: [29, 2], 2: [2]}
    assert store.manifest["actions"] == ["0.5", "3.5", "5.0"]
    items = store.side["items"]
    assert items.column("title").to_pylist()[1].startswith("City of Lost Children, The (Cité")
    assert items.column("genres").to_pylist()[1] == ["Adventure", "Drama"] and "users" not in store.side


def test_grouplens_u_data(tmp_path):
    d = tmp_path / "ml-100k"
    _write(d / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t1\t881250900\n")
    _write(d / "u.user", "186|39|F|executive|00000\n196|49|M|writer|55105\n")
    _write(d / "u.genre", "unknown|0\nAction|1\nAdventure|2\nAnimation|3\nChildren's|4\nComedy|5\nCrime|6\n"
                          "Documentary|7\nDrama|8\nFantasy|9\nFilm-Noir|10\nHorror|11\nMusical|12\nMystery|13\n"
                          "Romance|14\nSci-Fi|15\nThriller|16\nWar|17\nWestern|18\n\n")
    flags = lambda on: "|".join("1" if k in on else "0" for k in range(19))  # noqa: E731
    _write(d / "u.item", f"242|Kolya (1996)|24-Jan-1997||http://x|{flags({5})}\n"
                         f"302|L.A. Confidential (1997)|01-Jan-1997||http://y|{flags({6, 13, 16})}\n",
           encoding="iso-8859-1")
    store = ds.grouplens(d)
    assert _raw_sequences(store) == {186: [302], 196: [302, 242]}
    items = store.side["items"]
    assert items.column_names == ["item_id", "title", "release_date", "video_release_date", "imdb_url", "genres"]
    assert items.column("genres").to_pylist() == [["Comedy"], ["Crime", "Mystery", "Thriller"]]
    assert store.side["users"].column("zip_code").to_pylist() == ["00000", "55105"]


@pytest.mark.parametrize("name, text, pattern", [
    ("ratings.dat", "1::2::3::4\n1::2::3\n", r"ratings\.dat: line 2: expected 4 fields separated by '::'.*got 3"),
    ("ratings.dat", "1::2::3::4\n\n1::x::3::4\n", r"ratings\.dat: line 3: field 'item_id' is 'x', expected an integer"),
    ("ratings.dat", "1::2::3::4\n1::5::3::noon\n", r"ratings\.dat: line 2: field 'timestamp' is 'noon'"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,three,4\n",
     r"ratings\.csv: line 3: field 'rating' is 'three', expected a number"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3,4,5\n", r"ratings\.csv: line 3: expected 4 fields"),
    ("ratings.csv", "user,item,rating,ts\n1,2,3,4\n", r"ratings\.csv: line 1: header"),
    ("ratings.dat", "", r"ratings\.dat: the file is empty"),
])
def test_grouplens_malformed(tmp_path, name, text, pattern):
    f = _write(tmp_path / name, text)
    with pytest.raises(DatasetError, match=pattern):
        ds.grouplens(f)


def test_grouplens_folder_without_ratings(tmp_path):
    with pytest.raises(DatasetError, match="no ratings.dat, ratings.csv, u.data"):
        ds.grouplens(tmp_path)


# ----------------------------------------------------------------------------------------------
# table


def test_table_csv_parquet_jsonl(tmp_path):
    rows = {"uid": ["a", "b", "a", "a"], "iid": [3, 1, 2, 1], "ts": [5, 1, 5, 2], "kind": ["buy", "view", "view", "view"]}
    csv = _write(tmp_path / "ev.csv", "uid,iid,ts,kind\n" + "".join(
        f"{u},{i},{t},{k}\n" for u, i, t, k in zip(*rows.values())))
    pq.write_table(pa.table(rows), tmp_path / "ev.parquet")
    _write(tmp_path / "ev.jsonl", "".join(json.dumps(dict(zip(rows, r))) + "\n" for r in zip(*rows.values())))
    for f in (csv, tmp_path / "ev.parquet", tmp_path / "ev.jsonl"):
        store = ds.table(f, user_col="uid", item_col="iid", time_col="ts", action_col="kind")
        _check_csr(store)
        assert _raw_sequences(store) == {"a": [1, 3, 2], "b": [1]}
        assert store.manifest["actions"] == ["buy", "view"] and store.actions.tolist() == [2, 1, 2, 2]
        assert store.manifest["source"]["format"] == "table"
    tsv = _write(tmp_path / "ev.tsv", "user\titem\n1\t2\n1\t3\n")
    assert _raw_sequences(ds.table(tsv)) == {1: [2, 3]}
    semi = _write(tmp_path / "ev.txt", "user;item\n1;2\n")
    assert ds.table(semi, fmt="csv", sep=";").num_events == 1


def test_table_errors(tmp_path):
    f = _write(tmp_path / "ev.csv", "uid,iid,ts\na,1,5\nb,2,noon\n")
    with pytest.raises(DatasetError, match=r"ev\.csv: no column 'user' for the user; columns are uid, iid, ts"):
        ds.table(f)
    with pytest.raises(DatasetError, match=r"ev\.csv: row 2: timestamp 'noon'"):
        ds.table(f, user_col="uid", item_col="iid", time_col="ts")
    with pytest.raises(DatasetError, match=r"ev\.csv: no column 'when' for the time; columns are uid, iid, ts"):
        ds.table(f, user_col="uid", item_col="iid", time_col="when")
    empty = _write(tmp_path / "empty.csv", "")
    with pytest.raises(DatasetError, match=r"empty\.csv: the file is empty"):
        ds.table(empty)


def test_registry():
    assert set(ds.READERS) == {"s3rec", "ml1m_seq", "recbole", "bert4rec", "grouplens", "table"}
    assert set(ds.DESCRIPTIONS) == set(ds.READERS) and all(ds.DESCRIPTIONS.values())


# ----------------------------------------------------------------------------------------------
# side tables on disk


def test_side_tables_saved_with_the_dataset(tmp_path):
    store = ds.ml1m_seq(_ml1m_dir(tmp_path))
    out = store.save(tmp_path / "prepared")
    assert pq.read_table(out / "items_side.parquet").equals(store.side["items"])
    assert pq.read_table(out / "users_side.parquet").equals(store.side["users"])
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temp files left
    assert SequenceStore.load(out).manifest["side"] == ["items_side.parquet", "users_side.parquet"]
    plain = ds.s3rec(_write(tmp_path / "s.txt", "1 2\n"))
    plain.save(tmp_path / "plain")
    assert not list((tmp_path / "plain").glob("*_side.parquet"))


# ----------------------------------------------------------------------------------------------
# download_grouplens


def _zip(path: Path, members: dict[str, str]) -> tuple[Path, str]:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path, hashlib.md5(path.read_bytes()).hexdigest()


TINY = {"ml-1m/ratings.dat": "1::10::5::100\n1::11::3::90\n2::10::4::50\n",
        "ml-1m/movies.dat": "10::A (1990)::Drama\n11::B (1991)::Comedy|Drama\n",
        "ml-1m/README": "tiny\n"}


def test_download_file_url(tmp_path):
    archive, md5 = _zip(tmp_path / "ml-1m.zip", TINY)
    dest = tmp_path / "data"
    ratings = ds.download_grouplens("ml-1m", dest, url=archive.as_uri(), md5=md5)
    assert ratings == dest / "ml-1m" / "ratings.dat" and ratings.is_file()
    assert sorted(p.name for p in dest.iterdir()) == ["ml-1m"]  # the temporary download is gone
    store = ds.grouplens(ratings)
    assert _raw_sequences(store) == {1: [11, 10], 2: [10]} and store.side["items"].num_rows == 2


@pytest.fixture
def http_dir(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_http_with_md5_file(http_dir, tmp_path):
    root, base = http_dir
    members = {"ml-10M100K/ratings.dat": "1::10::5::100\n", "ml-10M100K/movies.dat": "10::A (1990)::Drama\n",
               "ml-10M100K/tags.dat": "1::10::good::100\n"}
    _, md5 = _zip(root / "ml-10m.zip", members)
    (root / "ml-10m.zip.md5").write_text(f"MD5 (ml-10m.zip) = {md5}\n")
    dest = tmp_path / "data"
    # no built-in checksum for this name -> <url>.md5 is fetched
    ratings = ds.download_grouplens("ml-10m", dest, url=f"{base}/ml-10m.zip", checksums={})
    assert ratings == dest / "ml-10M100K" / "ratings.dat" and ratings.read_text() == "1::10::5::100\n"
    with pytest.raises(DatasetError, match="HTTP 404"):
        ds.download_grouplens("ml-1m", dest, url=f"{base}/missing.zip", md5="0" * 32)


def test_download_checksum_mismatch_leaves_nothing(tmp_path):
    archive, md5 = _zip(tmp_path / "ml-1m.zip", TINY)
    dest = tmp_path / "data"
    with pytest.raises(DatasetError, match="MD5 checksum mismatch.*deleted"):
        ds.download_grouplens("ml-1m", dest, url=archive.as_uri())  # built-in table: the real ml-1m md5
    assert list(dest.iterdir()) == []
    with pytest.raises(DatasetError, match="MD5 checksum mismatch"):
        ds.download_grouplens("ml-1m", dest, url=archive.as_uri(), checksums={"ml-1m": "f" * 32})
    assert list(dest.iterdir()) == []


def test_download_offline(tmp_path):
    with pytest.raises(DatasetError, match="offline.*pass the local file"):
        ds.download_grouplens("ml-1m", tmp_path / "d", url="http://127.0.0.1:9/ml-1m.zip", timeout=5)
    with pytest.raises(DatasetError, match="offline"):
        ds.download_grouplens("ml-1m", tmp_path / "d", url=(tmp_path / "absent.zip").as_uri())
    assert list((tmp_path / "d").iterdir()) == []
    with pytest.raises(DatasetError, match="unknown GroupLens dataset 'ml-3m'"):
        ds.download_grouplens("ml-3m", tmp_path / "d")


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "ml-1m/../../evil.txt"])
def test_download_rejects_unsafe_members(tmp_path, member):
    archive, md5 = _zip(tmp_path / "ml-1m.zip", {**TINY, member: "x"})
    dest = tmp_path / "a" / "data"
    with pytest.raises(DatasetError, match="unsafe member path"):
        ds.download_grouplens("ml-1m", dest, url=archive.as_uri(), md5=md5)
    assert list(dest.iterdir()) == [] and not (tmp_path / "a" / "evil.txt").exists()


def test_download_archive_without_ratings(tmp_path):
    archive, md5 = _zip(tmp_path / "ml-1m.zip", {"ml-1m/README": "x"})
    with pytest.raises(DatasetError, match="has no ratings.dat"):
        ds.download_grouplens("ml-1m", tmp_path / "d", url=archive.as_uri(), md5=md5)


# ----------------------------------------------------------------------------------------------
# real datasets (read from ../shared/data at run time, never copied)


def _data_root() -> Path | None:
    for root in (Path(__file__).resolve().parents[2] / "shared" / "data", os.environ.get("GENREC_DATA")):
        if root and Path(root).is_dir():
            return Path(root)
    return None


DATA = _data_root()
needs_data = pytest.mark.skipif(DATA is None, reason="real datasets not found: ../shared/data is absent and GENREC_DATA is unset")

REAL = [
    ("ml1m_seq", "ml-1m", (6040, 3706, 1_000_209)),
    ("s3rec", "amazon-beauty/Beauty.txt", (22363, 12101, 198_502)),
    ("s3rec", "lastfm/LastFM.txt", (1090, 3646, 52_551)),
    ("recbole", "ml-100k", (943, 1682, 100_000)),
    ("bert4rec", "amazon-beauty-bert4rec/beauty.txt", (40226, 54542, 353_962)),
]


@needs_data
@pytest.mark.parametrize("fmt, rel, counts", REAL, ids=[r[1].split("/")[0] for r in REAL])
def test_real_dataset_counts(fmt, rel, counts):
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"{path} is absent")
    store = ds.READERS[fmt](path)
    assert (store.num_users, store.num_items, store.num_events) == counts
    assert store.lengths.min() >= 5
    if fmt == "recbole":
        assert store.timestamps is not None and store.actions is not None
        assert store.stats()["time_range"] == [874724710, 893286638]
        assert store.side["items"].num_rows == 1682 and store.side["users"].num_rows == 943
    if fmt == "ml1m_seq":
        assert store.side["items"].num_rows == 3883 and store.side["users"].num_rows == 6040
        assert set(store.item_vocab.raw.tolist()) <= set(store.side["items"].column("item_id").to_pylist())


@needs_data
def test_real_save_load_round_trip(tmp_path):
    path = DATA / "ml-1m"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    store = ds.ml1m_seq(path)
    out = store.save(tmp_path / "ml-1m")
    loaded = SequenceStore.load(out)
    assert (loaded.num_users, loaded.num_items, loaded.num_events) == (6040, 3706, 1_000_209)
    first_line = (path / "ml-1m_sequences_orig_ids.txt").read_text().split("\n", 1)[0].split()
    assert loaded.user_vocab.to_raw(0) == int(first_line[0])
    assert loaded.item_vocab.to_raw(loaded.user_items(0)).tolist() == [int(x) for x in first_line[1:]]
    assert loaded.manifest["source"]["inputs"][0]["sha256"] == \
        "3b3803d72c034929ada18b2cbd114296261c012b7a3e10282543adeceba53fb1"
    assert pq.read_table(out / "items_side.parquet").num_rows == 3883
