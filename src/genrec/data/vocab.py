"""Vocab: raw ids (strings or integers) <-> dense ids.

Dense ids start at ``start`` (1 for items, keeping 0 for padding; 0 for users). Integer raw ids are
kept as an int64 array and looked up with a sorted index (vectorised, no dict for millions of ids);
string ids use a dict.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class Vocab:
    def __init__(self, raw_ids: np.ndarray | list, start: int = 1):
        raw = np.asarray(raw_ids)
        if raw.dtype.kind in "iu":
            raw = raw.astype(np.int64)
        elif raw.dtype.kind in "UO" or len(raw) == 0:
            raw = raw.astype(str).astype(object) if len(raw) else np.empty(0, dtype=object)
        else:
            raise TypeError(f"raw ids must be integers or strings, got dtype {raw.dtype}")
        self.raw = raw
        self.start = start
        self._index: dict | None = None
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def is_integer(self) -> bool:
        return self.raw.dtype.kind == "i"

    def to_raw(self, dense: np.ndarray | int):
        """Dense ids -> raw ids (array in, array out; int in, scalar out)."""
        return self.raw[np.asarray(dense) - self.start]

    def to_dense(self, raw) -> np.ndarray:
        """Raw ids -> dense ids; unknown ids map to -1 (callers decide whether that is an error)."""
        values = np.atleast_1d(np.asarray(raw, dtype=object if not self.is_integer else None))
        if self.is_integer:
            try:
                keys = values.astype(np.int64)
            except (ValueError, TypeError, OverflowError):  # strings, None, ints beyond int64: one by one
                keys = np.array([_as_int(v) for v in values], dtype=np.int64)
            if self._sorted is None:
                order = np.argsort(self.raw, kind="stable")
                self._sorted = (self.raw[order], order)
            sorted_raw, order = self._sorted
            if len(sorted_raw) == 0:
                return np.full(len(keys), -1, dtype=np.int64)
            pos = np.minimum(np.searchsorted(sorted_raw, keys), len(sorted_raw) - 1)
            return np.where(sorted_raw[pos] == keys, order[pos] + self.start, -1).astype(np.int64)
        if self._index is None:
            self._index = {r: i + self.start for i, r in enumerate(self.raw.tolist())}
        return np.array([self._index.get(str(v), -1) for v in values.tolist()], dtype=np.int64)

    # --- persistence -----------------------------------------------------------------------

    def save(self, directory: Path, name: str) -> None:
        if self.is_integer:
            np.save(directory / f"{name}.npy", self.raw)
        else:
            (directory / f"{name}.json").write_text(json.dumps(self.raw.tolist()))

    @classmethod
    def load(cls, directory: Path, name: str, start: int | None = None) -> "Vocab":
        start = (0 if name.startswith("user") else 1) if start is None else start
        if (directory / f"{name}.npy").exists():
            return cls(np.load(directory / f"{name}.npy"), start=start)
        return cls(json.loads((directory / f"{name}.json").read_text()), start=start)

    def state(self) -> dict:
        """Checkpoint-friendly form (loads with torch.load(weights_only=True))."""
        return {"raw": self.raw.tolist(), "start": self.start, "integer": self.is_integer}

    @classmethod
    def from_state(cls, state: dict) -> "Vocab":
        raw = np.array(state["raw"], dtype=np.int64) if state["integer"] else state["raw"]
        return cls(raw, start=state["start"])


def _as_int(v) -> int:
    try:
        i = int(v)
    except (ValueError, TypeError):
        return -(2**62)  # a raw id that can never exist -> unknown
    return i if -(2**63) <= i < 2**63 else -(2**62)  # beyond int64: unknown too
