"""Load test of the HTTP service: latency percentiles, throughput and errors under concurrent clients.

    python benchmarks/serve_load.py runs/ml-1m-hstu-large                  # 1 and 32 clients, 20 s each
    python benchmarks/serve_load.py RUN --clients 1,8,32 --seconds 30 --bad-share 0.1 --write

Starts ``genrec serve RUN`` on loopback (its own process), waits for /healthz, then for each client count
opens that many keep-alive HTTP/1.1 connections and sends requests back to back for ``--seconds``
(after a short warm-up). Each valid request is one user's real history from the run's dataset (its last
``--history`` items) asking for the top ``-k`` over all items with the history excluded. With
``--bad-share p`` a share p of the requests is malformed (bad JSON, wrong types, k out of range, unknown
fields, histories over the limit): they must get a 4xx, never a 5xx. Latency is measured per request by
the client (send to last byte) and reported for valid requests only. The client is plain asyncio
sockets with pre-encoded requests, so that it takes little of the machine from the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def histories(run_dir: Path, length: int, n: int | None = 2000) -> list[list]:
    """The last ``length`` raw item ids of up to ``n`` random users of the run's dataset (``n=None``: every
    user, in order; benchmarks/batch_recommend.py)."""
    from genrec.data.store import SequenceStore
    from genrec.infer.recommender import Recommender

    rec = Recommender.load(run_dir)
    path = Path(rec.config["data"]["path"])
    store = SequenceStore.load(path)
    users = range(store.num_users) if n is None else np.random.default_rng(0).permutation(store.num_users)[:n]
    out = []
    for u in users:
        items = store.user_items(int(u))[-length:]
        out.append(store.item_vocab.to_raw(items).tolist())
    return out


def http_request(body: bytes) -> bytes:
    return (b"POST /recommend HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def malformed(k: int) -> list[bytes]:
    return [json.dumps(x).encode() if not isinstance(x, bytes) else x for x in [
        b'{"history": [1, 2',                        # bad JSON
        {"history": "1,2,3", "k": k},                # wrong type
        {"history": [1, 2, 3], "k": 0},              # k out of range
        {"history": [1, 2, 3], "k": 10**6},          # k out of range
        {"history": [1, 2, 3], "user": 7},           # unknown field
        {"history": [1.5, 2.5]},                     # wrong item type
        {"history": list(range(20_000))},            # history over the limit
        {"k": k},                                    # missing history
    ]]


async def client(port: int, valid: list[bytes], bad: list[bytes], bad_share: float, until: float, seed: int,
                 stats: dict) -> None:
    rnd = random.Random(seed)
    reader = writer = None
    while time.perf_counter() < until:
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        is_bad = rnd.random() < bad_share
        req = rnd.choice(bad) if is_bad else rnd.choice(valid)
        t = time.perf_counter()
        try:
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if b"connection: close" in head.lower():
                writer.close()
                writer = None
        except (ConnectionError, asyncio.IncompleteReadError):
            stats["conn_errors"] += 1
            writer = None
            continue
        dt = time.perf_counter() - t
        if is_bad:
            stats["bad"] += 1
            stats["bad_5xx" if status >= 500 else ("bad_4xx" if status >= 400 else "bad_2xx")] += 1
        else:
            stats["latency"].append(dt)
            if status != 200:
                stats["valid_errors"] += 1
    if writer is not None:
        writer.close()


def run_load(port: int, valid: list[bytes], bad: list[bytes], clients: int, seconds: float,
             bad_share: float) -> dict:
    stats = {"latency": [], "valid_errors": 0, "bad": 0, "bad_4xx": 0, "bad_5xx": 0, "bad_2xx": 0, "conn_errors": 0}

    async def go():
        warm = {k: (0 if k != "latency" else []) for k in stats}
        await asyncio.gather(*[client(port, valid, bad, 0.0, time.perf_counter() + 1.0, 100 + i, warm)
                               for i in range(clients)])
        t0 = time.perf_counter()
        await asyncio.gather(*[client(port, valid, bad, bad_share, t0 + seconds, i, stats) for i in range(clients)])
        return time.perf_counter() - t0

    try:
        import uvloop
        elapsed = uvloop.run(go())
    except ImportError:
        elapsed = asyncio.run(go())
    lat = np.array(stats["latency"]) * 1000
    return {"clients": clients, "seconds": elapsed, "valid": len(lat), "bad": stats["bad"],
            "rps": (len(lat) + stats["bad"]) / elapsed, "valid_rps": len(lat) / elapsed,
            "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "valid_errors": stats["valid_errors"], "bad_4xx": stats["bad_4xx"], "bad_5xx": stats["bad_5xx"],
            "bad_2xx": stats["bad_2xx"], "conn_errors": stats["conn_errors"]}


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as r:
        return json.loads(r.read())


def start_server(run_dir: Path, port: int, threads: int, max_batch: int, workers: int = 1,
                 compile: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "genrec.cli", "serve", str(run_dir), "--port", str(port),
           "--threads", str(threads), "--max-batch", str(max_batch), "--workers", str(workers)]
    cmd += ["--compile"] if compile else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + (900 if compile else 120)
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("the server did not answer /healthz in time")


def table(rows: list[dict], args, meta: dict) -> str:
    lines = [f"Run `{args.run_dir}` ({meta.get('model')}, {meta.get('items'):,} items, model reads "
             f"{meta.get('max_len')} events); each valid request: a {args.history}-item history from the run's "
             f"dataset, top-{args.k} over all items, history excluded; {args.bad_share:.0%} malformed requests "
             f"mixed in; {args.seconds:.0f} s per row after a 1 s warm-up; server `--threads {args.server_threads} "
             f"--workers {args.workers} --max-batch {args.max_batch}{' --compile' if args.compile else ''}`; client and server share this machine's {os.cpu_count()} cores.",
             "",
             "| clients | requests/s (valid) | p50 ms | p99 ms | valid errors | malformed -> 4xx | malformed -> 5xx "
             "| connection errors | requests per model call | model ms per request |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['rps']:.0f} ({r['valid_rps']:.0f}) | {r['p50']:.1f} | {r['p99']:.1f} "
                     f"| {r['valid_errors']} | {r['bad_4xx']} / {r['bad']} | {r['bad_5xx']} | {r['conn_errors']} "
                     f"| {r['batch']:.1f} | {r['model_ms']:.2f} |")
    lines += ["", f"Command: `python benchmarks/serve_load.py {args.run_dir} --clients {args.clients} "
                  f"--seconds {args.seconds:g} --bad-share {args.bad_share:g} -k {args.k} --server-threads "
                  f"{args.server_threads} --workers {args.workers}{' --compile' if args.compile else ''}`"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--clients", default="1,32", help="comma-separated numbers of concurrent clients")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per client count")
    ap.add_argument("--bad-share", type=float, default=0.1, help="share of malformed requests")
    ap.add_argument("-k", type=int, default=100)
    ap.add_argument("--history", type=int, default=200, help="history length of each request")
    ap.add_argument("--server-threads", type=int, default=2, help="PyTorch threads of the server")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1, help="model threads of the server")
    ap.add_argument("--compile", action="store_true", help="genrec serve --compile (compiled one-request encoder)")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args()

    hist = histories(args.run_dir, args.history)
    valid = [http_request(json.dumps({"history": h, "k": args.k}).encode()) for h in hist]
    bad = [http_request(b) for b in malformed(args.k)]
    port = args.port
    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    proc = start_server(args.run_dir, port, args.server_threads, args.max_batch, args.workers, args.compile)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata") as r:
            meta = json.loads(r.read())
        rows = []
        for c in [int(x) for x in args.clients.split(",")]:
            before = health(port)
            rows.append(run_load(port, valid, bad, c, args.seconds, args.bad_share))
            after = health(port)  # includes the warm-up second: a ratio, not a count
            n = max(1, after["requests"] - before["requests"])
            rows[-1]["batch"] = n / max(1, after["batches"] - before["batches"])
            rows[-1]["model_ms"] = 1000 * (after["model_seconds"] - before["model_seconds"]) / n
            print(f"{c} clients: {rows[-1]['rps']:.0f} req/s, p99 {rows[-1]['p99']:.1f} ms", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = table(rows, args, meta)
    print(text)
    if args.write:
        from results_file import write_section

        write_section("serve-load", "HTTP service under load (issue 5)", text)


if __name__ == "__main__":
    main()
