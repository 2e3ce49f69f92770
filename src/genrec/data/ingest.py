"""Ingest: interaction columns -> a sorted, filtered, dense-id SequenceStore. Vectorised throughout.

``read_table`` reads CSV/TSV/Parquet/JSONL with pyarrow and checks the schema with errors that name the
file, the column and the row. ``build_store`` does the rest: dense ids, stable sort by (user, time,
file order), duplicate removal, k-core filtering and CSR offsets.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genrec.data.store import DatasetError, SequenceStore
from genrec.data.vocab import Vocab

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet",
                  ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# reading tables


def read_table(path: str | Path, fmt: str | None = None, sep: str | None = None,
               columns: list[str] | None = None, header: bool = True,
               column_names: list[str] | None = None, string_columns: list[str] = ()) -> pa.Table:
    """Read a CSV/TSV/Parquet/JSONL file into a pyarrow Table; errors name the file and the problem."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: the file is empty")
    fmt = fmt or TABLE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(f"{path}: cannot tell the format from the suffix; pass --format csv|tsv|parquet|jsonl")
    try:
        if fmt in ("csv", "tsv"):
            delimiter = sep or ("\t" if fmt == "tsv" else ",")
            table = pcsv.read_csv(
                path,
                read_options=pcsv.ReadOptions(column_names=column_names, autogenerate_column_names=not header and column_names is None),
                parse_options=pcsv.ParseOptions(delimiter=delimiter),
                convert_options=pcsv.ConvertOptions(include_columns=columns, strings_can_be_null=False,
                                                    column_types={c: pa.string() for c in string_columns}),
            )
        elif fmt == "parquet":
            table = pq.read_table(path, columns=columns)
        elif fmt == "jsonl":
            table = pjson.read_json(path)
        else:
            raise DatasetError(f"{path}: unknown format {fmt!r}; use csv, tsv, parquet or jsonl")
    except (pa.ArrowInvalid, pa.ArrowKeyError, KeyError) as e:
        msg = str(e).split("\n")[0]
        if fmt in ("csv", "tsv"):
            where = _first_ragged_line(path, sep or ("\t" if fmt == "tsv" else ","))
            if where is not None:
                line, got, expected = where
                raise DatasetError(f"{path}: line {line}: {got} fields, but the first line has {expected} "
                                   f"(check --sep and quoting)") from None
        hint = " (check --sep and the column names)" if fmt in ("csv", "tsv") else ""
        raise DatasetError(f"{path}: cannot read as {fmt}: {msg}{hint}") from None
    if table.num_rows == 0:
        raise DatasetError(f"{path}: no rows")
    return table


def line_field_counts(data: bytes, delimiter: str) -> tuple[np.ndarray, np.ndarray]:
    """Per line of ``data``: the number of ``delimiter``-separated fields, and whether it is non-empty.

    Vectorised over the bytes (error paths use it to name the first malformed line); quotes are not
    interpreted and the delimiter must be a single byte.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    n_lines = len(newlines) + 1
    fields = np.bincount(np.searchsorted(newlines, np.flatnonzero(buf == ord(delimiter))), minlength=n_lines) + 1
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [len(buf)]))
    return fields, ends > starts


def _first_ragged_line(path: Path, delimiter: str) -> tuple[int, int, int] | None:
    """(line, fields, expected) of the first non-empty line whose field count differs from line 1.

    Files with quotes are skipped (a quoted field may hold the delimiter), and so are multi-byte
    delimiters.
    """
    data = path.read_bytes()
    if len(delimiter.encode()) != 1 or b'"' in data:
        return None
    fields, nonempty = line_field_counts(data, delimiter)
    bad = np.flatnonzero(nonempty & (fields != fields[0]))
    return (int(bad[0]) + 1, int(fields[bad[0]]), int(fields[0])) if len(bad) else None


def column(table: pa.Table, name: str, path: str | Path, role: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DatasetError(
            f"{path}: no column {name!r} for the {role}; columns are {', '.join(table.column_names)} "
            f"(set the name with --{role}-col)"
        )
    col = table.column(name)
    if col.null_count:
        row = int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0])
        raise DatasetError(f"{path}: row {row + 1}: {role} column {name!r} is empty")
    return col


# integer ids: no leading zeros (so "007" stays the string "007" and raw ids round-trip exactly), <= 18 digits
INT_ID_RE = r"^(0|-?[1-9][0-9]{0,17})$"


def ids_from_strings(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """String ids -> int64 array when every id is a plain integer, else an object array of str."""
    if len(col) and pc.all(pc.match_substring_regex(col, INT_ID_RE)).as_py():
        return np.asarray(pc.cast(col, pa.int64()).to_numpy(), dtype=np.int64)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)


def ids_to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    """Raw id column -> int64 array if it holds integers, else an array of str.

    Text columns go through :func:`ids_from_strings` (the rule every reader shares), so "007" and "7"
    stay two different ids and "1.0" is not the integer 1.
    """
    if pa.types.is_integer(col.type):
        return col.to_numpy().astype(np.int64)
    return ids_from_strings(col.cast(pa.string()))


def timestamps_to_numpy(col: pa.ChunkedArray, path: str | Path, name: str) -> np.ndarray:
    """Timestamp column -> int64 unix seconds (floored). Numbers are seconds; dates/strings are parsed."""
    t = col.type
    if pa.types.is_integer(t):
        return col.to_numpy().astype(np.int64)
    if pa.types.is_floating(t):
        return np.floor(col.to_numpy()).astype(np.int64)
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return _datetime_seconds(col)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        trimmed = pc.utf8_trim_whitespace(col)
        numeric = pc.match_substring_regex(trimmed, r"^-?\d+(\.\d*)?$")
        if pc.all(numeric).as_py():
            return np.floor(pc.cast(trimmed, pa.float64()).to_numpy()).astype(np.int64)
        for target in (pa.timestamp("ns"), pa.timestamp("ns", tz="UTC")):  # naive ISO, then with offsets
            try:
                return _datetime_seconds(pc.cast(trimmed, target))
            except pa.ArrowInvalid:
                continue
        row, value = _first_bad_timestamp(trimmed, numeric)
        raise DatasetError(f"{path}: row {row + 1}: timestamp {value!r} in column {name!r} is neither a number "
                           f"(unix seconds) nor an ISO date/time")
    raise DatasetError(f"{path}: timestamp column {name!r} has type {t}; expected numbers or date/times")


def _datetime_seconds(col) -> np.ndarray:
    """Timestamp/date column of any unit -> int64 unix seconds, floored."""
    if pa.types.is_date(col.type):
        col = pc.cast(col, pa.timestamp("s"))
    unit = col.type.unit
    factor = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[unit]
    values = pc.cast(col, pa.int64()).to_numpy()
    return np.floor_divide(values, factor)


def _parses(value: str, target: pa.DataType) -> bool:
    try:
        pa.array([value]).cast(target)
        return True
    except pa.ArrowInvalid:
        return False


def _first_bad_timestamp(col: pa.ChunkedArray, numeric: pa.ChunkedArray) -> tuple[int, str]:
    """Row and value of the first entry that is neither a number nor a parseable date/time."""
    candidates = np.flatnonzero(~numeric.to_numpy(zero_copy_only=False))
    values = col.to_pylist()
    for i in candidates:  # only runs on the error path
        if not any(_parses(values[i], target) for target in (pa.timestamp("ns"), pa.timestamp("ns", tz="UTC"))):
            return int(i), values[i]
    return int(candidates[0]) if len(candidates) else 0, values[0]


# ----------------------------------------------------------------------------------------------
# building the store


def factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique values and the inverse index (dense, 0-based)."""
    uniques, inverse = np.unique(values, return_inverse=True)
    return uniques, inverse.reshape(-1)


def kcore_mask(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """Rows kept by iterative k-core filtering (users with >= min_user events, items with >= min_item)."""
    keep = np.ones(len(users), dtype=bool)
    if min_user <= 1 and min_item <= 1:
        return keep
    nu, ni = int(users.max()) + 1, int(items.max()) + 1
    while True:
        u_cnt = np.bincount(users[keep], minlength=nu)
        i_cnt = np.bincount(items[keep], minlength=ni)
        new_keep = keep & (u_cnt[users] >= min_user) & (i_cnt[items] >= min_item)
        if new_keep.sum() == keep.sum():
            return new_keep
        keep = new_keep


def build_store(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray | None = None,
                actions: np.ndarray | None = None, ratings: np.ndarray | None = None, *,
                dedup: str = "none", min_user_count: int = 0,
                min_item_count: int = 0, source: dict | None = None) -> SequenceStore:
    """Turn parallel event columns (raw ids) into a SequenceStore.

    Events are sorted per user by timestamp, ties kept in input order (stable); without timestamps the
    input order is the time order. ``dedup``: "none", "exact" (same user, item and timestamp) or
    "pair" (keep only a user's first interaction with an item).
    """
    n = len(users)
    if n == 0:
        raise DatasetError("no interactions to prepare")
    if any(c is not None and len(c) != n for c in (items, timestamps, actions, ratings)):
        raise DatasetError("event columns have different lengths")
    if dedup not in ("none", "exact", "pair"):
        raise DatasetError(f"dedup must be none, exact or pair, got {dedup!r}")

    user_raw, u = factorize(users)
    item_raw, i = factorize(items)
    row = np.arange(n, dtype=np.int64)
    order = np.lexsort((row, timestamps, u)) if timestamps is not None else np.lexsort((row, u))
    u, i = u[order], i[order]
    ts = timestamps[order] if timestamps is not None else None
    act = actions[order] if actions is not None else None
    rat = np.asarray(ratings, dtype=np.float32)[order] if ratings is not None else None

    keep = np.ones(n, dtype=bool)
    if dedup != "none":
        keys = [u, i] if dedup == "pair" or ts is None else [u, i, ts]
        stacked = np.stack(keys, axis=1)
        _, first = np.unique(stacked, axis=0, return_index=True)
        keep[:] = False
        keep[first] = True
    keep &= kcore_mask(u, i, min_user_count, min_item_count)
    if not keep.any():
        raise DatasetError("no interactions left after filtering; lower the minimum counts")
    if not keep.all():
        u, i = u[keep], i[keep]
        ts = ts[keep] if ts is not None else None
        act = act[keep] if act is not None else None
        rat = rat[keep] if rat is not None else None
        # re-densify ids so that filtered-out users/items disappear from the vocabularies
        uu, u = np.unique(u, return_inverse=True)
        ii, i = np.unique(i, return_inverse=True)
        user_raw, item_raw = user_raw[uu], item_raw[ii]

    counts = np.bincount(u, minlength=len(user_raw))
    offsets = np.zeros(len(user_raw) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    manifest = {"source": source or {}, "filters": {"dedup": dedup, "min_user_count": min_user_count,
                                                     "min_item_count": min_item_count,
                                                     "rows_in": int(n), "rows_kept": int(len(u))}}
    action_store = None
    if act is not None:
        names, codes = factorize(act)
        action_store = (codes + 1).astype(np.int16)  # 0 stays "no action" / padding
        manifest["actions"] = [str(x) for x in names.tolist()]
    return SequenceStore(
        offsets=offsets,
        items=(i + 1).astype(np.int32),
        user_vocab=Vocab(user_raw, start=0),
        item_vocab=Vocab(item_raw, start=1),
        timestamps=ts.astype(np.int64) if ts is not None else None,
        actions=action_store,
        ratings=rat,
        manifest=manifest,
    )


def store_from_table(table: pa.Table, path: str | Path, user_col: str = "user", item_col: str = "item",
                     time_col: str | None = None, action_col: str | None = None, rating_col: str | None = None,
                     **kwargs) -> SequenceStore:
    users = ids_to_numpy(column(table, user_col, path, "user"))
    items = ids_to_numpy(column(table, item_col, path, "item"))
    ts = None
    if time_col:
        ts = timestamps_to_numpy(column(table, time_col, path, "time"), path, time_col)
    actions = None
    if action_col:
        actions = ids_to_numpy(column(table, action_col, path, "action"))
    ratings = None
    if rating_col:
        col = column(table, rating_col, path, "rating")
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            raise DatasetError(f"{path}: rating column {rating_col!r} has type {col.type}; expected numbers")
        ratings = col.to_numpy().astype(np.float32)
    return build_store(users, items, ts, actions, ratings, **kwargs)
