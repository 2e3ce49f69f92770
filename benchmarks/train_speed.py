"""Training and evaluation speed of genrec presets on a prepared dataset.

    python benchmarks/train_speed.py configs/ml-1m/sasrec.toml configs/ml-1m/hstu-large.toml --steps 10

For each config: builds the model exactly as `genrec train` does, runs ``--warmup`` untimed steps then
``--steps`` timed steps in the real epoch-0 batch order, and reports seconds per step, real training
tokens per second (predicted positions, padding excluded), the seconds one epoch takes at that rate,
the time of one full-ranking validation pass, and the peak resident memory. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from genrec.config import load_config
from genrec.data.batches import TrainLoader
from genrec.eval.ranking import evaluate_model
from genrec.losses import Loss
from genrec.models import build_model
from genrec.train.trainer import item_counts, load_data, seed_everything, train_step


def measure(path: str, overrides: list[str], steps: int, warmup: int) -> dict:
    cfg = load_config(path, overrides)
    seed_everything(cfg.train.seed)
    store, split = load_data(cfg)
    model = build_model(cfg.model, store.num_items)
    loss_fn = Loss(cfg.loss, store.num_items, item_counts(store, split))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    loader = TrainLoader(store, split, cfg.train.batch_size, cfg.data.max_len, seed=cfg.train.seed,
                         length_window=cfg.train.length_window)
    batches = loader.epoch(0)
    model.train()
    for _ in range(warmup):
        train_step(model, loss_fn, opt, next(batches))
    tokens, t0 = 0, time.perf_counter()
    for _ in range(steps):
        tokens += train_step(model, loss_fn, opt, next(batches))[1]
    seconds = (time.perf_counter() - t0) / steps
    t1 = time.perf_counter()
    evaluate_model(model, loss_fn.scorer, store, split.valid, "valid", split.description, cfg.data.max_len,
                   cfg.eval.ks, cfg.eval.batch_size, cfg.eval.item_chunk, cfg.eval.exclude_history)
    eval_seconds = time.perf_counter() - t1
    return {"config": path, "model": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
            "s_per_step": seconds, "tokens_per_s": tokens / (seconds * steps),
            "s_per_epoch": seconds * len(loader), "eval_s": eval_seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--set", action="append", default=[], help="override for every config, e.g. data.path=...")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| config | model | params | s/step | train tokens/s | s/epoch | full-ranking valid pass (s) | peak RSS (GiB, cumulative) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for path in args.configs:
        r = measure(path, args.set, args.steps, args.warmup)
        print(f"| {r['config']} | {r['model']} | {r['params']:,} | {r['s_per_step']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{r['s_per_epoch']:.1f} | {r['eval_s']:.1f} | {r['peak_rss_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
