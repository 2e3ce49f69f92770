"""SequenceStore: every user's events as CSR arrays on disk, memory-mapped on load.

A prepared dataset is a directory::

    manifest.json        counts, source, schema, checksums of the inputs, format version
    offsets.npy          (U + 1,) int64: user u's events are rows offsets[u]:offsets[u+1]
    items.npy            (N,) int32 dense item ids, 1..num_items (0 is padding, never stored)
    timestamps.npy       (N,) int64 unix seconds (optional)
    actions.npy          (N,) int16 action type ids, 1.. (optional; names in the manifest)
    ratings.npy          (N,) float32 explicit ratings (optional)
    user_ids.json|npy    raw user id of dense user u (index u)
    item_ids.json|npy    raw item id of dense item i (index i - 1)
    items_side.parquet   item attributes keyed by raw id, first column ``item_id`` (optional)
    users_side.parquet   user attributes keyed by raw id, first column ``user_id`` (optional)

Users are dense 0..U-1 (they index ``offsets``); items are dense 1..I. Events of a user are sorted by
time (stable: ties keep file order). The directory is written to a temporary sibling and renamed
into place, so an interrupted prepare never leaves a half-written dataset behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genrec.data.vocab import Vocab

FORMAT_VERSION = 1
OPTIONAL_COLUMNS = ("timestamps", "actions", "ratings")
SIDE_FILES = {"items": "items_side.parquet", "users": "users_side.parquet"}


class DatasetError(ValueError):
    """A dataset directory or input file is invalid; the message says which and how to fix it."""


@dataclass
class SequenceStore:
    offsets: np.ndarray  # (U + 1,) int64
    items: np.ndarray  # (N,) int32
    user_vocab: Vocab
    item_vocab: Vocab
    timestamps: np.ndarray | None = None  # (N,) int64
    actions: np.ndarray | None = None  # (N,) int16
    ratings: np.ndarray | None = None  # (N,) float32
    manifest: dict = field(default_factory=dict)
    side: dict = field(default_factory=dict)  # {"items" | "users": pyarrow.Table} attributes by raw id

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_items(self) -> int:
        return len(self.item_vocab)

    @property
    def num_events(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user_items(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u] : self.offsets[u + 1]]

    def stats(self) -> dict:
        lengths = self.lengths
        pct = np.percentile(lengths, [0, 25, 50, 75, 90, 99, 100]) if len(lengths) else np.zeros(7)
        out = {
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_events,
            "length_mean": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
            "length_percentiles": {
                k: float(v) for k, v in zip(["min", "p25", "p50", "p75", "p90", "p99", "max"], pct)
            },
            "has_timestamps": self.timestamps is not None,
            "has_actions": self.actions is not None,
            "has_ratings": self.ratings is not None,
            "density": self.num_events / max(1, self.num_users * self.num_items),
        }
        if self.timestamps is not None and len(self.timestamps):
            out["time_range"] = [int(self.timestamps.min()), int(self.timestamps.max())]
        return out

    # ------------------------------------------------------------------------------------------
    # persistence

    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write atomically: build in a temporary sibling directory, then rename into place."""
        unknown = sorted(set(self.side) - set(SIDE_FILES))
        if unknown:
            raise DatasetError(f"unknown side table(s) {', '.join(unknown)}; expected {', '.join(SIDE_FILES)}")
        with staging(out_dir, overwrite) as tmp:
            np.save(tmp / "offsets.npy", np.ascontiguousarray(self.offsets, dtype=np.int64))
            np.save(tmp / "items.npy", np.ascontiguousarray(self.items, dtype=np.int32))
            if self.timestamps is not None:
                np.save(tmp / "timestamps.npy", np.ascontiguousarray(self.timestamps, dtype=np.int64))
            if self.actions is not None:
                np.save(tmp / "actions.npy", np.ascontiguousarray(self.actions, dtype=np.int16))
            if self.ratings is not None:
                np.save(tmp / "ratings.npy", np.ascontiguousarray(self.ratings, dtype=np.float32))
            if self.side:
                import pyarrow.parquet as pq

                for key, table in self.side.items():
                    pq.write_table(table, tmp / SIDE_FILES[key])
            self.manifest = write_metadata(tmp, self.user_vocab, self.item_vocab, self.offsets, self.manifest,
                                           [c for c in OPTIONAL_COLUMNS if getattr(self, c) is not None],
                                           sorted(SIDE_FILES[k] for k in self.side))
        return Path(out_dir)

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> "SequenceStore":
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise DatasetError(
                f"{path} is not a prepared dataset (no manifest.json); create one with `genrec prepare`"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{manifest_path} is corrupt ({e}); prepare the dataset again") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"{path}: dataset format {manifest.get('format_version')} is not supported "
                f"(expected {FORMAT_VERSION}); prepare it again"
            )
        mode = "r" if mmap else None

        columns = manifest.get("columns", ["items"])

        def arr(name: str, required: bool = False) -> np.ndarray | None:
            f = path / f"{name}.npy"
            if not f.exists():
                if required or name in columns:
                    raise DatasetError(f"{path}: {f.name} is missing; the dataset is incomplete, prepare it again")
                return None
            try:
                return np.load(f, mmap_mode=mode)
            except (ValueError, OSError) as e:
                raise DatasetError(f"{f} is unreadable ({e}); prepare the dataset again") from None

        try:
            user_vocab, item_vocab = Vocab.load(path, "user_ids"), Vocab.load(path, "item_ids")
        except (FileNotFoundError, ValueError) as e:
            raise DatasetError(f"{path}: the id vocabulary is missing or corrupt ({e}); prepare it again") from None
        store = cls(
            offsets=np.asarray(arr("offsets", required=True)),
            items=arr("items", required=True),
            user_vocab=user_vocab,
            item_vocab=item_vocab,
            timestamps=arr("timestamps"),
            actions=arr("actions"),
            ratings=arr("ratings"),
            manifest=manifest,
        )
        if store.num_events != len(store.items) or store.num_items != manifest.get("counts", {}).get("items", store.num_items):
            raise DatasetError(f"{path}: offsets and items.npy disagree; the dataset is corrupt, prepare it again")
        return store


def check_writable(out: Path, overwrite: bool) -> None:
    """A dataset may replace ``out`` only with ``overwrite`` and only if ``out`` is a genrec dataset."""
    if not out.exists():
        return
    if not overwrite:
        raise DatasetError(f"{out} already exists; choose another directory or pass --overwrite")
    if not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file()):
        raise DatasetError(f"{out} exists and is not a genrec dataset; refusing to overwrite it")


@contextlib.contextmanager
def staging(out_dir: str | Path, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces ``out_dir`` atomically, on failure
    it is deleted and any previous dataset at ``out_dir`` is left untouched."""
    out = Path(out_dir)
    check_writable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():  # overwrite: move the old one aside first, delete only after success
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)  # put the previous dataset back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_metadata(directory: Path, user_vocab: Vocab, item_vocab: Vocab, offsets: np.ndarray, manifest: dict,
                   columns: list[str], side: list[str] = ()) -> dict:
    """Write the vocabularies and manifest.json of a dataset being staged; returns the manifest."""
    user_vocab.save(directory, "user_ids")
    item_vocab.save(directory, "item_ids")
    manifest = {
        "format_version": FORMAT_VERSION,
        **manifest,
        "counts": {"users": len(offsets) - 1, "items": len(item_vocab), "interactions": int(offsets[-1])},
        "columns": ["items"] + list(columns),
        "side": list(side),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return manifest
