"""Batch recommendations: a file of histories in, a file of top-K lists out, in bounded memory.

Input (one row per user): Parquet, JSON lines or CSV / TSV with a ``history`` column (a list of raw item
ids, oldest first; in CSV a string of ids separated by commas or spaces), optionally ``user`` (any id,
copied to the output) and ``timestamps`` (unix seconds, one per history item). Output: Parquet or JSON
lines with ``user``, ``items`` (raw ids, best first, in the vocabulary's type: integers or strings),
``scores``, ``unknown`` (history ids the model does not know, ignored) and ``fallback`` (true when
nothing in the history was known: popular items).

The input is read 16 x ``batch_size`` rows at a time (sorted by length inside the read, so each forward
pass of ``batch_size`` users pads little) and each read is written before the next, so memory does not
depend on the file's size. The output is written to a temporary file next to it and
renamed at the end: a failure (a malformed row, an interrupt) never leaves a partial output behind and
never touches an existing file unless ``overwrite``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from genrec.infer.recommender import Recommender

INPUT_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
                 ".tsv": "tsv"}
OUTPUT_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
_SPLIT = re.compile(r"[,\s]+")


def _format(path: Path, formats: dict, what: str) -> str:
    fmt = formats.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown {what} format {path.suffix!r}; use one of {', '.join(sorted(formats))}")
    return fmt


def _ids(value, where: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [x for x in _SPLIT.split(value.strip()) if x]
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    raise ValueError(f"{where}: 'history' must be a list of item ids or a string of ids, got {type(value).__name__}")


def _row(record: dict, where: str) -> tuple[object, list, list | None]:
    if not isinstance(record, dict) or "history" not in record:
        raise ValueError(f"{where}: every row needs a 'history' column (list of raw item ids)")
    history = _ids(record["history"], where)
    times = record.get("timestamps")
    if times is not None:
        try:
            times = [int(t) for t in _ids(times, where)]
        except (TypeError, ValueError):
            raise ValueError(f"{where}: 'timestamps' must be integers (unix seconds)") from None
        if len(times) != len(history):
            raise ValueError(f"{where}: {len(times)} timestamps for {len(history)} history items")
    return record.get("user"), history, times


def read_histories(path: str | Path, batch_size: int = 1024) -> Iterator[list[tuple[object, list, list | None]]]:
    """Batches of (user, history, timestamps or None), ``batch_size`` rows at a time."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found")
    fmt = _format(path, INPUT_FORMATS, "input")
    batch: list = []
    if fmt == "parquet":
        import pyarrow.parquet as pq

        n = 0
        for chunk in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            for record in chunk.to_pylist():
                n += 1
                batch.append(_row(record, f"{path}: row {n}"))
            yield batch
            batch = []
        return
    with open(path, newline="" if fmt in ("csv", "tsv") else None, encoding="utf-8") as f:
        if fmt == "jsonl":
            rows = ((i, line) for i, line in enumerate(f, 1) if line.strip())

            def parse(i, line):
                try:
                    return json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
        else:
            reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
            rows = ((i, r) for i, r in enumerate(reader, 2))

            def parse(i, r):
                return r
        for i, raw in rows:
            batch.append(_row(parse(i, raw), f"{path}: line {i}"))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


class _Writer:
    def __init__(self, path: Path, fmt: str, integer_ids: bool):
        self.path, self.fmt, self.writer, self.file = path, fmt, None, None
        self.integer_ids = integer_ids  # the vocabulary's raw id type: Parquet stores int64 or string lists
        if fmt == "jsonl":
            self.file = open(path, "w", encoding="utf-8")

    def write(self, users: list, recs: list) -> None:
        if self.fmt == "jsonl":
            for user, r in zip(users, recs):
                self.file.write(json.dumps({"user": user, "items": r.items, "scores": [round(s, 6) for s in r.scores],
                                            "unknown": r.unknown, "fallback": r.fallback}) + "\n")
            return
        import pyarrow.parquet as pq

        table = self._table(users, recs)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table)

    def _table(self, users: list, recs: list):
        import pyarrow as pa

        items = [r.items for r in recs] if self.integer_ids else [[str(i) for i in r.items] for r in recs]
        return pa.table({"user": pa.array([None if u is None else str(u) for u in users], pa.string()),
                         "items": pa.array(items, pa.list_(pa.int64() if self.integer_ids else pa.string())),
                         "scores": pa.array([r.scores for r in recs], pa.list_(pa.float32())),
                         "unknown": pa.array([r.unknown for r in recs], pa.int32()),
                         "fallback": pa.array([r.fallback for r in recs], pa.bool_())})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        elif self.writer is not None:
            self.writer.close()
        else:  # an empty input still gives a valid (empty) Parquet file
            import pyarrow.parquet as pq

            pq.write_table(self._table([], []), self.path)

def recommend_file(recommender: Recommender, input_path: str | Path, output_path: str | Path, k: int = 10,
                   exclude_seen: bool = True, batch_size: int = 256, overwrite: bool = False,
                   progress: bool = False) -> dict:
    """Recommend for every history of ``input_path`` into ``output_path``; returns counts."""
    from tqdm.auto import tqdm

    output_path = Path(output_path)
    fmt = _format(output_path, OUTPUT_FORMATS, "output")
    if output_path.exists() and not overwrite:
        raise ValueError(f"{output_path} exists; pass --overwrite to replace it")
    if not output_path.parent.is_dir():
        raise FileNotFoundError(f"output directory {output_path.parent} does not exist")
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    tmp = output_path.with_name(f".{output_path.name}.tmp-{os.getpid()}")
    counts = {"users": 0, "unknown_ids": 0, "fallbacks": 0}
    writer = _Writer(tmp, fmt, bool(recommender.vocab.is_integer))
    try:
        with tqdm(desc="recommend", unit=" users", disable=not progress) as bar:
            for batch in read_histories(input_path, 16 * batch_size):  # read ahead: 16 forward passes
                users = [u for u, _, _ in batch]
                histories = [h for _, h, _ in batch]
                timed = [t for _, _, t in batch]
                have_times = all(t is not None for t in timed)
                if not have_times and any(t is not None for t in timed):
                    raise ValueError(f"{input_path}: give timestamps for every row or for none")
                recs = recommender.recommend(histories, k=k, exclude_seen=exclude_seen,  # sorted by length inside
                                             timestamps=timed if have_times and timed else None, batch_size=batch_size)
                writer.write(users, recs)
                counts["users"] += len(batch)
                counts["unknown_ids"] += sum(r.unknown for r in recs)
                counts["fallbacks"] += sum(r.fallback for r in recs)
                bar.update(len(batch))
        writer.close()
        os.replace(tmp, output_path)
    except BaseException:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        tmp.unlink(missing_ok=True)
        raise
    return counts
