"""genrec command line: a thin layer over the Python API.

    genrec demo                                   prepare synthetic data, train SASRec and HSTU, report
    genrec prepare FORMAT INPUT OUT [options]     raw logs -> prepared dataset directory
    genrec stats DATASET_DIR [--json]
    genrec train CONFIG [section.key=value ...] --out RUN_DIR [--resume]
    genrec evaluate RUN_DIR [--split valid|test] [--json]
    genrec recommend RUN_DIR --history ITEM,ITEM,... [-k K]
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import click

from genrec.config import ConfigError, load_config
from genrec.data.store import DatasetError, SequenceStore, check_writable
from genrec.train.trainer import RunError

FORMATS = ("table", "s3rec", "ml1m-seq", "recbole", "bert4rec", "grouplens", "synthetic")
USER_ERRORS = (ConfigError, DatasetError, FileNotFoundError, ValueError, RunError)


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="genrec")
def main() -> None:
    """genrec: generative recommendation (HSTU, SASRec) from raw logs to top-K recommendations.

    Typical flow: `genrec prepare` a dataset, `genrec train` a config from configs/, then
    `genrec evaluate` and `genrec recommend` the run directory. `genrec demo` does it all on
    built-in synthetic data.
    """
    from genrec.system import tune_allocator

    tune_allocator()  # large tensors reuse heap memory instead of page-faulting fresh mmaps (genrec/system.py)


# ----------------------------------------------------------------------------------------------
# prepare / stats


@main.command()
@click.argument("fmt", metavar="FORMAT", type=click.Choice(FORMATS))
@click.argument("input_path", metavar="INPUT")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--user-col", default="user", show_default=True, help="table: user id column")
@click.option("--item-col", default="item", show_default=True, help="table: item id column")
@click.option("--time-col", default=None, help="table: timestamp column (unix seconds or ISO date/time)")
@click.option("--action-col", default=None, help="table: per-event action type column (any values)")
@click.option("--rating-col", default=None, help="table: per-event numeric rating column")
@click.option("--sep", default=None, help="table: CSV delimiter (default: ',' for .csv, tab for .tsv)")
@click.option("--format", "table_format", type=click.Choice(["csv", "tsv", "parquet", "jsonl"]), default=None,
              help="table: file format (default: from the suffix)")
@click.option("--dedup", type=click.Choice(["none", "exact", "pair"]), default="none", show_default=True,
              help="exact: drop repeated (user, item, time) events (without timestamps this equals pair); "
                   "pair: keep only each user's first interaction with an item")
@click.option("--min-user-count", default=0, show_default=True, help="k-core: keep users with at least this many events")
@click.option("--min-item-count", default=0, show_default=True, help="k-core: keep items with at least this many events")
@click.option("--download", is_flag=True, help="grouplens: download INPUT (ml-1m, ml-20m, ...) from GroupLens first")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
def prepare(fmt, input_path, out, user_col, item_col, time_col, action_col, rating_col, sep, table_format, dedup,
            min_user_count, min_item_count, download, overwrite):
    """Turn raw interaction logs into a prepared dataset directory OUT.

    \b
    FORMAT    INPUT
    table     a CSV/TSV/Parquet/JSONL file; name the columns with --user-col/--item-col/...
    s3rec     a `user item item ...` text file (Beauty.txt, LastFM.txt)
    ml1m-seq  the ML-1M directory with ml-1m_sequences_orig_ids.txt, movies.dat, users.dat
    recbole   a RecBole .inter file (or its directory; .user/.item beside it are kept)
    bert4rec  a `user item` pairs file, one interaction per line, in time order
    grouplens ratings.dat (`::`) or ratings.csv; with --download, a GroupLens name such as ml-1m
    synthetic a preset name: tiny, small, default, 1m or 100m (INPUT is the preset; 100m = 1M users,
              1M items, ~100M events, streamed to disk in bounded memory)

    Example: genrec prepare ml1m-seq ../shared/data/ml-1m data/ml-1m
    """
    from genrec.data import datasets
    from genrec.data.synthetic import PRESETS, generate_to

    filters = dict(dedup=dedup, min_user_count=min_user_count, min_item_count=min_item_count)
    t0 = time.perf_counter()
    try:
        check_writable(Path(out), overwrite)
        if Path(out).resolve() in [Path(input_path).resolve(), *Path(input_path).resolve().parents]:
            raise DatasetError(f"OUT ({out}) must not contain INPUT ({input_path}); choose another directory")
        if fmt == "synthetic":  # streamed to disk chunk by chunk: bounded memory at any size
            if input_path not in PRESETS:
                raise DatasetError(f"synthetic INPUT must be a preset: {', '.join(PRESETS)}")
            generate_to(PRESETS[input_path], out, overwrite=overwrite, progress=sys.stderr.isatty())
            store = SequenceStore.load(out)
        elif fmt == "table":
            store = datasets.table(input_path, user_col=user_col, item_col=item_col, time_col=time_col,
                                   action_col=action_col, rating_col=rating_col, fmt=table_format, sep=sep,
                                   **filters)
        elif fmt == "grouplens":
            path = input_path
            if download:
                cache = Path(out).parent / f".download-{input_path}"
                try:
                    path = datasets.download_grouplens(input_path, cache)
                except DatasetError:
                    if cache.is_dir() and not any(cache.iterdir()):
                        cache.rmdir()
                    raise
            store = datasets.grouplens(path, **filters)
        else:
            reader = {"s3rec": datasets.s3rec, "ml1m-seq": datasets.ml1m_seq, "recbole": datasets.recbole,
                      "bert4rec": datasets.bert4rec}[fmt]
            store = reader(input_path, **filters)
        if fmt != "synthetic":
            store.save(out, overwrite=overwrite)
    except USER_ERRORS as e:
        _fail(e)
    s = store.stats()
    click.echo(f"prepared {out}: {s['users']:,} users, {s['items']:,} items, {s['interactions']:,} interactions "
               f"in {time.perf_counter() - t0:.1f}s")


@main.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
def stats(dataset, as_json):
    """Counts and history-length percentiles of a prepared DATASET directory."""
    try:
        s = SequenceStore.load(dataset).stats()
    except USER_ERRORS as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    p = s["length_percentiles"]
    click.echo(f"users         {s['users']:>12,}\nitems         {s['items']:>12,}\ninteractions  {s['interactions']:>12,}")
    click.echo(f"density       {s['density']:>12.5f}\ntimestamps    {str(s['has_timestamps']):>12}\n"
               f"actions       {str(s['has_actions']):>12}")
    click.echo("history length: " + "  ".join(f"{k} {v:g}" for k, v in p.items()) + f"  mean {s['length_mean']}")


# ----------------------------------------------------------------------------------------------
# train / evaluate / recommend


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False), help="run directory to write")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
def train(config, overrides, run_dir, resume):
    """Train the model described by CONFIG (TOML) and evaluate it.

    OVERRIDES are section.key=value pairs, e.g. `train.epochs=5 data.path=data/ml-1m model.num_blocks=4`.
    Validation picks the best epoch; the test split is evaluated once, at that checkpoint.
    Several processes or GPUs: `torchrun --standalone --nproc_per_node=2 -m genrec.cli train CONFIG --out DIR`.
    """
    from genrec.train.trainer import train as run_training

    try:
        cfg = load_config(config, list(overrides))
        report = run_training(cfg, run_dir, resume=resume)
    except USER_ERRORS as e:
        _fail(e)
    click.echo(format_report(report))


def format_report(report: dict) -> str:
    ks = [k for k in report["test"] if k != "mrr"]
    head = "model        " + "  ".join(f"{k:>8}" for k in ks) + "       mrr"
    rows = [head]
    refit = report.get("refit") or {}
    for name, m in ((report["model"], report["test"]), (f"{report['model']} refit", refit.get("test")),
                    ("popularity", report.get("popularity_test"))):
        if m:
            rows.append(f"{name:<12} " + "  ".join(f"{m[k]:8.4f}" for k in ks) + f"  {m['mrr']:8.4f}")
    chosen = (f"best epoch {report['best_epoch']} chosen on validation" if report.get("valid") is not None
              else f"epoch {report['best_epoch']} tested (no validation)")
    rows.append(f"protocol: {report['protocol']}; {chosen} ({report['num_test_users']:,} test users)")
    if refit:
        rows.append(f"refit: a fresh model trained {refit['epochs']} epochs on training + validation events, "
                    f"tested once (run in refit/)")
    return "\n".join(rows)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split", "which", type=click.Choice(["valid", "test"]), default="test", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
@click.option("--exclude-history/--include-history", default=None,
              help="exclude the user's history from the ranking (default: as the run was configured)")
def evaluate(run_dir, which, as_json, exclude_history):
    """Rank the held-out targets of RUN_DIR's dataset with its best checkpoint (full ranking)."""
    from genrec.api import evaluate_run

    try:
        report = evaluate_run(run_dir, which, exclude_history=exclude_history)
    except USER_ERRORS as e:
        _fail(e)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table())


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--history", default=None, help="comma-separated raw item ids, oldest first (one history)")
@click.option("--input", "input_path", default=None, type=click.Path(dir_okay=False),
              help="file of histories (Parquet, JSONL or CSV with a 'history' column; optional 'user', 'timestamps')")
@click.option("--output", "output_path", default=None, type=click.Path(dir_okay=False),
              help="with --input: where to write the top-K lists (Parquet or JSONL, by extension)")
@click.option("-k", "k", default=10, show_default=True, help="number of recommendations")
@click.option("--timestamps", default=None, help="comma-separated unix times of the history items (time-aware models)")
@click.option("--at", "query_time", default=None, type=int, help="unix time to recommend for (default: now)")
@click.option("--include-seen", is_flag=True, help="allow items already in the history")
@click.option("--batch-size", default=256, show_default=True, help="with --input: users per forward pass")
@click.option("--overwrite", is_flag=True, help="with --input: replace an existing --output file")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
def recommend(run_dir, history, input_path, output_path, k, timestamps, query_time, include_seen, batch_size,
              overwrite, as_json):
    """Top-K raw item ids for one --history, or for every history of an --input file into --output.

    \b
    genrec recommend runs/x --history 12,7,33 -k 5
    genrec recommend runs/x --input users.parquet --output recs.parquet -k 100
    """
    from genrec.infer.recommender import Recommender

    if (history is None) == (input_path is None):
        _fail(ValueError("give either --history (one user) or --input FILE --output FILE (many)"))
    if input_path is not None:
        if output_path is None:
            _fail(ValueError("--input needs --output FILE (.parquet or .jsonl)"))
        from genrec.infer.batch import recommend_file

        try:
            counts = recommend_file(Recommender.load(run_dir), input_path, output_path, k=k,
                                    exclude_seen=not include_seen, batch_size=batch_size, overwrite=overwrite,
                                    progress=sys.stderr.isatty())
        except USER_ERRORS as e:
            _fail(e)
        click.echo(f"wrote {counts['users']:,} recommendation lists to {output_path} ({counts['unknown_ids']:,} "
                   f"unknown item ids ignored, {counts['fallbacks']:,} popularity fallbacks)")
        return
    items = [x.strip() for x in history.split(",") if x.strip()]
    try:
        times = None
        if timestamps is not None:
            try:
                times = [[int(x) for x in timestamps.split(",") if x.strip()]]
            except ValueError:
                raise ValueError("--timestamps must be comma-separated integers (unix seconds)") from None
        rec = Recommender.load(run_dir)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (r,) = rec.recommend([items], k=k, exclude_seen=not include_seen, timestamps=times,
                                 query_time=query_time)
        for w in caught:
            click.echo(f"note: {w.message} (--timestamps, --at)", err=True)
    except USER_ERRORS as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps({"items": r.items, "scores": r.scores, "unknown": r.unknown, "fallback": r.fallback}))
        return
    if r.unknown:
        click.echo(f"note: {r.unknown} unknown item id(s) ignored", err=True)
    if r.fallback:
        click.echo("note: empty history, showing the most popular items", err=True)
    for rank, (item, score) in enumerate(zip(r.items, r.scores), 1):
        click.echo(f"{rank:3d}  {item}  {score:.4f}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--checkpoint", default="best.pt", show_default=True, help="checkpoint file in RUN_DIR")
@click.option("--max-batch", default=4096, show_default=True, type=click.IntRange(1),
              help="largest batch the program accepts")
@click.option("--overwrite", is_flag=True, help="replace an existing OUT directory")
@click.option("--onnx", is_flag=True, help="also write encoder.onnx (pip install 'genrec[onnx]')")
def export(run_dir, out, checkpoint, max_batch, overwrite, onnx):
    """Write the user encoder as a torch.export program (dynamic batch and length) into OUT, with the
    item table and the item ids: a process with only PyTorch can then compute recommendations.

    \b
    genrec export runs/hstu exported/hstu
    python -c "import torch; p = torch.export.load('exported/hstu/encoder.pt2').module()"
    """
    from genrec.infer.export import export_run

    try:
        info = export_run(run_dir, out, checkpoint=checkpoint, max_batch=max_batch, overwrite=overwrite, onnx=onnx)
    except (FileExistsError, ImportError, *USER_ERRORS) as e:
        _fail(e)
    click.echo(f"wrote {out}/encoder.pt2 ({info['model']}; inputs {', '.join(info['inputs'])}; batch <= "
               f"{max_batch}, length <= {info['max_len']}), items.pt ({info['num_items']:,} items x {info['dim']}), "
               f"item_ids.json, export.json" + (", encoder.onnx" if onnx else ""))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind (no authentication: keep the default unless a proxy guards the service)")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--checkpoint", default="best.pt", show_default=True, help="checkpoint file in RUN_DIR")
@click.option("--threads", default=0, show_default=True, help="PyTorch threads per model worker (0: PyTorch's default)")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
              help="model threads, each running one batch at a time")
@click.option("--max-batch", default=64, show_default=True, type=click.IntRange(1),
              help="most requests per forward pass (micro-batching)")
@click.option("--max-history", default=10_000, show_default=True, type=click.IntRange(1),
              help="longest history accepted (longer: 422); the model reads its last max_len items")
@click.option("--max-k", default=1000, show_default=True, type=click.IntRange(1), help="largest k accepted")
@click.option("--compile", "compile_", is_flag=True,
              help="answer lone requests with an ahead-of-time compiled encoder (built once per checkpoint into "
                   "RUN_DIR/compiled/, a few minutes; needs a C++ compiler; HSTU and SASRec; skipped for an HSTU that "
                   "already runs through genrec's compiled kernels, which are faster)")
@click.option("--access-log", is_flag=True, help="log every request")
def serve(run_dir, host, port, checkpoint, threads, workers, max_batch, max_history, max_k, compile_, access_log):
    """Serve a trained run over HTTP: POST /recommend, GET /healthz, GET /metadata, docs at /docs.

    \b
    genrec serve runs/hstu --port 8000
    curl -s localhost:8000/recommend -H 'content-type: application/json' -d '{"history": [1193, 661], "k": 5}'

    Needs the optional extra: pip install 'genrec[serve]'.
    """
    try:
        from genrec.infer.server import serve as run_server
    except ImportError as e:
        _fail(e)
    try:
        run_server(run_dir, host=host, port=port, checkpoint=checkpoint, threads=threads, workers=workers,
                   compile=compile_, access_log=access_log,
                   max_batch=max_batch, max_history=max_history, max_k=max_k)
    except USER_ERRORS as e:
        _fail(e)


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="directory for the data and the runs")
@click.option("--epochs", default=None, type=int, help="override the preset's epochs (quicker look)")
def demo(out, epochs):
    """The quickstart: synthetic data -> SASRec and HSTU -> metrics table and example recommendations."""
    from genrec.api import run_demo

    try:
        run_demo(out, epochs=epochs, echo=click.echo)
    except USER_ERRORS as e:
        _fail(e)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
