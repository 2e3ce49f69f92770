"""Writes one marked section of benchmarks/RESULTS.md, leaving the rest of the file as it is."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def read_section(name: str, path: Path = RESULTS) -> str:
    """The text of section ``name`` as ``write_section`` wrote it (markers excluded), or "" if absent."""
    start, end = _markers(name)
    text = path.read_text() if path.exists() else ""
    if start not in text or end not in text:
        return ""
    return text[text.index(start) + len(start):text.index(end)]


def write_section(name: str, title: str, body: str, path: Path = RESULTS) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` (appended if absent)."""
    start, end = _markers(name)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{start}\n## {title}\n\n{body}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
