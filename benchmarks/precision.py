"""Quality effect of bf16 autocast: the same preset trained in fp32 and in bf16, validation after each epoch.

    python benchmarks/precision.py                               # HSTU on ML-100k, 10 epochs
    python benchmarks/precision.py --config configs/ml-1m/hstu.toml --epochs 4 --write

Each run is ``genrec train CONFIG train.precision=P train.seed=S`` (one thread) in runs/precision/, so an
interrupted comparison resumes; the first seed runs in both precisions from the same initial weights
and batches, the other seeds in fp32 show how far runs differ by training noise alone. The table has
validation HR@10 / NDCG@10 per epoch (full ranking, history excluded), the test metrics at the epoch
chosen on validation, and the training time. Use bf16 only where the hardware has bf16 units: on a CPU
without them (AVX2 only) autocast emulates it and is far slower than fp32.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def run_dir(config: str, precision: str, seed: int, epochs: int) -> Path:
    return REPO / "runs" / "precision" / f"{Path(config).parent.name}-{Path(config).stem}-{precision}-s{seed}-e{epochs}"


def train(config: str, precision: str, seed: int, epochs: int) -> Path:
    out = run_dir(config, precision, seed, epochs)
    if (out / "report.json").is_file():
        return out
    cmd = [sys.executable, "-m", "genrec.cli", "train", config, f"train.precision={precision}", f"train.seed={seed}",
           f"train.epochs={epochs}", "train.threads=1", "train.patience=0", "train.eval_every=1", "--out", str(out)]
    if (out / "last.pt").is_file():
        cmd.append("--resume")
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return out


def read_run(out: Path) -> dict:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    epochs = {r["epoch"]: r for r in lines if "valid" in r and "epoch" in r}
    return {"valid": [epochs[e]["valid"] for e in sorted(epochs)],
            "seconds": sum(epochs[e]["seconds"] for e in epochs),
            "report": json.loads((out / "report.json").read_text())}


def format_table(config: str, epochs: int, runs: dict[tuple[str, int], dict]) -> str:
    keys = list(runs)
    head = " | ".join(f"{p} seed {s}" for p, s in keys)
    lines = [f"`python benchmarks/precision.py --config {config} --epochs {epochs}`: validation HR@10 / NDCG@10 "
             "after each epoch (full ranking, history excluded); one thread per run.", "",
             f"| epoch | {head} |", "|---:|" + "---:|" * len(keys)]
    for e in range(epochs):
        cells = " | ".join(f"{r['valid'][e]['hr@10']:.4f} / {r['valid'][e]['ndcg@10']:.4f}" for r in runs.values())
        lines.append(f"| {e + 1} | {cells} |")
    test = " | ".join(f"{r['report']['test']['hr@10']:.4f} / {r['report']['test']['ndcg@10']:.4f} "
                      f"(epoch {r['report']['best_epoch']})" for r in runs.values())
    minutes = " | ".join(f"{r['seconds'] / 60:.1f} min" for r in runs.values())
    lines += [f"| test at the chosen epoch | {test} |", f"| training time | {minutes} |"]
    fp32, bf16 = runs[keys[0]], runs.get(("bf16", keys[0][1]))
    if bf16 is not None:
        a, b = fp32["valid"][-1]["hr@10"], bf16["valid"][-1]["hr@10"]
        noise = [abs(r["valid"][-1]["hr@10"] - a) for (p, s), r in runs.items() if p == "fp32" and s != keys[0][1]]
        lines += ["", f"After {epochs} epochs, bf16 against fp32 on the same seed: validation HR@10 {b:.4f} against "
                      f"{a:.4f} ({100 * (b - a) / a:+.1f} %)"
                      + (f"; fp32 seeds differ by {100 * max(noise) / a:.1f} % among themselves." if noise else ".")]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ml-100k/hstu.toml")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fp32 seeds; the first also runs in bf16")
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args()
    plan = [("fp32", args.seeds[0]), ("bf16", args.seeds[0])] + [("fp32", s) for s in args.seeds[1:]]
    runs = {(p, s): read_run(train(args.config, p, s, args.epochs)) for p, s in plan}
    table = format_table(args.config, args.epochs, runs)
    print(table)
    if args.write:
        sys.path.insert(0, str(HERE))
        from results_file import write_section

        write_section("precision", "bf16 autocast: quality effect (`python benchmarks/precision.py --write`)", table)


if __name__ == "__main__":
    main()
