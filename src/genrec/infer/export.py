"""Export a trained run for serving without genrec: ``genrec export RUN_DIR OUT``.

OUT holds:
- ``encoder.pt2``: the user encoder as a ``torch.export`` program with dynamic batch and length.
  Inputs ``items`` (B, L) int64 dense item ids, right-padded with 0, and ``lengths`` (B,) int64
  (1 <= length <= L <= max_len); models with a time bias also take ``timestamps`` (B, L) int64 unix
  seconds of the history and ``query_time`` (B,) int64, the time to recommend for. Output: (B, D)
  queries, already normalised as the model scores them.
- ``items.pt``: the (num_items + 1, D) item table, normalised the same way (row 0 = padding).
- ``item_ids.json``: raw item id of dense id i at index i - 1.
- ``export.json``: model, inputs, limits, test metrics, and how to use the files.
- ``encoder.onnx`` with ``--onnx``: the same encoder for ONNX runtimes (checked with onnxruntime).

Scores are ``queries @ items.T``; the top-K dense ids map back through ``item_ids.json``. A process
needs only PyTorch to load and run them::

    program = torch.export.load("OUT/encoder.pt2").module()
    q = program(items, lengths)                                  # (B, D)
    top = (q @ torch.load("OUT/items.pt").T)[:, 1:].topk(10)     # dense id = index + 1
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
import torch._inductor
from torch import nn

from genrec.data.batches import Batch
from genrec.infer.recommender import Recommender
from genrec.models import next_item_queries
from genrec.models.layers import static_shapes

EXPORTABLE = ("hstu", "sasrec")  # models whose code path has a static-shape mode (models/layers.py)


class UserEncoder(nn.Module):
    """(items, lengths[, timestamps, query_time]) -> (B, D) normalised next-item queries."""

    def __init__(self, recommender: Recommender):
        super().__init__()
        self.model, self.scorer, self.uses_time = recommender.model, recommender.scorer, recommender.uses_time

    def forward(self, items: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor | None = None,
                query_time: torch.Tensor | None = None) -> torch.Tensor:
        torch._check(lengths.shape[0] == items.shape[0])  # one batch size for the tracer's shape reasoning
        qt = None
        if timestamps is not None:
            # the time each position predicts: the next event's inside the history, query_time at the last
            L = items.shape[1]
            pos = torch.arange(L, device=items.device)[None, :]
            nxt = timestamps.gather(1, (pos + 1).clamp(max=L - 1).expand_as(timestamps))  # no (L - 1) slice: traces for L = 2
            qt = torch.where(pos == (lengths - 1)[:, None], query_time[:, None], nxt)
            qt = torch.where(pos < lengths[:, None], qt, torch.zeros_like(qt))
        batch = Batch(items=items, lengths=lengths, timestamps=timestamps, query_time=qt)
        return self.scorer.queries(next_item_queries(self.model, batch))


def example_inputs(recommender: Recommender, batch: int = 3, length: int | None = None) -> tuple:
    L = min(recommender.max_len, length or 8)
    g = torch.Generator().manual_seed(0)
    items = torch.randint(1, len(recommender.vocab) + 1, (batch, L), generator=g)
    lengths = torch.tensor([L] + [max(1, L - 1 - i) for i in range(batch - 1)])
    items[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    if not recommender.uses_time:
        return items, lengths
    ts = torch.cumsum(torch.randint(1, 10**5, (batch, L), generator=g), dim=1) + 1_600_000_000
    ts[items == 0] = 0
    return items, lengths, ts, ts.max(dim=1).values + 3600


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str = "best.pt", max_batch: int = 4096,
               overwrite: bool = False, onnx: bool = False) -> dict:
    """Write the export of ``run_dir`` into ``out`` (atomically: a failed export leaves nothing behind).

    ``onnx=True`` also writes ``encoder.onnx`` (same inputs and output; needs ``pip install 'genrec[onnx]'``).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another directory or pass overwrite=True (--overwrite)")
    rec = Recommender.load(run_dir, checkpoint=checkpoint)
    name = rec.config.get("model", {}).get("name")
    if name not in EXPORTABLE:
        raise ValueError(f"export supports {', '.join(EXPORTABLE)}; {name!r} is not exportable yet "
                         "(serve it with `genrec serve` or the Recommender API instead)")
    encoder = UserEncoder(rec).eval()
    inputs = example_inputs(rec)
    batch, length = torch.export.Dim("batch", min=1, max=max_batch), torch.export.Dim("length", min=1, max=rec.max_len)
    names = ["items", "lengths", "timestamps", "query_time"][:len(inputs)]
    shapes = {"items": {0: batch, 1: length}, "lengths": {0: batch}, "timestamps": {0: batch, 1: length},
              "query_time": {0: batch}}
    dynamic = {n: shapes[n] for n in names}
    with torch.no_grad(), static_shapes():
        program = torch.export.export(encoder, inputs, dynamic_shapes=dynamic)
        onnx_program = _onnx(encoder, inputs, dynamic, names) if onnx else None
    info = {
        "format": "genrec-export-1", "model": name, "run_dir": str(run_dir), "checkpoint": checkpoint,
        "inputs": {n: ("(B, L) int64 dense item ids, 0 = padding (right)" if n == "items" else
                       "(B,) int64 history lengths, >= 1" if n == "lengths" else
                       "(B, L) int64 unix seconds of the history events" if n == "timestamps" else
                       "(B,) int64 unix time to recommend for") for n in names},
        "output": "(B, D) float32 queries; scores = queries @ items.T (items.pt)",
        "max_len": rec.max_len, "max_batch": max_batch, "num_items": len(rec.vocab), "dim": int(rec.item_table.shape[1]),
        "item_ids": "item_ids.json[i - 1] is the raw id of dense id i",
        "test_metrics": _test_metrics(run_dir),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        torch.export.save(program, tmp / "encoder.pt2")
        if onnx_program is not None:
            onnx_program.save(str(tmp / "encoder.onnx"))
        torch.save(rec.item_table.clone(), tmp / "items.pt")
        (tmp / "item_ids.json").write_text(json.dumps(rec.vocab.raw.tolist()))
        (tmp / "export.json").write_text(json.dumps(info, indent=2))
        out.parent.mkdir(parents=True, exist_ok=True)
        old = out.with_name(f".{out.name}.replaced") if out.exists() else None
        if old is not None:  # --overwrite: the previous export stays whole until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _onnx(encoder: nn.Module, inputs: tuple, dynamic: dict, names: list[str]):
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError("ONNX export needs the optional extra: pip install 'genrec[onnx]'") from e
    return torch.onnx.export(encoder, inputs, dynamo=True, dynamic_shapes=dynamic, input_names=names,
                             output_names=["queries"], verbose=False)


def _test_metrics(run_dir: str | Path) -> dict | None:
    report = Path(run_dir) / "report.json"
    return json.loads(report.read_text()).get("test") if report.is_file() else None


def compiled_encoder(run_dir: str | Path, checkpoint: str = "best.pt", echo=print):
    """The run's UserEncoder compiled ahead of time (AOTInductor: C++ kernels, no Python per op), cached
    in ``RUN_DIR/compiled/`` for this checkpoint and PyTorch version; compiled on first use (about two
    minutes for HSTU-large on 2 cores; needs a C++ compiler).

    ``genrec serve --compile`` uses it for batches of one request only (``Recommender.single_encoder``): its
    attention is the dense one of ``static_shapes``. HSTU with genrec's compiled kernels does not need it:
    one history of 200 events (HSTU-large, 2 threads) takes 3.7 ms eager, one kernel call for the whole
    stack, against 9.7 ms here; ``serve`` then skips it.
    """
    run_dir = Path(run_dir)
    stamp = f"{(run_dir / checkpoint).stat().st_mtime_ns}-torch{torch.__version__}"
    target = run_dir / "compiled" / f"encoder-{Path(checkpoint).stem}-{stamp}.pt2"
    if not target.is_file():
        echo(f"compiling the one-history encoder into {target} (once per checkpoint; a few minutes)")
        with tempfile.TemporaryDirectory() as tmp:
            export_run(run_dir, Path(tmp) / "export", checkpoint=checkpoint)
            program = torch.export.load(Path(tmp) / "export" / "encoder.pt2")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.stem + ".partial.pt2")  # the packager wants a .pt2 name
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
            partial.rename(target)
    return torch._inductor.aoti_load_package(str(target))
