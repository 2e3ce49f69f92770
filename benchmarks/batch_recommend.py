"""Batch top-K throughput: every user of a run's dataset through ``recommend_file`` and ``genrec recommend``.

    python benchmarks/batch_recommend.py runs/ml-1m-hstu              # top-100, all users, 3 repeats
    python benchmarks/batch_recommend.py RUN -k 100 --repeats 3 --write

Writes each user's history (the last ``max_len`` events, raw ids) to a JSONL file, then measures
(a) ``genrec.infer.batch.recommend_file`` in this process, JSONL in, Parquet out (model load excluded),
and (b) the ``genrec recommend RUN --input F --output F`` command end to end (process start and model
load included). Reports users per second (best and median of the repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_histories(lines: list[str], path: Path, copies: int = 1) -> int:
    """The JSONL input file: every line ``copies`` times; returns its number of rows."""
    with path.open("w") as f:
        for _ in range(copies):
            f.write("\n".join(lines) + "\n")
    return len(lines) * copies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("-k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--copies", type=int, default=10, help="the large-file row: every user this many times")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args()
    import torch

    from serve_load import histories  # the same user histories as the load test: the last max_len events

    from genrec.infer.batch import recommend_file
    from genrec.infer.recommender import Recommender
    from genrec.system import tune_allocator

    tune_allocator()  # as the genrec command does
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rec = Recommender.load(args.run_dir)
        lines = [json.dumps({"user": u, "history": h}) for u, h in enumerate(histories(args.run_dir, rec.max_len, None))]
        users = write_histories(lines, tmp / "users.jsonl")
        many = write_histories(lines, tmp / "many.jsonl", args.copies)
        inproc, cli, cli_many = [], [], []

        def command(src: Path, dst: Path) -> None:
            subprocess.run([sys.executable, "-m", "genrec.cli", "recommend", str(args.run_dir), "--input", str(src),
                            "--output", str(dst), "-k", str(args.k)], check=True, capture_output=True)

        for r in range(args.repeats):
            t = time.perf_counter()
            recommend_file(rec, tmp / "users.jsonl", tmp / f"recs{r}.parquet", k=args.k)
            inproc.append(users / (time.perf_counter() - t))
            t = time.perf_counter()
            command(tmp / "users.jsonl", tmp / f"cli{r}.parquet")
            cli.append(users / (time.perf_counter() - t))
        t = time.perf_counter()
        command(tmp / "many.jsonl", tmp / "many.parquet")
        cli_many.append(many / (time.perf_counter() - t))
    model = rec.config["model"]["name"]
    lines = [f"Run `{args.run_dir}` ({model}, {len(rec.vocab):,} items, histories of up to {rec.max_len} events), "
             f"{users:,} users, top-{args.k} over all items, history excluded, JSONL in, Parquet out, "
             f"{args.threads} threads, {args.repeats} repeats.", "",
             "| path | users/s (best) | users/s (median) |", "|---|---:|---:|",
             f"| `recommend_file` in process (model loaded) | {max(inproc):,.0f} | {statistics.median(inproc):,.0f} |",
             f"| `genrec recommend --input`, {users:,} users (process start and model load included) | {max(cli):,.0f} "
             f"| {statistics.median(cli):,.0f} |",
             f"| `genrec recommend --input`, the same users {args.copies} times ({many:,} rows, one run) "
             f"| {cli_many[0]:,.0f} | |", "",
             f"Command: `python benchmarks/batch_recommend.py {args.run_dir} -k {args.k} --repeats {args.repeats} "
             f"--copies {args.copies}`"]
    text = "\n".join(lines)
    print(text)
    if args.write:
        sys.path.insert(0, str(HERE))
        from results_file import write_section

        write_section("batch-recommend", "Batch recommendations (issue 5)", text)


if __name__ == "__main__":
    main()
