"""Quality parity: genrec's fast training path against the dense reference, after the same epochs.

    python benchmarks/parity.py                                  # HSTU-large on ML-1M, 8 epochs
    python benchmarks/parity.py --model sasrec --epochs 4 --seeds 0 1
    python benchmarks/parity.py --write                          # also into benchmarks/RESULTS.md

Trains one preset from the same initial weights for ``--epochs`` epochs along each path and evaluates
validation HR@10 / NDCG@10 (full ranking, history excluded) with the same evaluator:

- ``genrec``: the library's training step (packed tokens, jagged tiled attention that recomputes in
  backward, gathered sampled softmax, fast dropout), as ``genrec train`` runs it; random batches, the
  same ones as the dense path (``--window N`` instead uses ``train.length_window = N`` batching);
- ``dense``: ``dense_reference.py`` (every batch padded to max_len, full masked L x L scores, an
  (N, R, D) negative gather, PyTorch's Bernoulli dropout), random batches.

The two paths compute the same function (tests/test_dense_reference.py) on the same batches but draw
different dropout masks and negatives, so they differ by training noise; ``--seeds`` repeats the genrec
path with other seeds to show how large that noise is. Each run is its own process (``--jobs`` at
once) and its result is kept in runs/parity/, so an interrupted comparison only reruns what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from throughput import CONFIGS  # noqa: E402  (the same ML-1M presets)


def cache_file(model_name: str, path: str, seed: int, epochs: int, window: int, precision: str = "fp32") -> Path:
    tag = f"-{precision}" if path == "genrec" and precision != "fp32" else ""
    return (REPO / "runs" / "parity" /
            f"{model_name}-{path}{tag}-w{window if path == 'genrec' else 0}-s{seed}-e{epochs}.json")


def run_one(model_name: str, path: str, seed: int, epochs: int, data_dir: str, threads: int, window: int,
            precision: str = "fp32") -> dict:
    from dense_reference import dense_train_step

    from genrec.config import load_config
    from genrec.data.batches import TrainLoader
    from genrec.eval.ranking import evaluate_model
    from genrec.losses import Loss
    from genrec.models import build_model
    from genrec.train.trainer import item_counts, load_data, seed_everything, train_step

    torch.set_num_threads(threads)
    window = window if path == "genrec" else 0
    cfg = load_config(REPO / CONFIGS[model_name], [f'data.path="{data_dir}"', f"train.length_window={window}",
                                                   f"train.seed={seed}"])
    seed_everything(seed)
    store, split = load_data(cfg)
    model = build_model(cfg.model, store.num_items)
    loss_fn = Loss(cfg.loss, store.num_items, item_counts(store, split))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                            weight_decay=cfg.train.weight_decay)
    loader = TrainLoader(store, split, cfg.train.batch_size, cfg.data.max_len, seed=seed, length_window=window)
    history, train_seconds = [], 0.0
    for epoch in range(epochs):
        model.train()
        t = time.perf_counter()
        for batch in loader.epoch(epoch):
            if path == "genrec":
                train_step(model, loss_fn, opt, batch, precision=precision)
            else:
                dense_train_step(model, cfg.loss, loss_fn.scorer, opt, batch, store.num_items)
        train_seconds += time.perf_counter() - t
        report = evaluate_model(model, loss_fn.scorer, store, split.valid, "valid", split.description,
                                cfg.data.max_len, cfg.eval.ks, cfg.eval.batch_size, cfg.eval.item_chunk,
                                cfg.eval.exclude_history)
        history.append({"epoch": epoch + 1, "HR@10": report.metrics["hr@10"], "NDCG@10": report.metrics["ndcg@10"]})
        print(json.dumps({"progress": history[-1], "path": path, "seed": seed}), file=sys.stderr, flush=True)
    result = {"model": model_name, "path": path, "seed": seed, "epochs": epochs, "window": window,
              "precision": precision if path == "genrec" else "fp32", "history": history,
              "train_seconds": train_seconds}
    out = cache_file(model_name, path, seed, epochs, window, precision)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hstu-large", choices=list(CONFIGS))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the genrec path (the first "
                    "one is also the dense path's)")
    ap.add_argument("--data", default=str(REPO / "data" / "ml-1m"), help="prepared ML-1M directory")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each uses --threads threads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--window", type=int, default=0, help="train.length_window of the genrec path (0: random batches)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="train.precision of the genrec path (bf16: matmuls on the bf16 units; the dense path stays fp32)")
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "PATH", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], int(args.one[2]), args.epochs, args.data, args.threads,
                                 args.window, args.precision)))
        return
    if not (Path(args.data) / "manifest.json").is_file():
        sys.exit(f"{args.data} is not a prepared dataset: genrec prepare ml1m-seq ../shared/data/ml-1m data/ml-1m")
    runs = [("dense", args.seeds[0])] + [("genrec", s) for s in args.seeds]
    results, todo = [], []
    for path, seed in runs:
        cached = cache_file(args.model, path, seed, args.epochs, args.window, args.precision)
        if cached.is_file():
            results.append(json.loads(cached.read_text()))
        else:
            todo.append([sys.executable, __file__, "--one", args.model, path, str(seed), "--epochs", str(args.epochs),
                         "--data", args.data, "--threads", str(args.threads), "--window", str(args.window),
                         "--precision", args.precision])
    running = []
    while todo or running:
        while todo and len(running) < args.jobs:
            running.append(subprocess.Popen(todo.pop(0), stdout=subprocess.DEVNULL))
        time.sleep(5)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            if proc.returncode:
                sys.exit(f"a run failed (exit {proc.returncode}): {' '.join(proc.args)}")
    results = [json.loads(cache_file(args.model, path, seed, args.epochs, args.window, args.precision).read_text())
               for path, seed in runs]
    table = format_table(results, args)
    print(table)
    if args.write:
        from results_file import write_section

        if args.precision == "fp32":
            write_section("parity", "Quality parity of the fast path (`python benchmarks/parity.py --write`)", table)
        else:
            write_section(f"parity-{args.precision}", f"Quality parity of the fast path in {args.precision} "
                          f"(`python benchmarks/parity.py --precision {args.precision} --write`)", table)


def minutes(result: dict) -> str:
    return "not recorded" if result.get("train_seconds") is None else f"{result['train_seconds'] / 60:.1f} min"


def format_table(results: list[dict], args) -> str:
    dense = next(r for r in results if r["path"] == "dense")
    fast = [r for r in results if r["path"] == "genrec"]
    same_seed = next(r for r in fast if r["seed"] == dense["seed"])
    lines = [f"`python benchmarks/parity.py --model {args.model} --epochs {args.epochs} --seeds "
             f"{' '.join(map(str, args.seeds))} --window {args.window}"
             + (f" --precision {args.precision}" if args.precision != "fp32" else "")
             + "`: validation after each epoch (full ranking of the 6,040 ML-1M users, "
             f"history excluded), {args.threads} thread(s) per run, {args.jobs} runs at once.", "",
             "| epoch | dense HR@10 | genrec HR@10 (same seed) | relative gap | "
             + " | ".join(f"genrec seed {r['seed']}" for r in fast if r is not same_seed) + " |",
             "|---:|---:|---:|---:|" + "---:|" * (len(fast) - 1)]
    for i, row in enumerate(dense["history"]):
        d, g = row["HR@10"], same_seed["history"][i]["HR@10"]
        others = " | ".join(f"{r['history'][i]['HR@10']:.4f}" for r in fast if r is not same_seed)
        lines.append(f"| {row['epoch']} | {d:.4f} | {g:.4f} | {100 * (g - d) / d:+.1f} % | {others} |")
    last = [r["history"][-1]["HR@10"] for r in fast]
    spread = f"{statistics.mean(last):.4f} ± {statistics.stdev(last):.4f}" if len(last) > 1 else f"{last[0]:.4f}"
    lines += ["", f"After {args.epochs} epochs: dense {dense['history'][-1]['HR@10']:.4f} "
                  f"(NDCG@10 {dense['history'][-1]['NDCG@10']:.4f}); genrec over seeds {spread}. "
                  f"Training time: dense {minutes(dense)}, genrec {', '.join(minutes(r) for r in fast)} "
                  "(runs shared the cores, one thread each)."]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
