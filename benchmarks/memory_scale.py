"""Does training memory grow with the dataset? Same model and catalogue, 10x and 100x more events.

    python benchmarks/memory_scale.py                       # 1M, 10M events (10,000 items), 30 steps each
    python benchmarks/memory_scale.py --events 1 10 100     # add 100M events (about 2.5 GB on disk)

Generates synthetic logs (``genrec.data.synthetic``) that differ only in their number of users (100
events each on average) over the same 10,000-item catalogue, then trains SASRec for ``--steps`` steps
on each, every run in its own process, streaming batches from the memory-mapped store. Reported from
/proc/self/status at the end: peak RSS (VmHWM), anonymous resident memory (RssAnon: model, optimiser,
activations, index arrays) and file-backed resident memory (RssFile: pages of the memory-mapped store
the kernel has cached; reclaimable, shared, bounded by what the batches touched). The per-user offsets
(8 bytes per user) and the split's per-user arrays are the only structures that scale with the data.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def status() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    return fields


def train_steps(data: str, steps: int, threads: int) -> dict:
    import torch

    from genrec.config import load_config
    from genrec.data.batches import TrainLoader
    from genrec.losses import Loss
    from genrec.models import build_model
    from genrec.train.trainer import item_counts, load_data, seed_everything, train_step

    torch.set_num_threads(threads)
    cfg = load_config(HERE.parent / "configs" / "synthetic" / "sasrec.toml", [f'data.path="{data}"', "data.max_len=200"])
    seed_everything(0)
    store, split = load_data(cfg)
    model = build_model(cfg.model, store.num_items)
    loss_fn = Loss(cfg.loss, store.num_items, item_counts(store, split))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = TrainLoader(store, split, cfg.train.batch_size, cfg.data.max_len, seed=0)
    t = time.perf_counter()
    for i, batch in enumerate(loader.epoch(0)):
        if i == steps:
            break
        train_step(model, loss_fn, opt, batch)
    return {"events": store.num_events, "users": store.num_users, "items": store.num_items,
            "seconds_per_step": (time.perf_counter() - t) / steps, **status()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, nargs="+", default=[1, 10], help="dataset sizes in millions of events")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where to write the generated logs (default: a temp dir)")
    ap.add_argument("--one", metavar="DATA", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(train_steps(args.one, args.steps, args.threads)))
        return
    from genrec.data.synthetic import SyntheticConfig, generate_to

    work = Path(args.workdir or tempfile.mkdtemp(prefix="genrec-memory-"))
    rows = ["| events | users | items | s/step | peak RSS GiB | RssAnon GiB | RssFile GiB |", "|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(rows), flush=True)
    for millions in args.events:
        data = work / f"events-{millions}m"
        if not (data / "manifest.json").is_file():
            cfg = SyntheticConfig(num_users=millions * 10_000, num_items=10_000, num_clusters=50, mean_len=100,
                                  max_len=1000)
            generate_to(cfg, data, overwrite=True)
        out = subprocess.run([sys.executable, __file__, "--one", str(data), "--steps", str(args.steps),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        row = (f"| {r['events']:,} | {r['users']:,} | {r['items']:,} | {r['seconds_per_step']:.2f} | {r['VmHWM']:.2f} | "
               f"{r['RssAnon']:.2f} | {r['RssFile']:.2f} |")
        rows.append(row)
        print(row, flush=True)


if __name__ == "__main__":
    main()
