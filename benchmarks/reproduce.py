"""Reproduce the published tables: train every preset row and write benchmarks/RESULTS.md.

    python benchmarks/reproduce.py --list                    # the rows, their commands, what is done
    python benchmarks/reproduce.py beauty/sasrec             # run (or resume) one row, all its seeds
    python benchmarks/reproduce.py lastfm                    # every row of a dataset
    nohup python benchmarks/reproduce.py all > reproduce.log &   # everything, in the background
    python benchmarks/reproduce.py --table --write           # only rebuild the table from finished runs

A row is a dataset x model preset in configs/. Each seed of a row is one ``genrec train`` run in
runs/reproduce/<dataset>-<model>/seed<k>; an interrupted run resumes where its last checkpoint left
it (``--resume``), so rows can be run a few at a time, across sessions. Missing datasets are prepared
first with the command of the dataset (reading ../shared/data at run time). ``--epochs N`` caps the
preset's epochs (the table then shows the cap and the command with it); a row is reported from its
runs' report.json: test metrics at the epoch chosen on validation NDCG@10, mean ± std over seeds.
A finished seed's small result files (report, per-epoch metrics, wall time, config; no checkpoint, no
data) are copied to benchmarks/reproduce_runs/, which is committed: the table is rebuilt from them on a
machine where runs/ is gone. A row with neither keeps its line from the RESULTS.md table already written.
Protocol for every row: leave-one-out, full ranking over all items, the user's history excluded.
Presets with ``train.refit = true`` (the ML-1M rows with published numbers, which train on the
validation event) add a "refit" line: a fresh model trained on training + validation events for the
epochs chosen on validation, tested once.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from results_file import read_section, write_section  # benchmarks/, this script's folder

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUNS = REPO / "runs" / "reproduce"
ARCHIVE = HERE / "reproduce_runs"  # committed copies of finished seeds' result files
ARCHIVED_FILES = ("report.json", "metrics.jsonl", "wall.json", "config.toml")
RESULTS = HERE / "RESULTS.md"
SECTION = "reproduce"  # the table's section of RESULTS.md
SHARED = REPO.parent / "shared" / "data"

DATASETS = {
    "ml-1m": ["ml1m-seq", str(SHARED / "ml-1m"), "data/ml-1m"],
    "ml-100k": ["recbole", str(SHARED / "ml-100k"), "data/ml-100k"],
    "beauty": ["s3rec", str(SHARED / "amazon-beauty" / "Beauty.txt"), "data/beauty"],
    "lastfm": ["s3rec", str(SHARED / "lastfm" / "LastFM.txt"), "data/lastfm"],
}


@dataclass
class Row:
    dataset: str
    model: str  # preset name: configs/<dataset>/<model>.toml
    published: tuple[float, float] | None = None  # test HR@10, NDCG@10
    source: str = ""
    target: str = ""  # what the issue asks of this row
    seeds: list[int] = field(default_factory=lambda: [0])
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.model}"

    @property
    def config(self) -> str:
        return f"configs/{self.dataset}/{self.model}.toml"


ML1M_NOTE = "position bias only (ML-1M timestamps here cover 66 % of events)"
ROWS = [
    Row("ml-1m", "sasrec", (0.2853, 0.1603), "HSTU paper", ">= published"),
    Row("ml-1m", "hstu", (0.3097, 0.1720), "HSTU paper", ">= published", note=ML1M_NOTE),
    Row("ml-1m", "hstu-large", (0.3294, 0.1893), "HSTU paper", ">= published; aim 0.3419 / 0.1944 (TF port)",
        note=ML1M_NOTE),
    Row("ml-1m", "bert4rec"),
    Row("ml-1m", "mamba4rec"),
    Row("ml-1m", "gru4rec"),
    Row("ml-100k", "sasrec"),
    Row("ml-100k", "hstu", note="relative position + time bias (full timestamps)"),
    Row("ml-100k", "hstu-position", note="position bias only: the control for the time bias"),
    Row("beauty", "sasrec", (0.0605, 0.0318), "S3-Rec paper", ">= published", seeds=[0, 1, 2]),
    Row("beauty", "hstu", (0.1008, 0.0611), "BSARec (aim)", "above our best SASRec; aim for BSARec",
        seeds=[0, 1, 2]),
    Row("beauty", "bert4rec", seeds=[0, 1, 2]),
    Row("beauty", "mamba4rec", seeds=[0, 1, 2]),
    Row("beauty", "gru4rec", seeds=[0, 1, 2]),
    Row("lastfm", "sasrec", (0.0688, 0.0390), "S3-Rec paper", ">= published", seeds=[0, 1, 2]),
    Row("lastfm", "hstu", (0.0807, 0.0435), "BSARec (aim)", "above our best SASRec; aim for BSARec",
        seeds=[0, 1, 2]),
    Row("lastfm", "bert4rec", seeds=[0, 1, 2]),
    Row("lastfm", "mamba4rec", seeds=[0, 1, 2]),
    Row("lastfm", "gru4rec", seeds=[0, 1, 2]),
]
METRICS = ["hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr"]


def run_dir(row: Row, seed: int) -> Path:
    return RUNS / f"{row.dataset}-{row.model}" / f"seed{seed}"


def archive_dir(row: Row, seed: int) -> Path:
    return ARCHIVE / f"{row.dataset}-{row.model}" / f"seed{seed}"


def result_dir(row: Row, seed: int) -> Path:
    """Where a seed's results are read from: its run directory when it has finished here (or finished and
    is being continued: its last report is in metrics.jsonl), else the archive when the seed finished
    elsewhere, else the run directory (a first run going on, or nothing)."""
    out, kept = run_dir(row, seed), archive_dir(row, seed)
    finished_here = (out / "report.json").is_file() or (
        (out / "metrics.jsonl").is_file() and any(r.get("final") for r in _records(out / "metrics.jsonl")))
    return kept if not finished_here and (kept / "report.json").is_file() else out


def archive(row: Row, seed: int) -> bool:
    """Copy a finished seed's result files into the archive (replacing an older copy); False if unfinished."""
    out = run_dir(row, seed)
    if not (out / "report.json").is_file():
        return False
    dest = archive_dir(row, seed)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ARCHIVED_FILES:
        if (out / name).is_file():
            shutil.copyfile(out / name, dest / name)
    return True


def train_command(row: Row, seed: int, epochs: int | None, resume: bool, threads: int = 0) -> list[str]:
    cmd = ["genrec", "train", row.config, f"train.seed={seed}"]
    if epochs:
        cmd.append(f"train.epochs={epochs}")
    if threads:
        cmd.append(f"train.threads={threads}")
    cmd += ["--out", str(run_dir(row, seed).relative_to(REPO))]
    return cmd + (["--resume"] if resume else [])


def ensure_dataset(name: str) -> None:
    reader, source, out = DATASETS[name]
    if (REPO / out / "manifest.json").is_file():
        return
    if not Path(source).exists():
        sys.exit(f"{source} not found: the {name} rows need ../shared/data (see its README)")
    print(f"preparing {name}: genrec prepare {reader} {source} {out}", flush=True)
    subprocess.run([sys.executable, "-m", "genrec.cli", "prepare", reader, source, out], cwd=REPO, check=True)


def run_row(row: Row, epochs: int | None, threads: int = 0) -> None:
    ensure_dataset(row.dataset)
    for seed in row.seeds:
        out = run_dir(row, seed)
        if seed_done(row, seed, epochs):
            print(f"{row.key} seed {seed}: done", flush=True)
            continue
        resume = (out / "last.pt").is_file()
        cmd = train_command(row, seed, epochs, resume, threads)
        print(f"{row.key} seed {seed}: {shlex.join(cmd)}", flush=True)
        wall_file = out / "wall.json"
        spent = json.loads(wall_file.read_text())["seconds"] if wall_file.is_file() else 0.0
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "genrec.cli", *cmd[1:]], cwd=REPO)  # this Python's genrec
        command = shlex.join(train_command(row, seed, epochs, False, threads))

        def record_wall() -> None:
            wall_file.write_text(json.dumps({"seconds": spent + time.perf_counter() - t, "command": command}))

        while True:  # the wall time is kept up to date, so a run killed midway still counts what it spent
            try:
                returncode = proc.wait(timeout=60)
                break
            except subprocess.TimeoutExpired:
                if out.is_dir():
                    record_wall()
        out.mkdir(parents=True, exist_ok=True)
        record_wall()
        if returncode:
            sys.exit(f"{row.key} seed {seed} failed (exit {returncode}); rerun this command to resume")
        archive(row, seed)


def _preset_asks_more(row: Row, out: Path, epochs: int | None) -> bool:
    """A finished run whose preset now asks for more: more epochs (or a larger ``--epochs`` than the run
    had), another early-stopping patience, or a refit it has not done. ``genrec train --resume`` then continues it (or, when there
    is nothing more to do, just returns its report)."""
    if not (out / "config.toml").is_file():
        return False
    from genrec.config import load_config

    had = load_config(out / "config.toml").train
    want = load_config(REPO / row.config).train  # the preset with the defaults the trainer would fill in
    if want.refit and "refit" not in json.loads((out / "report.json").read_text()):
        return True  # resuming runs the refit
    return had.epochs < (epochs or want.epochs) or had.patience != want.patience  # --epochs N: train.epochs=N


def row_results(row: Row) -> dict | None:
    """The finished seeds' reports (None when no seed has finished yet); ``seeds`` says which."""
    reports, walls, epochs_run, commands, seeds, continuing = [], [], [], [], [], []
    for seed in row.seeds:
        out = result_dir(row, seed)
        if not (out / "metrics.jsonl").is_file():
            continue
        records = _records(out / "metrics.jsonl")
        last_final = max((i for i, r in enumerate(records) if r.get("final")), default=None)
        if (out / "report.json").is_file():
            reports.append(json.loads((out / "report.json").read_text()))
        elif last_final is not None:  # a finished run being continued (more epochs): its last report till the new one
            reports.append(records[last_final])
            records = records[:last_final]
            continuing.append(seed)
        else:
            continue
        seeds.append(seed)
        wall = json.loads((out / "wall.json").read_text()) if (out / "wall.json").is_file() else {}
        walls.append(wall.get("seconds", float("nan")))
        commands.append(wall.get("command", ""))
        epochs_run.append(max(r["epoch"] for r in records if "epoch" in r))
    if not seeds:
        return None
    return {"reports": reports, "walls": walls, "epochs": epochs_run, "commands": commands, "seeds": seeds,
            "continuing": continuing}


def _records(path: Path) -> list[dict]:
    """metrics.jsonl's records; a line cut short (a run killed while writing it) is skipped."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def seed_done(row: Row, seed: int, epochs: int | None = None) -> bool:
    out = result_dir(row, seed)
    return (out / "report.json").is_file() and not _preset_asks_more(row, out, epochs)


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table() -> str:
    lines = ["Protocol for every row: leave-one-out per user (last event = test, second-to-last = validation), "
             "full ranking over all items with the user's history excluded, test metrics at the epoch chosen "
             "on validation NDCG@10. Rows with three seeds show mean ± std (rows still running: the seeds done so "
             "far, their verdict marked 'so far'). `pop` = popularity baseline on the "
             "same test split. Wall time = `genrec train` on this 2-core machine (all seeds, summed). "
             "Rows with no run files here or in benchmarks/reproduce_runs/ (rows run before that archive existed) "
             "keep the line of the table written then.", "",
             "| dataset | model | HR@10 | NDCG@10 | HR@50 | NDCG@50 | HR@200 | NDCG@200 | MRR | published HR@10 / "
             "NDCG@10 | target | epochs run (best) | wall | pop HR@10 | command | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|"]
    previous = previous_lines()
    for row in ROWS:
        res = row_results(row)
        if res is None and (row.dataset, row.model) in previous:  # run before the archive existed: keep its line
            lines += [previous[row.dataset, m] for m in (row.model, f"{row.model} (refit)")
                      if (row.dataset, m) in previous]
            continue
        if res is None:
            lines.append(f"| {row.dataset} | {row.model} | not run yet (0/{len(row.seeds)} seeds) |" + " |" * 14)
            continue
        partial = len(res["seeds"]) < len(row.seeds) or bool(res["continuing"])
        reports = res["reports"]
        best = ", ".join(str(r["best_epoch"]) for r in reports)
        cmd = f"`{res['commands'][0]}`" + (f" (seeds {', '.join(map(str, row.seeds))})" if len(row.seeds) > 1 else "")
        note = "; ".join(x for x in (
            f"seeds done: {', '.join(map(str, res['seeds']))} of {len(row.seeds)}" if len(res["seeds"]) < len(row.seeds)
            else "",
            f"seed {', '.join(map(str, res['continuing']))} continuing (more epochs): its last finished report shown"
            if res["continuing"] else "", row.note) if x)
        lines.append(_line(row, row.model, [r["test"] for r in reports], partial,
                           f"{', '.join(map(str, res['epochs']))} ({best})", f"{sum(res['walls']) / 60:.0f} min",
                           reports[0]["popularity_test"]["hr@10"], cmd, note))
        refits = [r["refit"] for r in reports if "refit" in r]
        if refits:
            lines.append(_line(row, f"{row.model} (refit)", [r["test"] for r in refits],
                               partial or len(refits) < len(reports), ", ".join(str(r["epochs"]) for r in refits),
                               "in the row above", refits[0]["popularity_test"]["hr@10"], "the same command",
                               "a fresh model (same seed) trained on training + validation events for the epochs "
                               "chosen on validation (as the published numbers use the data), tested once"
                               + (f"; {len(refits)} of {len(reports)} seeds refit so far"
                                  if len(refits) < len(reports) else "")))
    return "\n".join(lines)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def previous_lines() -> dict[tuple[str, str], str]:
    """The rows of the reproduction table already in RESULTS.md, by (dataset, model cell); rows not run are left out."""
    out = {}
    for line in read_section(SECTION, RESULTS).splitlines():
        cells = _cells(line)
        if line.startswith("| ") and len(cells) > 3 and cells[0] != "dataset" and not cells[2].startswith("not run"):
            out[cells[0], cells[1]] = line
    return out


def _previous_means(dataset: str, model: str) -> tuple[float, float] | None:
    """HR@10 and NDCG@10 (the means) of a row kept from the table already written."""
    line = previous_lines().get((dataset, model))
    if line is None:
        return None
    cells = _cells(line)
    return float(cells[2].split()[0]), float(cells[3].split()[0])


def _line(row: Row, model: str, tests: list[dict], partial: bool, epochs: str, wall: str, pop: float, cmd: str,
          note: str) -> str:
    cells = [fmt([t[m] for t in tests]) for m in METRICS]
    hr = statistics.mean(t["hr@10"] for t in tests)
    nd = statistics.mean(t["ndcg@10"] for t in tests)
    pub, verdict = "", ""
    if row.published:
        pub = f"{row.published[0]:.4f} / {row.published[1]:.4f} ({row.source})"
        if row.target.startswith(">="):
            met = hr >= row.published[0] and nd >= row.published[1]
            verdict = "met" if met else f"MISSED by {100 * (row.published[0] - hr) / row.published[0]:.1f} % (HR@10)"
        elif row.target.startswith("above our best SASRec"):
            verdict = _above_sasrec(row, hr, nd)
        else:
            verdict = row.target
        if partial:
            verdict = f"so far: {verdict}"
    return (f"| {row.dataset} | {model} | " + " | ".join(cells)
            + f" | {pub} | {verdict} | {epochs} | {wall} | {pop:.4f} | {cmd} | {note} |")


def _above_sasrec(row: Row, hr: float, nd: float) -> str:
    """Verdict of an "above our best SASRec" target: mean HR@10 and NDCG@10 against the dataset's SASRec row."""
    base = next((r for r in ROWS if r.dataset == row.dataset and r.model == "sasrec"), None)
    res = row_results(base) if base is not None else None
    kept = _previous_means(row.dataset, "sasrec") if res is None else None
    if res is None and kept is None:
        return row.target + " (our SASRec row is not run yet)"
    if res is None:
        (b_hr, b_nd), seeds = kept, ""
    else:
        b_hr = statistics.mean(r["test"]["hr@10"] for r in res["reports"])
        b_nd = statistics.mean(r["test"]["ndcg@10"] for r in res["reports"])
        seeds = "" if len(res["seeds"]) == len(base.seeds) else f", {len(res['seeds'])}/{len(base.seeds)} seeds"
    head = f"above our SASRec ({b_hr:.4f} / {b_nd:.4f}{seeds}): "
    if hr > b_hr and nd > b_nd:
        return head + "met"
    return head + f"MISSED by {100 * (b_hr - hr) / b_hr:.1f} % (HR@10)"


def select(names: list[str]) -> list[Row]:
    if names == ["all"]:
        return ROWS
    chosen = []
    for name in names:
        match = [r for r in ROWS if r.key == name or r.dataset == name]
        if not match:
            sys.exit(f"unknown row {name!r}; rows: {', '.join(r.key for r in ROWS)} (or a dataset, or all)")
        chosen += [r for r in match if r not in chosen]
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="*", help="rows to run: dataset/model, a dataset, or all")
    ap.add_argument("--epochs", type=int, default=None, help="cap every run at this many epochs")
    ap.add_argument("--threads", type=int, default=0, help="train.threads of every run (0: the preset's)")
    ap.add_argument("--list", action="store_true", help="list the rows and their state")
    ap.add_argument("--table", action="store_true", help="print the results table")
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.list:
        for row in ROWS:
            done = sum(seed_done(row, s, args.epochs) for s in row.seeds)
            print(f"{row.key:24s} seeds {done}/{len(row.seeds)} done   {shlex.join(train_command(row, row.seeds[0], args.epochs, False))}")
        return
    for row in select(args.rows) if args.rows else []:
        run_row(row, args.epochs, args.threads)
    if args.write:  # finished seeds' result files into the committed archive
        for row in ROWS:
            for seed in row.seeds:
                archive(row, seed)
    if args.table or args.write or args.rows:
        text = table()
        print(text)
        if args.write:
            write_section(SECTION, "Reproduction table (`python benchmarks/reproduce.py`)", text, RESULTS)


if __name__ == "__main__":
    main()
