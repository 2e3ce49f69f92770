"""Approximate retrieval against exact top-K on a large synthetic catalogue.

    python benchmarks/retrieval.py                    # 1M items, D = 64, top-100, HNSW and IVF
    python benchmarks/retrieval.py --items 200000 --write

Items are unit vectors drawn around 2,000 random centres (a clustered catalogue, like learned item
embeddings); queries are perturbed copies of random items. For each index: build time, recall@K of the
approximate top-K against the exact top-K (``ExactIndex``: chunked matmul over every item), and the
time per query, both one query at a time (median; the online case) and in batches of 256 (throughput).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def catalogue(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(2000, d, generator=g), dim=-1)
    items = centres[torch.randint(0, 2000, (n,), generator=g)] + 0.35 * torch.randn(n, d, generator=g) / d ** 0.5
    items = torch.nn.functional.normalize(items, dim=-1)
    return torch.cat([torch.zeros(1, d), items])  # row 0 = padding


def per_query(index, queries: torch.Tensor, k: int, single: int) -> tuple[float, float]:
    times = []
    for q in queries[:single]:
        t = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    for s in range(0, len(queries), 256):
        index.search(queries[s:s + 256], k)
    return statistics.median(times), (time.perf_counter() - t) / len(queries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("-k", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=["ivf", "hnsw"], choices=["ivf", "hnsw"], help="indexes to measure")
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args()
    from genrec.infer.index import ExactIndex, FaissIndex

    torch.set_num_threads(args.threads)
    items = catalogue(args.items, args.dim)
    g = torch.Generator().manual_seed(1)
    picks = torch.randint(1, args.items + 1, (args.queries,), generator=g)
    queries = torch.nn.functional.normalize(items[picks] + 0.3 * torch.randn(args.queries, args.dim, generator=g)
                                            / args.dim ** 0.5, dim=-1)
    exact = ExactIndex(items)
    _, truth = exact.search(queries, args.k)
    rows = [f"{args.items:,} items, D = {args.dim}, {args.queries} queries, top-{args.k}, {args.threads} threads, "
            f"torch {torch.__version__}.", "",
            "| index | build s | recall@K vs exact | ms / query (one at a time, median) | ms / query (batches of 256) "
            "| speed-up vs exact (one at a time) |", "|---|---:|---:|---:|---:|---:|"]
    e1, eb = per_query(exact, queries, args.k, 50)
    rows.append(f"| exact (chunked matmul) | 0 | 1.000 | {e1 * 1e3:.2f} | {eb * 1e3:.3f} | 1.0x |")
    print("\n".join(rows), flush=True)
    for kind, options in [("ivf", {"nprobe": 64}), ("ivf", {"nprobe": 128}),
                          ("hnsw", {"hnsw_m": 16, "ef_construction": 100, "ef_search": 300})]:
        if kind not in args.kinds:
            continue
        t = time.perf_counter()
        index = FaissIndex(items, kind=kind, threads=args.threads, **options)
        build = time.perf_counter() - t
        _, got = index.search(queries, args.k)
        recall = np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(got.numpy(), truth.numpy())])
        s1, sb = per_query(index, queries, args.k, 200)
        label = f"{kind} ({', '.join(f'{k}={v}' for k, v in options.items())})"
        rows.append(f"| {label} | {build:.0f} | {recall:.3f} | {s1 * 1e3:.2f} | {sb * 1e3:.3f} | {e1 / s1:.0f}x |")
        print(rows[-1], flush=True)
    if args.write:
        sys.path.insert(0, str(HERE))
        from results_file import write_section

        write_section("retrieval", "Approximate retrieval (`python benchmarks/retrieval.py --write`)", "\n".join(rows))


if __name__ == "__main__":
    main()
