"""Training and evaluation throughput: genrec's training path against the straightforward dense reference.

    python benchmarks/throughput.py                       # SASRec, HSTU, HSTU-large on ML-1M
    python benchmarks/throughput.py --models hstu-large --steps 6 --write

One run measures this machine's matrix-multiply rate (fp32 and bf16), then for each model trains a few
steps on ML-1M (the real length distribution: median 96, mean 166, capped at L = 200; B = 128) on the
same random batches with (a) genrec's training path (batches trimmed to their longest row, packed
tokens, jagged attention, the other tricks in the model and loss files) and (b) ``dense_reference.py``
(every batch padded to 200, masks on full L x L scores, plain indexing, (N, R, D) negatives).
``--window N`` gives the genrec path ``train.length_window = N`` batching instead (faster still, but
it changes the batches, and it slowed learning on ML-1M: see the parity section of RESULTS.md). Each
(model, path) runs in its own process so peak RSS is its own, ``--repeats`` times, the two paths
alternating (this VM's speed drifts by 20-50 % between minutes: the speed-up is the median of the
ratios of runs made one after the other). ``genrec-bf16`` is genrec's path with ``train.precision = "bf16"``
(the matmuls on the CPU's bf16 units, HSTU's attention on the bf16 dot-product kernels where the CPU has
AVX512-BF16, norms, dropout and loss in float32 kernels; its quality effect: ``parity.py --precision bf16``); it runs by default where bf16 matmuls outpace fp32
ones (bf16 units), and its speed-up is against the same float32 dense reference (the dense path under
bf16 autocast is slower than in float32 here). Reported: seconds per step, real training tokens per
second (padding excluded), useful FLOP/s (matmul work an ideal jagged implementation must do, forward
+ backward = 3 x forward) as a share of the measured fp32 matmul rate, peak RSS, and the full-ranking
evaluation rate of the 6,040 ML-1M users (model forward included, history excluded). ``--write``
replaces the table in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PATHS = ["genrec", "genrec-bf16", "dense"]
CONFIGS = {"sasrec": "configs/ml-1m/sasrec.toml", "hstu": "configs/ml-1m/hstu.toml",
           "hstu-large": "configs/ml-1m/hstu-large.toml"}
ML1M_RAW = REPO.parent / "shared" / "data" / "ml-1m"


def matmul_rate(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def useful_flops(cfg, lengths: np.ndarray, num_items: int) -> float:
    """Matmul FLOPs of one forward pass over real tokens only (causal pairs only), x3 for fwd + bwd."""
    m = cfg.model
    T = float(lengths.sum())
    P = float((lengths * (lengths + 1) / 2).sum())  # causal (query, key) pairs
    D = m.dim
    if hasattr(m, "qk_dim"):  # HSTU
        H, dqk, dv = m.num_heads, m.qk_dim, m.v_dim
        out_in = H * dv * (3 if m.output == "concat" else 1)
        per_layer = 2 * T * D * (2 * H * dv + 2 * H * dqk) + 2 * P * H * (dqk + dv) + 2 * T * out_in * D
    else:  # SASRec
        per_layer = 2 * T * D * 3 * D + 2 * P * 2 * D + 2 * T * D * D + 2 * T * D * m.ffn_dim * 2
    loss = 2 * T * (cfg.loss.num_negatives + 1) * D if cfg.loss.name == "sampled_softmax" else 2 * T * D * num_items
    return 3 * (m.num_blocks * per_layer + loss)


def measure_one(model_name: str, path: str, data_dir: str, steps: int, threads: int, window: int) -> dict:
    """Runs in a child process: time `steps` training steps of one (model, path)."""
    sys.path.insert(0, str(HERE))
    from dense_reference import dense_train_step

    from genrec.config import load_config
    from genrec.data.batches import TrainLoader
    from genrec.eval.ranking import evaluate_model
    from genrec.losses import Loss
    from genrec.models import build_model
    from genrec.train.trainer import item_counts, load_data, seed_everything, train_step

    torch.set_num_threads(threads)
    overrides = [f'data.path="{data_dir}"', f"train.length_window={window if path != 'dense' else 0}"]
    cfg = load_config(REPO / CONFIGS[model_name], overrides)
    seed_everything(0)
    store, split = load_data(cfg)
    model = build_model(cfg.model, store.num_items)
    loss_fn = Loss(cfg.loss, store.num_items, item_counts(store, split))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    loader = TrainLoader(store, split, cfg.train.batch_size, cfg.data.max_len, seed=0,
                         length_window=cfg.train.length_window)
    order = loader.batches(0)
    # an evenly spaced sample of the epoch's batches, so bucketed batches of every length are timed
    picks = [order[i] for i in np.linspace(0, len(order) - 1, steps + 1).round().astype(int)]
    from genrec.data.batches import training_batch

    batches = [training_batch(store, users, split.train_end, cfg.data.max_len) for users in picks]

    def step(batch):
        if path.startswith("genrec"):
            return train_step(model, loss_fn, opt, batch, precision="bf16" if path == "genrec-bf16" else "fp32")[1]
        return dense_train_step(model, cfg.loss, loss_fn.scorer, opt, batch, store.num_items)

    model.train()
    step(batches[0])  # warm-up
    times, tokens, lengths = [], 0, []
    for b in batches[1:]:
        t = time.perf_counter()
        tokens += step(b)
        times.append(time.perf_counter() - t)
        lengths.append(b.lengths.numpy())
    seconds = sum(times)
    flops = useful_flops(cfg, np.concatenate(lengths), store.num_items)
    t = time.perf_counter()
    if path == "genrec":
        evaluate_model(model, loss_fn.scorer, store, split.valid, "valid", split.description, cfg.data.max_len,
                       cfg.eval.ks, cfg.eval.batch_size, cfg.eval.item_chunk, cfg.eval.exclude_history)
    eval_s = time.perf_counter() - t
    return {"model": model_name, "path": path, "s_per_step": statistics.median(times),
            "tokens_per_s": tokens / seconds, "flops_per_s": flops / seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "eval_users_per_s": len(split.valid) / eval_s if path == "genrec" else None,
            "eval_s": eval_s if path == "genrec" else None}


def _row(model: str, path: str, runs: dict, fp32: float) -> str:
    """One table row: medians over the repeats; a genrec row carries its speed-up, the median of the
    genrec / dense ratios of runs made one after the other (their range in brackets)."""
    rs = runs[path]

    def med(key):
        return statistics.median(r[key] for r in rs)

    speed = ""
    if path != "dense" and "dense" in runs:
        ratios = sorted(g["tokens_per_s"] / d["tokens_per_s"] for g, d in zip(rs, runs["dense"]))
        spread = f" ({ratios[0]:.1f}-{ratios[-1]:.1f})" if len(ratios) > 1 else ""
        speed = f"{statistics.median(ratios):.1f}x{spread}"
    ev = f"{med('eval_users_per_s'):,.0f} ({med('eval_s'):.1f} s)" if rs[0]["eval_users_per_s"] else ""
    return (f"| {model} | {path} | {med('s_per_step'):.2f} | {med('tokens_per_s'):,.0f} | {speed} | "
            f"{med('flops_per_s') / 1e9:.1f} | {100 * med('flops_per_s') / fp32:.1f} % | "
            f"{max(r['peak_rss_gib'] for r in rs):.2f} | {ev} |")


def ensure_ml1m(data_dir: str | None) -> str:
    if data_dir:
        return data_dir
    if (REPO / "data" / "ml-1m" / "manifest.json").is_file():
        return str(REPO / "data" / "ml-1m")
    if not ML1M_RAW.is_dir():
        sys.exit(f"ML-1M not found: prepare it (genrec prepare ml1m-seq {ML1M_RAW} data/ml-1m) or pass --data")
    from genrec.data.datasets import ml1m_seq

    out = Path(tempfile.mkdtemp()) / "ml-1m"
    ml1m_seq(ML1M_RAW).save(out)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--paths", nargs="+", default=None, choices=PATHS,
                    help="default: genrec, genrec-bf16 where this CPU has bf16 units, dense")
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per (model, path)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each path per model (medians reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--window", type=int, default=0, help="train.length_window of the genrec path (0: random batches)")
    ap.add_argument("--data", default=None, help="prepared ML-1M directory (default: data/ml-1m or built)")
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 1 or args.steps < 1:
        ap.error("--repeats and --steps must be at least 1")

    if args.one:
        from genrec.system import tune_allocator

        tune_allocator()  # as every genrec command does; both paths get it (GENREC_MALLOC=default: off)
        print(json.dumps(measure_one(args.one[0], args.one[1], args.data, args.steps, args.threads, args.window)))
        return
    torch.set_num_threads(args.threads)
    data = ensure_ml1m(args.data)
    fp32, bf16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    if args.paths is None:  # bf16 only where the hardware runs it faster (emulated, it is far slower)
        args.paths = [p for p in PATHS if p != "genrec-bf16" or bf16 > fp32]
    lines = [f"Machine: {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads; "
             f"matmul fp32 {fp32 / 1e9:.1f} GFLOP/s, bf16 {bf16 / 1e9:.1f} GFLOP/s (1024^3, best of 10).",
             f"Data: ML-1M ({data}), B = 128, L <= 200, {args.steps} timed steps per run, {args.repeats} alternating "
             "runs per path (medians; speed-up = median of the ratios of consecutive runs, range in brackets); "
             + ("every path on the same random batches" if not args.window else
                f"genrec on length-sorted batches (train.length_window={args.window}), dense on random batches")
             + "; the dense path pads every batch to 200.", "",
             "| model | path | s/step | real tokens/s | speed-up | useful GFLOP/s | % of fp32 matmul | peak RSS GiB "
             "| full-ranking eval (users/s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for model in args.models:
        runs = {path: [] for path in args.paths}
        for _ in range(args.repeats):  # the paths alternate, so a drift of this VM's speed hits both
            for path in args.paths:
                cmd = [sys.executable, __file__, "--one", model, path, "--data", data, "--steps", str(args.steps),
                       "--threads", str(args.threads), "--window", str(args.window)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                runs[path].append(json.loads(out))
        for path in args.paths:
            line = _row(model, path, runs, fp32)
            lines.append(line)
            print(line, flush=True)
    if args.write:
        sys.path.insert(0, str(HERE))
        from results_file import write_section

        write_section("throughput", "Training throughput (`python benchmarks/throughput.py --write`)", "\n".join(lines))


if __name__ == "__main__":
    main()
