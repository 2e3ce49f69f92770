"""Built-in readers for public recommendation datasets, plus a GroupLens downloader.

Every reader turns files on disk into a :class:`SequenceStore` (not saved: the caller saves it) through
:func:`build_store`, recording the format, the input paths and their sha256 in ``manifest["source"]``.
Every reader accepts the filters of ``build_store`` (``dedup``, ``min_user_count``, ``min_item_count``).

Formats (the names are the CLI ``FORMAT`` names, see ``READERS``):

- ``s3rec``     one user per line, ``user item item ...`` (S3-Rec / ICLRec / FMLP-Rec / BSARec text files)
- ``ml1m_seq``  the ML-1M folder: ``ml-1m_sequences_orig_ids.txt`` (s3rec layout, GroupLens ids) with
                ``movies.dat`` / ``users.dat`` as side tables
- ``recbole``   RecBole atomic files: ``.inter`` (TSV, typed header ``name:type``) with ``.user`` / ``.item``
- ``bert4rec``  ``user item`` pairs, one per line, in time order (SASRec / BERT4Rec text files)
- ``grouplens`` MovieLens ratings: ``ratings.dat`` (``::``), ``ratings.csv`` (ML-20M/25M) or ``u.data`` (ML-100K)
- ``table``     any CSV / TSV / Parquet / JSONL with named columns

Side information (item / user attributes) is attached to the returned store as a plain attribute
``store.side = {"items": pa.Table, "users": pa.Table}``; the first column of each table is the raw id
(``item_id`` / ``user_id``). ``SequenceStore.save`` writes them with the dataset, atomically.

Parsing is vectorised: text files are tokenised with numpy over the raw bytes (token boundaries and
line numbers from the positions of whitespace and newlines) and converted with pyarrow compute kernels;
delimited files go through the pyarrow CSV reader. Errors name the file and the line.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genrec.data.ingest import (INT_ID_RE, build_store, ids_from_strings, line_field_counts, read_table,
                                 sha256_file, store_from_table)
from genrec.data.store import DatasetError, SequenceStore

__all__ = [
    "READERS",
    "DESCRIPTIONS",
    "GROUPLENS_MD5",
    "GROUPLENS_NAMES",
    "GROUPLENS_URL",
    "s3rec",
    "ml1m_seq",
    "recbole",
    "bert4rec",
    "grouplens",
    "table",
    "download_grouplens",
]

FILTER_KEYS = ("dedup", "min_user_count", "min_item_count")

# ASCII whitespace exactly as bytes.split() sees it: \t \n \v \f \r and space
_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True
_SEP = "\x1f"  # "::" is rewritten to this byte so the pyarrow CSV reader can split GroupLens files

_FLOAT_RE = r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$"


# ----------------------------------------------------------------------------------------------
# small helpers


def _check_filters(filters: dict) -> dict:
    unknown = sorted(set(filters) - set(FILTER_KEYS))
    if unknown:
        raise TypeError(f"unknown filter option(s) {', '.join(unknown)}; allowed: {', '.join(FILTER_KEYS)}")
    return filters


def _source(format_name: str, files: list[Path], **options) -> dict:
    src: dict = {
        "format": format_name,
        "inputs": [{"path": str(Path(p).resolve()), "sha256": sha256_file(p), "bytes": Path(p).stat().st_size}
                   for p in files],
    }
    options = {k: v for k, v in options.items() if v is not None}
    if options:
        src["options"] = options
    return src


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    return path


def _read_text_bytes(path: Path, fallback_encoding: str | None = None) -> bytes:
    """File bytes as UTF-8 with ``\\n`` line ends; a UTF-8 BOM is dropped.

    Non-UTF-8 input is an error naming the line, unless ``fallback_encoding`` (e.g. ISO-8859-1 for the
    GroupLens ``.dat`` files) is given, in which case the file is converted from it.
    """
    path = _require_file(Path(path))
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        raise DatasetError(f"{path}: the file is empty")
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            if fallback_encoding is None:
                line = data.count(b"\n", 0, e.start) + 1
                raise DatasetError(f"{path}: line {line}: not valid UTF-8 text ({e.reason})") from None
            data = data.decode(fallback_encoding).encode("utf-8")
    return data


def _numbers_as_actions(values: np.ndarray) -> np.ndarray:
    """Ratings: integral floats become int64 (4.0 -> 4), others stay float."""
    values = np.asarray(values)
    if values.dtype.kind == "f" and np.all(values == np.floor(values)):
        return values.astype(np.int64)
    return values


def _int_id_column(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Cast a side table's id column to int64 when every value is an integer."""
    if pa.types.is_integer(col.type):
        return pc.cast(col, pa.int64())
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        if len(col) and pc.all(pc.match_substring_regex(col, INT_ID_RE)).as_py():
            return pc.cast(col, pa.int64())
    return col


# ----------------------------------------------------------------------------------------------
# whitespace-separated text files (s3rec, ml1m_seq, bert4rec)


def _tokenize(path: Path) -> tuple[pa.Array, np.ndarray]:
    """All whitespace-separated tokens of a text file and the 1-based line number of each.

    Vectorised: a token starts at a non-space byte preceded by a space and ends before a space; the token
    bytes are packed with a boolean mask and wrapped as an Arrow string array (offsets = cumulative token
    lengths); line numbers come from ``searchsorted`` over the newline positions.
    """
    data = _read_text_bytes(path)
    buf = np.frombuffer(data, dtype=np.uint8)
    space = _SPACE[buf]
    nonspace = ~space
    is_start = nonspace.copy()
    is_start[1:] &= space[:-1]
    is_end = nonspace.copy()
    is_end[:-1] &= space[1:]
    starts = np.flatnonzero(is_start)
    ends = np.flatnonzero(is_end) + 1
    chars = buf[nonspace]  # token bytes, packed
    offsets = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(ends - starts, out=offsets[1:])
    tokens = pa.Array.from_buffers(pa.large_string(), len(starts),
                                   [None, pa.py_buffer(offsets), pa.py_buffer(chars)])
    newlines = np.flatnonzero(buf == 10)
    lines = np.searchsorted(newlines, starts) + 1
    return tokens, lines


def _lines_of_tokens(lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the first token of each non-blank line and the token count of each such line."""
    first = np.ones(len(lines), dtype=bool)
    first[1:] = lines[1:] != lines[:-1]
    first_idx = np.flatnonzero(first)
    counts = np.diff(np.append(first_idx, len(lines)))
    return first_idx, counts


def _read_user_lines(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``user item item ...`` per line -> parallel (users, items) arrays in file order."""
    tokens, lines = _tokenize(path)
    first_idx, counts = _lines_of_tokens(lines)
    lonely = np.flatnonzero(counts < 2)
    if len(lonely):
        k = first_idx[lonely[0]]
        raise DatasetError(
            f"{path}: line {int(lines[k])}: user {tokens[int(k)].as_py()!r} has no items "
            f"(expected 'user item item ...', space separated)"
        )
    is_item = np.ones(len(tokens), dtype=bool)
    is_item[first_idx] = False
    users = np.repeat(ids_from_strings(tokens.take(pa.array(first_idx))), counts - 1)
    items = ids_from_strings(tokens.filter(pa.array(is_item)))
    return users, items


def s3rec(path: str | Path, **filters) -> SequenceStore:
    """S3-Rec text file: one user per line, ``user item item ...``, chronological, no timestamps."""
    _check_filters(filters)
    path = _require_file(Path(path))
    users, items = _read_user_lines(path)
    return build_store(users, items, source=_source("s3rec", [path]), **filters)


def bert4rec(path: str | Path, **filters) -> SequenceStore:
    """BERT4Rec / SASRec text file: ``user item`` per line, grouped by user, in time order."""
    _check_filters(filters)
    path = _require_file(Path(path))
    tokens, lines = _tokenize(path)
    first_idx, counts = _lines_of_tokens(lines)
    bad = np.flatnonzero(counts != 2)
    if len(bad):
        k = int(first_idx[bad[0]])
        raise DatasetError(
            f"{path}: line {int(lines[k])}: expected 2 fields 'user item', got {int(counts[bad[0]])}"
        )
    users = ids_from_strings(tokens.take(pa.array(first_idx)))
    items = ids_from_strings(tokens.take(pa.array(first_idx + 1)))
    return build_store(users, items, source=_source("bert4rec", [path]), **filters)


# ----------------------------------------------------------------------------------------------
# delimited files through the pyarrow CSV reader, with line-level diagnosis on failure


def _row_lines(data: bytes, header_lines: int) -> np.ndarray:
    """1-based line number of each data row (the CSV reader skips empty lines and the header)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [len(buf)]))
    lines = np.flatnonzero(ends > starts) + 1
    return lines[lines > header_lines] if header_lines else lines


def _diagnose(path: Path, data: bytes, delimiter: str, names: list[str], header_lines: int,
              numeric: dict[str, str], quoting: bool, arrow_msg: str) -> DatasetError:
    """Find the first malformed line (field count, then non-numeric values) for an error message."""
    import pyarrow.csv as pcsv

    shown = {_SEP: "'::'", "\t": "tabs"}.get(delimiter, repr(delimiter))
    if not quoting:
        fields, nonempty = line_field_counts(data, delimiter)
        line_no = np.arange(1, len(fields) + 1)
        bad = np.flatnonzero(nonempty & (fields != len(names)) & (line_no > header_lines))
        if len(bad):
            b = int(bad[0])
            return DatasetError(
                f"{path}: line {b + 1}: expected {len(names)} fields separated by {shown} "
                f"({', '.join(names)}), got {int(fields[b])}"
            )
    try:
        strings = pcsv.read_csv(
            pa.BufferReader(data),
            read_options=pcsv.ReadOptions(column_names=names, skip_rows=header_lines),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoting else False),
            convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names}),
        )
    except pa.ArrowInvalid as e:
        return DatasetError(f"{path}: cannot parse: {str(e).splitlines()[0]}")
    rows = None
    for name, kind in numeric.items():
        ok = pc.match_substring_regex(strings.column(name), r"^[-+]?[0-9]{1,18}$" if kind == "int" else _FLOAT_RE)
        ok = ok.to_numpy(zero_copy_only=False)
        if not ok.all():
            r = int(np.flatnonzero(~ok)[0])
            rows = _row_lines(data, header_lines) if rows is None else rows
            value = strings.column(name)[r].as_py()
            what = "an integer" if kind == "int" else "a number"
            return DatasetError(f"{path}: line {int(rows[r])}: field {name!r} is {value!r}, expected {what}")
    return DatasetError(f"{path}: cannot parse: {arrow_msg}")


def _read_delimited(path: Path, data: bytes, delimiter: str, names: list[str], *,
                    types: dict[str, pa.DataType] | None = None, header_lines: int = 0,
                    quoting: bool = False) -> pa.Table:
    """Parse delimited text with pyarrow (multi-threaded); errors name the file and the line."""
    import pyarrow.csv as pcsv

    types = types or {}
    column_types = {n: types.get(n, pa.string()) for n in names}
    try:
        table = pcsv.read_csv(
            pa.BufferReader(data),
            read_options=pcsv.ReadOptions(column_names=names, skip_rows=header_lines),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoting else False),
            convert_options=pcsv.ConvertOptions(column_types=column_types, strings_can_be_null=False),
        )
    except pa.ArrowInvalid as e:
        numeric = {n: "int" if pa.types.is_integer(t) else "float"
                   for n, t in column_types.items() if pa.types.is_integer(t) or pa.types.is_floating(t)}
        raise _diagnose(path, data, delimiter, names, header_lines, numeric, quoting,
                        str(e).splitlines()[0]) from None
    if table.num_rows == 0:
        raise DatasetError(f"{path}: no data rows")
    return table


def _no_nulls(table: pa.Table, name: str, path: Path, data: bytes, header_lines: int) -> pa.ChunkedArray:
    col = table.column(name)
    empty = pc.is_null(col)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        empty = pc.or_(empty, pc.equal(pc.utf8_trim_whitespace(col), ""))
    if pc.any(empty).as_py():
        r = int(np.flatnonzero(empty.to_numpy(zero_copy_only=False))[0])
        line = int(_row_lines(data, header_lines)[r])
        raise DatasetError(f"{path}: line {line}: field {name!r} is empty")
    return col


# ----------------------------------------------------------------------------------------------
# GroupLens side tables


def _read_movies(path: Path) -> pa.Table:
    """``movies.dat`` (``MovieID::Title::Genres``, ISO-8859-1) or ``movies.csv`` (ML-20M, quoted CSV)."""
    data = _read_text_bytes(path, fallback_encoding="iso-8859-1")
    names = ["item_id", "title", "genres"]
    if path.suffix.lower() == ".csv":
        t = _read_delimited(path, data, ",", names, types={"item_id": pa.int64()}, header_lines=1, quoting=True)
    else:
        t = _read_delimited(path, data.replace(b"::", _SEP.encode()), _SEP, names, types={"item_id": pa.int64()})
    return t.set_column(2, "genres", pc.split_pattern(t.column("genres"), "|"))


def _read_users_dat(path: Path) -> pa.Table:
    """``users.dat``: ``UserID::Gender::Age::Occupation::Zip-code``."""
    data = _read_text_bytes(path, fallback_encoding="iso-8859-1").replace(b"::", _SEP.encode())
    names = ["user_id", "gender", "age", "occupation", "zip_code"]
    return _read_delimited(path, data, _SEP, names,
                           types={"user_id": pa.int64(), "age": pa.int64(), "occupation": pa.int64()})


def _read_ml100k_users(path: Path) -> pa.Table:
    """ML-100K ``u.user``: ``user id | age | gender | occupation | zip code``."""
    data = _read_text_bytes(path, fallback_encoding="iso-8859-1")
    names = ["user_id", "age", "gender", "occupation", "zip_code"]
    return _read_delimited(path, data, "|", names, types={"user_id": pa.int64(), "age": pa.int64()})


def _read_ml100k_items(path: Path) -> pa.Table:
    """ML-100K ``u.item``: id | title | release date | video release date | IMDb URL | 19 genre flags."""
    data = _read_text_bytes(path, fallback_encoding="iso-8859-1")
    flag_names = [f"genre_{k}" for k in range(19)]
    names = ["item_id", "title", "release_date", "video_release_date", "imdb_url"] + flag_names
    t = _read_delimited(path, data, "|", names, types={"item_id": pa.int64(), **{f: pa.int8() for f in flag_names}})
    genre_file = path.with_name("u.genre")
    labels = np.array(flag_names, dtype=object)
    if genre_file.is_file():  # "name|index" per line
        g = _read_delimited(genre_file, _read_text_bytes(genre_file), "|", ["name", "index"],
                            types={"index": pa.int64()})
        idx = g.column("index").to_numpy()
        if len(idx) == 19 and sorted(idx.tolist()) == list(range(19)):
            labels[idx] = g.column("name").to_numpy(zero_copy_only=False)
    flags = np.stack([t.column(f).to_numpy() for f in flag_names], axis=1) != 0  # (n, 19)
    rows, cols = np.nonzero(flags)  # row-major: genres of a movie in flag order
    offsets = np.zeros(len(flags) + 1, dtype=np.int32)
    np.cumsum(flags.sum(axis=1), out=offsets[1:])
    genres = pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels[cols].tolist(), type=pa.string()))
    return t.select(names[:5]).append_column("genres", genres)


def _attach_side(store: SequenceStore, items: pa.Table | None, users: pa.Table | None) -> SequenceStore:
    """Set ``store.side``; id columns get the raw-id type of the store's vocabularies where possible."""
    side = {}
    for key, tab, vocab in (("items", items, store.item_vocab), ("users", users, store.user_vocab)):
        if tab is None:
            continue
        if vocab.is_integer:
            tab = tab.set_column(0, tab.column_names[0], _int_id_column(tab.column(0)))
        elif pa.types.is_integer(tab.column(0).type):
            tab = tab.set_column(0, tab.column_names[0], pc.cast(tab.column(0), pa.string()))
        side[key] = tab
    store.side = side
    return store


# ----------------------------------------------------------------------------------------------
# ML-1M sequences


ML1M_SEQUENCES = "ml-1m_sequences_orig_ids.txt"


def ml1m_seq(path: str | Path, **filters) -> SequenceStore:
    """ML-1M as per-user sequences (``ml-1m_sequences_orig_ids.txt``) + ``movies.dat`` / ``users.dat``."""
    _check_filters(filters)
    path = Path(path)
    seq = path / ML1M_SEQUENCES if path.is_dir() else path
    if not seq.is_file():
        raise DatasetError(f"{seq}: file not found (ml1m_seq expects the ML-1M folder containing {ML1M_SEQUENCES})")
    folder = seq.parent
    movies, users_dat = folder / "movies.dat", folder / "users.dat"
    users, items = _read_user_lines(seq)
    inputs = [seq] + [p for p in (movies, users_dat) if p.is_file()]
    store = build_store(users, items, source=_source("ml1m_seq", inputs), **filters)
    return _attach_side(store,
                        _read_movies(movies) if movies.is_file() else None,
                        _read_users_dat(users_dat) if users_dat.is_file() else None)


# ----------------------------------------------------------------------------------------------
# RecBole atomic files


RECBOLE_TYPES = {"token": pa.string(), "token_seq": pa.string(), "float": pa.float64(), "float_seq": pa.string()}


def _recbole_header(path: Path, data: bytes) -> tuple[list[str], dict[str, pa.DataType]]:
    header = data.split(b"\n", 1)[0].decode("utf-8")
    names, types = [], {}
    for field in header.split("\t"):
        field = field.strip()
        name, colon, kind = field.rpartition(":")
        if not colon or not name:
            raise DatasetError(
                f"{path}: line 1: header field {field!r} has no ':type'; RecBole atomic files need a typed, "
                f"tab-separated header such as 'user_id:token<TAB>item_id:token<TAB>timestamp:float'"
            )
        if kind not in RECBOLE_TYPES:
            raise DatasetError(
                f"{path}: line 1: header field {field!r} has unknown type {kind!r}; "
                f"expected one of {', '.join(RECBOLE_TYPES)}"
            )
        if name in types:
            raise DatasetError(f"{path}: line 1: header field {name!r} appears twice")
        names.append(name)
        types[name] = RECBOLE_TYPES[kind]
    return names, types


def _read_recbole_file(path: Path) -> tuple[pa.Table, bytes]:
    data = _read_text_bytes(path)
    names, types = _recbole_header(path, data)
    return _read_delimited(path, data, "\t", names, types=types, header_lines=1), data


def _recbole_side(path: Path, id_col: str, out_name: str) -> pa.Table:
    tab, _ = _read_recbole_file(path)
    if id_col not in tab.column_names:
        raise DatasetError(f"{path}: no field {id_col!r}; fields are {', '.join(tab.column_names)}")
    rest = [c for c in tab.column_names if c != id_col]
    return pa.table([tab.column(id_col)] + [tab.column(c) for c in rest], names=[out_name] + rest)


def recbole(path: str | Path, user_col: str = "user_id", item_col: str = "item_id",
            time_col: str | None = "timestamp", action_col: str | None = "rating", **filters) -> SequenceStore:
    """RecBole atomic files: the ``.inter`` file (or its folder) plus ``.user`` / ``.item`` beside it.

    ``time_col`` (as int seconds) and ``action_col`` are used when the file has them; pass None to ignore.
    """
    _check_filters(filters)
    path = Path(path)
    if path.is_dir():
        inters = sorted(path.glob("*.inter"))
        if len(inters) != 1:
            found = ", ".join(p.name for p in inters) or "none"
            raise DatasetError(f"{path}: expected exactly one .inter file in the folder, found {found}; pass the file")
        path = inters[0]
    _require_file(path)
    table, data = _read_recbole_file(path)
    for name, role in ((user_col, "user"), (item_col, "item")):
        if name not in table.column_names:
            raise DatasetError(f"{path}: no field {name!r} for the {role}; fields are {', '.join(table.column_names)}")
    users = ids_from_strings(_no_nulls(table, user_col, path, data, 1))
    items = ids_from_strings(_no_nulls(table, item_col, path, data, 1))
    ts = actions = None
    if time_col and time_col in table.column_names:
        col = _no_nulls(table, time_col, path, data, 1)
        if not pa.types.is_floating(col.type):
            raise DatasetError(f"{path}: line 1: field {time_col!r} must be declared :float (unix seconds)")
        ts = np.floor(col.to_numpy()).astype(np.int64)
    if action_col and action_col in table.column_names:
        col = _no_nulls(table, action_col, path, data, 1)
        actions = _numbers_as_actions(col.to_numpy()) if pa.types.is_floating(col.type) else ids_from_strings(col)
    item_file, user_file = path.with_suffix(".item"), path.with_suffix(".user")
    inputs = [path] + [p for p in (item_file, user_file) if p.is_file()]
    src = _source("recbole", inputs, time_col=time_col if ts is not None else None,
                  action_col=action_col if actions is not None else None)
    ratings = col.to_numpy() if actions is not None and pa.types.is_floating(col.type) else None
    store = build_store(users, items, ts, actions, ratings, source=src, **filters)
    return _attach_side(store,
                        _recbole_side(item_file, item_col, "item_id") if item_file.is_file() else None,
                        _recbole_side(user_file, user_col, "user_id") if user_file.is_file() else None)


# ----------------------------------------------------------------------------------------------
# GroupLens ratings


GROUPLENS_RATINGS = ("ratings.dat", "ratings.csv", "u.data")
_RATING_NAMES = ["user_id", "item_id", "rating", "timestamp"]
_RATING_TYPES = {"user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()}
_CSV_HEADER = ["userId", "movieId", "rating", "timestamp"]


def _find_ratings(path: Path) -> Path:
    if path.is_dir():
        for name in GROUPLENS_RATINGS:
            if (path / name).is_file():
                return path / name
        raise DatasetError(f"{path}: no {', '.join(GROUPLENS_RATINGS)} in this folder")
    return _require_file(path)


def _read_ratings(path: Path) -> tuple[pa.Table, bytes, int]:
    """Ratings as (user_id, item_id, rating, timestamp); the layout is told from the first line."""
    data = _read_text_bytes(path, fallback_encoding="iso-8859-1")
    first = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    if "::" in first:
        return _read_delimited(path, data.replace(b"::", _SEP.encode()), _SEP, _RATING_NAMES,
                               types=_RATING_TYPES), data, 0
    if "\t" in first:  # ML-100K u.data
        return _read_delimited(path, data, "\t", _RATING_NAMES, types=_RATING_TYPES), data, 0
    if "," in first:
        fields = [f.strip().strip('"') for f in first.split(",")]
        if re.fullmatch(r"-?\d+", fields[0]):
            header = 0
        elif fields == _CSV_HEADER:
            header = 1
        else:
            raise DatasetError(f"{path}: line 1: header {first!r}; expected {','.join(_CSV_HEADER)}")
        return _read_delimited(path, data, ",", _RATING_NAMES, types=_RATING_TYPES, header_lines=header), data, header
    raise DatasetError(
        f"{path}: line 1: {first[:80]!r} is not a GroupLens ratings row "
        f"(UserID::MovieID::Rating::Timestamp, userId,movieId,rating,timestamp or tab-separated u.data)"
    )


def grouplens(path: str | Path, **filters) -> SequenceStore:
    """MovieLens ratings (``ratings.dat``, ``ratings.csv`` or ``u.data``, or their folder); rating = action.

    Side tables from ``movies.dat`` / ``movies.csv`` / ``users.dat`` (or ML-100K ``u.item`` / ``u.user``)
    beside the ratings file, when present.
    """
    _check_filters(filters)
    path = _find_ratings(Path(path))
    table, data, header = _read_ratings(path)
    for name in _RATING_NAMES:
        _no_nulls(table, name, path, data, header)
    users = table.column("user_id").to_numpy()
    items = table.column("item_id").to_numpy()
    ts = table.column("timestamp").to_numpy()
    actions = _numbers_as_actions(table.column("rating").to_numpy())

    folder = path.parent
    if path.name == "u.data":
        item_file, user_file = folder / "u.item", folder / "u.user"
        read_items, read_users = _read_ml100k_items, _read_ml100k_users
    else:
        item_file = next((p for p in (folder / "movies.dat", folder / "movies.csv") if p.is_file()), folder / "movies.dat")
        user_file = folder / "users.dat"
        read_items, read_users = _read_movies, _read_users_dat
    inputs = [path] + [p for p in (item_file, user_file) if p.is_file()]
    store = build_store(users, items, ts, actions, table.column("rating").to_numpy(),
                        source=_source("grouplens", inputs), **filters)
    return _attach_side(store,
                        read_items(item_file) if item_file.is_file() else None,
                        read_users(user_file) if user_file.is_file() else None)


# ----------------------------------------------------------------------------------------------
# generic table


def table(path: str | Path, user_col: str = "user", item_col: str = "item", time_col: str | None = None,
          action_col: str | None = None, fmt: str | None = None, sep: str | None = None,
          rating_col: str | None = None, **filters) -> SequenceStore:
    """Any CSV / TSV / Parquet / JSONL file with one interaction per row and named columns."""
    _check_filters(filters)
    path = Path(path)
    tab = read_table(path, fmt=fmt, sep=sep, string_columns=[user_col, item_col])
    src = _source("table", [path], fmt=fmt, sep=sep, user_col=user_col, item_col=item_col,
                  time_col=time_col, action_col=action_col, rating_col=rating_col)
    return store_from_table(tab, path, user_col=user_col, item_col=item_col, time_col=time_col,
                            action_col=action_col, rating_col=rating_col, source=src, **filters)


# ----------------------------------------------------------------------------------------------
# download


GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/{name}.zip"
GROUPLENS_NAMES = ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m")
# MD5 of the zip files as published by GroupLens (<url>.md5); names missing here fetch <url>.md5.
GROUPLENS_MD5 = {
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
}


def _offline_error(url: str, name: str, reason: object) -> DatasetError:
    ratings = "u.data" if name == "ml-100k" else "ratings.csv" if name in ("ml-20m", "ml-25m") else "ratings.dat"
    return DatasetError(
        f"cannot download {url}: {reason}. The machine seems to be offline (or the server is unreachable). "
        f"Download {name}.zip on a machine with network access, unzip it, and pass the local file instead: "
        f"the 'grouplens' format reads .../{name}/{ratings} (or its folder)."
    )


def _fetch_md5(url: str, name: str, timeout: float) -> str:
    md5_url = url + ".md5"
    try:
        with urllib.request.urlopen(md5_url, timeout=timeout) as resp:
            text = resp.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        raise DatasetError(
            f"no known checksum for {name} and {md5_url} answered HTTP {e.code}; pass md5=... to download_grouplens"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        raise _offline_error(md5_url, name, getattr(e, "reason", e)) from None
    found = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    if not found:
        raise DatasetError(f"{md5_url}: no MD5 checksum in the answer; pass md5=... to download_grouplens")
    return found.group(0).lower()


def _safe_members(zf: zipfile.ZipFile, archive: str) -> list[zipfile.ZipInfo]:
    members = zf.infolist()
    for info in members:
        name = info.filename.replace("\\", "/")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in PurePosixPath(name).parts:
            raise DatasetError(f"{archive}: unsafe member path {info.filename!r} (absolute or '..'); not extracting")
    return members


def download_grouplens(name: str, dest_dir: str | Path, url: str | None = None, timeout: float = 30,
                       md5: str | None = None, checksums: dict[str, str] | None = None) -> Path:
    """Download a MovieLens zip, check its MD5, extract it into ``dest_dir``; return the ratings file.

    ``url`` overrides the GroupLens address (``file://`` works); ``md5`` overrides the expected checksum
    and ``checksums`` the built-in table (``GROUPLENS_MD5``). Without a known checksum, ``<url>.md5`` is
    fetched. A failed check deletes the download.
    """
    if name not in GROUPLENS_NAMES and url is None:
        raise DatasetError(f"unknown GroupLens dataset {name!r}; choose one of {', '.join(GROUPLENS_NAMES)}")
    url = url or GROUPLENS_URL.format(name=name)
    known = GROUPLENS_MD5 if checksums is None else checksums
    expected = (md5 or known.get(name) or _fetch_md5(url, name, timeout)).lower()
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.zip.", suffix=".part", dir=dest)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5()
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                total = resp.headers.get("Content-Length")
                from tqdm.auto import tqdm

                with tqdm(total=int(total) if total and total.isdigit() else None, unit="B", unit_scale=True,
                          desc=f"{name}.zip", disable=not sys.stderr.isatty()) as bar:
                    while block := resp.read(1 << 20):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        except urllib.error.HTTPError as e:
            raise DatasetError(
                f"cannot download {url}: the server answered HTTP {e.code} {e.reason}. Download {name}.zip "
                f"by hand, unzip it, and pass the local ratings file to the 'grouplens' format instead."
            ) from None
        except (urllib.error.URLError, OSError) as e:
            raise _offline_error(url, name, getattr(e, "reason", e)) from None
        got = digest.hexdigest()
        if got != expected:
            raise DatasetError(
                f"{url}: MD5 checksum mismatch (expected {expected}, got {got}); the download is corrupt or "
                f"the file changed, so it was deleted. Try again, or pass md5=... if the new file is trusted."
            )
        try:
            with zipfile.ZipFile(tmp) as zf:
                members = _safe_members(zf, url)
                zf.extractall(dest, members=members)
        except zipfile.BadZipFile as e:
            raise DatasetError(f"{url}: not a valid zip file ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)

    candidates = [m.filename for m in members if not m.is_dir() and PurePosixPath(m.filename).name in GROUPLENS_RATINGS]
    if not candidates:
        raise DatasetError(f"{url}: the archive has no {', '.join(GROUPLENS_RATINGS)}")
    best = min(candidates, key=lambda m: (len(PurePosixPath(m).parts), GROUPLENS_RATINGS.index(PurePosixPath(m).name)))
    return dest / best


# ----------------------------------------------------------------------------------------------
# registry


READERS = {
    "s3rec": s3rec,
    "ml1m_seq": ml1m_seq,
    "recbole": recbole,
    "bert4rec": bert4rec,
    "grouplens": grouplens,
    "table": table,
}

DESCRIPTIONS = {
    "s3rec": "S3-Rec/ICLRec text file: one user per line, 'user item item ...' in time order (Beauty.txt, LastFM.txt)",
    "ml1m_seq": "ML-1M folder: ml-1m_sequences_orig_ids.txt (user + movies in time order) with movies.dat/users.dat",
    "recbole": "RecBole atomic files: .inter TSV with typed header 'name:type', plus .user/.item side files",
    "bert4rec": "BERT4Rec/SASRec text file: 'user item' per line, grouped by user, in time order",
    "grouplens": "MovieLens ratings.dat (::), ratings.csv (ML-20M/25M) or u.data (ML-100K), rating as action",
    "table": "generic CSV/TSV/Parquet/JSONL with user, item and optional time/action columns",
}
