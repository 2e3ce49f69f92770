"""Self-describing checkpoints, written atomically and loaded with ``torch.load(weights_only=True)``.

A checkpoint holds the config, the item vocabulary, the model weights and, for resuming, the optimiser
state, torch's RNG state, the epoch and the training history. It is written to a temporary file in
the same directory and renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


_UMASK = os.umask(0o022)  # read once (umask can only be read by setting it), then put back
os.umask(_UMASK)


def _replace_atomically(path: Path, write) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private (0600); a plain open() would not
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict, path: str | Path) -> None:
    _replace_atomically(Path(path), lambda tmp: torch.save(state, tmp))


def write_text_atomically(path: str | Path, text: str) -> None:
    """The run's small text files (config.toml, report.json): never half-written either."""
    _replace_atomically(Path(path), lambda tmp: Path(tmp).write_text(text))


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or not a genrec checkpoint."""


REQUIRED_KEYS = ("config", "item_vocab", "model")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for damaged files
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a genrec checkpoint (expected the keys {', '.join(REQUIRED_KEYS)})")
    return ckpt
