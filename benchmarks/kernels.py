"""The compiled CPU kernels (genrec/models/kernels) against the stock PyTorch path, call by call.

    python benchmarks/kernels.py                 # HSTU-large shapes, 128 users, 2 threads
    python benchmarks/kernels.py --eval --write  # also the full-ranking evaluation of ML-1M; into RESULTS.md

Each row times one computation with ``GENREC_KERNELS`` semantics switched in process
(``kernels.use_kernels``), the two paths alternating ``--repeats`` times on the same inputs (this VM's
speed drifts by 20-50 % between minutes, so only alternating runs compare), and reports both medians,
both minima and the ratio of the medians:
- attention forward: ``causal_silu_attention`` without autograd (the attention kernel vs the stock tiles);
- HSTU-large layer at inference: ``HSTULayer.forward`` under ``no_grad`` on packed tokens (the fused
  ``hstu_attention_gate`` vs the stock layer);
- attention forward + backward: the training path (the kernels' forward and backward vs the stock tiles);
- sampled softmax, forward + backward: ML-1M shapes (one position per real token of the batch, 128
  negatives over 3,706 items, D = 50; the kernel's one pass with hashed negatives vs the SDDMM and
  embedding bags);
- dropout, forward + backward: p = 0.2 on the (tokens x 50) residual stream (hashed mask vs bulk integers);
- one HSTU-large training step on the same random batch of ML-1M histories (model, loss and AdamW; every
  kernel vs none);
- where the CPU has AVX512-BF16: the training layer's middle (SiLU and attention from the raw projection,
  forward + backward) on the float32 kernels against the bf16 dot-product kernels bf16 autocast uses;
- with ``--eval``: the full-ranking evaluation of the 6,040 ML-1M users by an untrained HSTU-large
  (model forward included, history excluded; prepared data in data/ml-1m, see throughput.py).
History lengths are drawn from ML-1M's when data/ml-1m exists (else uniform in [20, 200]).
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
sys.path.insert(0, str(HERE.parent / "src"))

from genrec.config import load_config  # noqa: E402
from genrec.data.batches import TrainLoader, training_batch  # noqa: E402
from genrec.eval.ranking import evaluate_model  # noqa: E402
from genrec.losses import Loss, sampled_softmax  # noqa: E402
from genrec.models import build_model, kernels  # noqa: E402
from genrec.models.hstu import HSTUConfig, HSTULayer, _CompiledSiluSplitAttention, causal_silu_attention  # noqa: E402
from genrec.models.layers import Tokens, dropout  # noqa: E402
from genrec.train.trainer import item_counts, load_data, seed_everything, train_step  # noqa: E402


def lengths_for(users: int, data: Path, max_len: int, rng: np.random.Generator) -> torch.Tensor:
    """Longest first, as evaluation batches come."""
    try:
        from genrec.data.store import SequenceStore

        counts = np.diff(SequenceStore.load(data).offsets)
        pool = np.minimum(counts[counts > 0], max_len)
    except Exception:  # no prepared ML-1M: a plain spread of lengths
        pool = np.arange(20, max_len + 1)
    drawn = np.sort(rng.choice(pool, size=users))[::-1].copy()
    return torch.from_numpy(drawn).long()


def alternate(stock, kernel, repeats: int) -> dict:
    """Seconds per call of each path, alternating; one untimed call of each first."""
    times = {"stock": [], "kernel": []}
    for enabled, f in ((False, stock), (True, kernel)):
        with kernels.use_kernels(enabled):
            f()
    for _ in range(repeats):
        for name, enabled, f in (("stock", False, stock), ("kernel", True, kernel)):
            with kernels.use_kernels(enabled):
                start = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - start)
    return times


def row(what: str, times: dict, unit: float = 1e3, suffix: str = "ms") -> str:
    med = {k: statistics.median(v) * unit for k, v in times.items()}
    low = {k: min(v) * unit for k, v in times.items()}
    return (f"| {what} | {med['stock']:.1f} {suffix} ({low['stock']:.1f}) | {med['kernel']:.1f} {suffix} "
            f"({low['kernel']:.1f}) | {med['stock'] / med['kernel']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=128, help="histories per batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10, help="alternating calls of each path per row")
    ap.add_argument("--data", default=str(HERE.parent / "data" / "ml-1m"), help="prepared ML-1M (lengths, --eval)")
    ap.add_argument("--eval", action="store_true", help="also time the full-ranking evaluation of ML-1M")
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with kernels.use_kernels(True):
        if kernels.silu_attention() is None:
            sys.exit(f"the kernel did not build: {kernels._state.get('error')}")

    torch.manual_seed(0)
    cfg = HSTUConfig(dim=50, num_blocks=8, num_heads=2, qk_dim=25, v_dim=25, max_len=200, relative_bias="position")
    lengths = lengths_for(args.users, Path(args.data), cfg.max_len, np.random.default_rng(0))
    B, L, H, d = args.users, int(lengths.max()), cfg.num_heads, cfg.qk_dim
    proj = torch.randn(B, L, 3 * H * d) * 0.5
    v, q, k = (t.reshape(B, L, H, d) for t in torch.split(proj, [H * d] * 3, dim=-1))
    bias = torch.randn(1, L, L) * 0.02
    lines = [f"HSTU-large shapes: {B} histories per batch (lengths {'from ML-1M' if Path(args.data).exists() else 'uniform'}: "
             f"mean {lengths.float().mean():.0f}, longest {L}), 2 heads of 25, position bias; {args.threads} "
             f"thread(s); {args.repeats} alternating calls per path: medians (minima).", "",
             "| computation | stock path | compiled kernel | speed-up |", "|---|---:|---:|---:|"]

    def attention():
        with torch.no_grad():
            causal_silu_attention(q, k, v, bias, lengths)
    lines.append(row("attention forward (no autograd)", alternate(attention, attention, args.repeats)))
    print(lines[-1], flush=True)

    layer = HSTULayer(cfg).eval()
    mask = torch.arange(L)[None, :] < lengths[:, None]
    tokens = Tokens(mask)
    x = tokens.pack(torch.randn(B, L, cfg.dim))

    def layer_forward():
        with torch.no_grad():
            layer(x, tokens, lengths, None)
    lines.append(row("HSTU layer at inference (packed tokens)", alternate(layer_forward, layer_forward, args.repeats)))
    print(lines[-1], flush=True)

    grad_proj = proj.clone().requires_grad_(True)

    def train_attention():
        gv, gq, gk = (t.reshape(B, L, H, d) for t in torch.split(grad_proj, [H * d] * 3, dim=-1))
        causal_silu_attention(gq, gk, gv, bias, lengths).sum().backward()
    lines.append(row("attention forward + backward (training)", alternate(train_attention, train_attention,
                                                                           args.repeats)))
    print(lines[-1], flush=True)

    tokens_n = int(lengths.sum())
    queries = torch.nn.functional.normalize(torch.randn(tokens_n, 50), dim=-1).requires_grad_(True)
    table = torch.nn.functional.normalize(torch.randn(3707, 50), dim=-1).requires_grad_(True)
    targets = torch.randint(1, 3707, (tokens_n,))

    def loss_step():
        sampled_softmax(queries, targets, table, 3706, 128, 0.05).backward()
    lines.append(row("sampled softmax, forward + backward (128 negatives)", alternate(loss_step, loss_step,
                                                                                       args.repeats)))
    print(lines[-1], flush=True)

    stream = torch.randn(tokens_n, 50, requires_grad=True)

    def dropout_step():
        dropout(stream, 0.2).sum().backward()
    lines.append(row("dropout, forward + backward", alternate(dropout_step, dropout_step, args.repeats)))
    print(lines[-1], flush=True)

    if Path(args.data).exists():
        config = load_config(str(HERE.parent / "configs" / "ml-1m" / "hstu-large.toml"), [f'data.path="{args.data}"'])
        seed_everything(0)
        store, split = load_data(config)
        model = build_model(config.model, store.num_items).train()
        loss_fn = Loss(config.loss, store.num_items, item_counts(store, split))
        opt = torch.optim.AdamW(model.parameters(), lr=config.train.lr, betas=tuple(config.train.betas))
        users = TrainLoader(store, split, config.train.batch_size, config.data.max_len, seed=0).batches(0)[0]
        batch = training_batch(store, users, split.train_end, config.data.max_len)

        def step():
            train_step(model, loss_fn, opt, batch)
        lines.append(row("HSTU-large training step (ML-1M batch of 128)", alternate(step, step, args.repeats)))
        print(lines[-1], flush=True)

    with kernels.use_kernels(True):
        kernel = kernels.silu_attention()
    if kernel.has_bf16_attention():
        lines += ["", "bf16 autocast's attention on this CPU's bf16 dot products (AVX512-BF16) against the float32 "
                  "kernels, the training layer's middle from the raw projection (SiLU, attention; forward + backward):",
                  "", "| computation | float32 kernels | bf16 kernels | speed-up |", "|---|---:|---:|---:|"]
        starts = torch.cumsum(lengths, 0) - lengths  # packed rows, one after another
        raw32 = (torch.randn(tokens_n, 4 * H * d) * 0.5).requires_grad_(True)
        raw16 = raw32.detach().bfloat16().requires_grad_(True)

        def middle(raw):
            def run():
                u, o = _CompiledSiluSplitAttention.apply(raw, bias, lengths, starts, kernel, H, d, d, 1.0 / L)
                (u.sum() + o.sum()).backward()
            return run
        lines.append(row("layer middle, forward + backward (raw float32 vs bf16 projection)",
                         alternate(middle(raw32), middle(raw16), args.repeats)))
        print(lines[-1], flush=True)

    if args.eval:
        config = load_config(str(HERE.parent / "configs" / "ml-1m" / "hstu-large.toml"), [f'data.path="{args.data}"'])
        seed_everything(0)
        store, split = load_data(config)
        model = build_model(config.model, store.num_items).eval()
        scorer = Loss(config.loss, store.num_items, item_counts(store, split)).scorer

        def evaluate():
            evaluate_model(model, scorer, store, split.valid, "valid", split.description, config.data.max_len,
                           config.eval.ks, config.eval.batch_size, config.eval.item_chunk, config.eval.exclude_history)
        lines.append(row("full-ranking evaluation of ML-1M, HSTU-large (6,040 users)",
                         alternate(evaluate, evaluate, max(1, args.repeats // 5)), unit=1.0, suffix="s"))
        print(lines[-1], flush=True)

    lines += ["", f"Command: `python benchmarks/kernels.py{' --eval' if args.eval else ''} --repeats {args.repeats}`"]
    print("\n".join(lines))
    if args.write:
        from results_file import write_section

        write_section("kernels", "Compiled CPU kernels against the stock path (`python benchmarks/kernels.py`)",
                      "\n".join(lines))


if __name__ == "__main__":
    main()
