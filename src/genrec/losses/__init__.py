"""Training objectives over hidden states and an item table. Separate from the models.

Every loss takes the hidden states of the positions that have a target, ``queries (N, D)``, their
``targets (N,)`` (dense item ids >= 1) and the item table ``items (I + 1, D)`` (row 0 = padding, never
a candidate), and returns a scalar mean loss. Scoring goes through :class:`genrec.models.scoring.Scorer`
so training and evaluation compare queries and items the same way (dot or cosine, / temperature).

- ``full_softmax``: cross-entropy over all items, computed in chunks of positions whose gradients are
  made in the same pass, so memory stays bounded by ``chunk_size x I`` and nothing is recomputed.
- ``sampled_softmax``: the target against R uniform negatives drawn per position; negatives equal to the
  target (accidental hits) are masked; optional logQ correction (a no-op for uniform sampling, kept for
  non-uniform samplers). With the compiled kernels (CPU float32) the negatives are hashed from a seed
  and loss and gradients come from one pass (``_CompiledSampledSoftmax``), else from ``torch.randint``.
- ``in_batch``: the other positions' targets in the batch are the negatives; repeats of the target are
  masked; optional logQ correction with the items' training frequency. Under DDP the negatives are
  those of the rank's own slice of the batch.
- ``bce``: binary cross-entropy with one uniform negative per position (the original SASRec objective
  when used with ``temperature = 1`` and ``l2_norm = false``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from genrec.config import LossConfig
from genrec.models import kernels
from genrec.models.scoring import Scorer, scores_against

NEG_INF = -1e9


SOFTMAX_ROWS = 512  # full softmax: positions per chunk at most ...
SOFTMAX_BLOCK = 2**24  # ... and logits per chunk at most (64 MiB in fp32)


def _softmax_pass(q: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, temperature: float, chunk_size: int,
                  grads: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean cross-entropy of ``(q / temperature) @ items.T`` (column 0 excluded) and, with ``grads``, its
    gradients with respect to q and items: one pass over chunks of positions (see ``_FullSoftmax``)."""
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 softmax under bf16 autocast; fp64 stays fp64
    q_scaled = q / temperature
    dq = q.new_empty(q.shape, dtype=dtype) if grads else None
    ditems = items.new_zeros(items.shape, dtype=dtype) if grads else None
    autocast = torch.is_autocast_enabled(q.device.type)
    total = q.new_zeros((), dtype=dtype)
    chunk_size = max(1, min(chunk_size, SOFTMAX_ROWS, SOFTMAX_BLOCK // items.shape[0]))
    for s in range(0, len(q), chunk_size):
        qc, tc = q_scaled[s:s + chunk_size], targets[s:s + chunk_size]
        logits = scores_against(qc, items).to(dtype)  # (n, I + 1)
        logits[:, 0] = NEG_INF  # padding is never a candidate
        target_logit = logits.gather(1, tc[:, None]).squeeze(1)
        top = logits.amax(dim=1, keepdim=True)
        e = logits.sub_(top).exp_()  # in place: exp(logit - max)
        norm = e.sum(dim=1, keepdim=True)  # softmax = e / norm
        total += (top.squeeze(1) + norm.log().squeeze(1) - target_logit).sum()
        if not grads:
            continue
        # d loss / d logits = e / norm - one_hot(target)
        if autocast:  # bf16 matmuls: subtract the one-hot before rounding (for a confident target the two
            g = e.div_(norm)  # terms nearly cancel, and rounding them separately swamps the difference)
            g[torch.arange(len(tc), device=q.device), tc] -= 1.0
            dq[s:s + chunk_size] = g @ items
            ditems += g.T @ qc
        else:  # 1 / norm and the one-hot fold into the matmuls: no pass over the (n, I + 1) block for them
            dq[s:s + chunk_size] = (e @ items.to(dtype)).div_(norm).sub_(items[tc].to(dtype))
            qn = qc.to(dtype)
            ditems += e.T @ (qn / norm)
            ditems.index_add_(0, tc, qn, alpha=-1.0)
    n = max(1, len(q))
    if grads:
        return total / n, (dq / (n * temperature)).to(q.dtype), (ditems / n).to(items.dtype)
    return total / n, None, None


class _GradientsInForward(torch.autograd.Function):
    """Base of the losses whose forward returns the scalar loss and saves ``dq, ditems`` (the gradients of
    its first two inputs, queries and item table): backward only scales them by the upstream gradient."""

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        dq, ditems = ctx.saved_tensors
        return (dq * grad, ditems * grad) + (None,) * (len(ctx.needs_input_grad) - 2)


class _FullSoftmax(_GradientsInForward):
    """Full-softmax cross-entropy whose gradients are made in the forward pass.

    The loss is a scalar, so its gradients are known up to the upstream scale as soon as the softmax
    of a chunk is: each chunk's logits become ``softmax - one_hot`` in place and go straight into the two
    gradient matmuls, then the chunk is dropped. Three matmuls and 4 passes over a (chunk, I) block,
    nothing recomputed, memory bounded by ``chunk_size x I``; plain autograd makes ~10 passes (scale,
    log-softmax, NLL and their backwards) and keeps or recomputes the logits. Chunks of at most 512
    rows: a block that stays below the allocator's mmap threshold is reused instead of page-faulted in
    again each time. One thread, forward + backward: Beauty shapes (1.5k positions x 12.1k items, D = 64)
    571 -> 170 ms; ML-1M shapes (13.6k positions x 3.7k items) 869 -> 535 ms: about the time of the
    three matmuls alone.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, temperature: float,
                chunk_size: int) -> torch.Tensor:
        loss, dq, ditems = _softmax_pass(q, items, targets, temperature, chunk_size, grads=True)
        ctx.save_for_backward(dq, ditems)
        return loss


def full_softmax(q: torch.Tensor, targets: torch.Tensor, items: torch.Tensor, temperature: float,
                 chunk_size: int = 4096) -> torch.Tensor:
    if torch.is_grad_enabled() and (q.requires_grad or items.requires_grad):
        return _FullSoftmax.apply(q, items, targets, temperature, chunk_size)
    return _softmax_pass(q, items, targets, temperature, chunk_size, grads=False)[0]  # evaluation: one matmul


GATHER_CHUNK = 64  # positions per chunk when gathering negative embeddings: (64, R, D) stays in cache


class _NegativeScores(torch.autograd.Function):
    """(N, R) scores q[n] . items[negatives[n, r]] without an (N, R, D) tensor.

    Forward is one sampled dense-dense matmul at the drawn pairs (``_sampled_scores``; much less work
    than scoring all items with a K = D matmul, which runs far below the matmul peak for D ~ 50).
    Backward uses two weighted ``embedding_bag`` sums, fused kernels that need no (N, R, D) tensor
    either: the query gradient sum_r g[n, r] items[negatives[n, r]] is one bag per position; the item
    gradient is one bag per item over the positions that drew it, found by sorting the negatives (a
    2-byte radix sort when there are at most 2^15 items). On ML-1M shapes (13.8k positions, 128
    negatives, 3,708 items) forward + backward take 58 ms on 2 threads (83 ms with the earlier
    gather-multiply-sum forward and 4-byte sort keys), against 290-390 ms when scoring every item with
    chunked matmuls and 480+ ms with plain autograd (whose scatter-add into the item table is the slow
    part on CPU).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, items: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, items, negatives)
        return _gathered_scores(q, items, negatives)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, items, negatives = ctx.saved_tensors
        grad = grad.to(q.dtype).contiguous()
        dq = ditems = None
        if ctx.needs_input_grad[0]:
            dq = F.embedding_bag(negatives, items, per_sample_weights=grad, mode="sum")  # (N, D)
        if ctx.needs_input_grad[1]:
            flat = negatives.reshape(-1)
            small = items.shape[0] < 2**31 and flat.numel() < 2**31  # int32 sorts and divides 2x faster
            index_dtype = torch.int32 if small else torch.long
            key_dtype = torch.int16 if items.shape[0] <= 2**15 else index_dtype  # radix sort: 2 bytes, 2x faster again
            order = torch.sort(flat.to(key_dtype), stable=True).indices.to(index_dtype)  # (N R,) grouped by item
            offsets = torch.zeros(items.shape[0], dtype=index_dtype, device=q.device)
            torch.cumsum(torch.bincount(flat, minlength=items.shape[0])[:-1], 0, out=offsets[1:])
            positions = torch.div(order, negatives.shape[1], rounding_mode="floor")
            weights = grad.reshape(-1).index_select(0, order)  # (index_select: 5x faster than grad[order])
            ditems = F.embedding_bag(positions, q, offsets=offsets, per_sample_weights=weights, mode="sum")  # (I+1, D)
        return dq, ditems, None


def _gathered_scores(q: torch.Tensor, items: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    if (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and items.dtype == q.dtype
            and 0 < negatives.shape[1] <= len(items)):
        return _sampled_scores(q, items, negatives)
    # bf16 under autocast (sampled_addmm takes fp32/fp64 only); more draws per row than items (it refuses
    # those); GPUs (cuSPARSE's SDDMM is not documented for the repeated, unsorted columns of this pattern)
    return _gather_multiply_sum(q, items, negatives)


def _gather_multiply_sum(q: torch.Tensor, items: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    out = q.new_empty(negatives.shape)
    for s in range(0, len(q), GATHER_CHUNK):  # multiply-and-sum beats a batched matrix-vector bmm here
        e = s + GATHER_CHUNK
        torch.sum(F.embedding(negatives[s:e], items) * q[s:e, None, :], dim=-1, out=out[s:e])
    return out


def _sampled_scores(q: torch.Tensor, items: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """(N, R) dot products at the sampled (position, item) pairs: one sampled dense-dense matmul (SDDMM)
    over a CSR pattern with R entries per row (repeated items in a row are fine). 2.5x faster than the
    gather-multiply-sum loop on ML-1M shapes (13.8k x 128 pairs, D = 50: 17 against 41-45 ms, 2 threads)."""
    N, R = negatives.shape
    crow = torch.arange(0, N * R + 1, R, device=q.device, dtype=negatives.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR tensor support is in beta state"
        pattern = torch.sparse_csr_tensor(crow, negatives.reshape(-1), q.new_zeros(N * R), (N, items.shape[0]),
                                          check_invariants=False)  # zeros: beta = 0 still propagates NaN
        return torch.sparse.sampled_addmm(pattern, q, items.T, beta=0.0).values().view(N, R)


def negative_scores(q: torch.Tensor, items: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """(N, R) scores q[n] . items[negatives[n, r]] (``_NegativeScores`` under autograd)."""
    if torch.is_grad_enabled() and (q.requires_grad or items.requires_grad):
        return _NegativeScores.apply(q, items, negatives)
    return _gathered_scores(q, items, negatives)


class _CompiledSampledSoftmax(_GradientsInForward):
    """The compiled kernel's sampled softmax (genrec/models/kernels): loss and gradients in one pass per
    position (scores of the target and R hashed negatives, softmax, the query's gradient in registers, the
    item gradient into a per-thread table), like ``_FullSoftmax``. No (N, R) index or score tensor, no sort."""

    @staticmethod
    def forward(ctx, q, items, targets, num_negatives: int, temperature: float, seed: int, kernel):
        loss, dq, ditems = kernel.sampled_softmax(q.detach().contiguous(), items.detach().contiguous(),
                                                  targets.long().contiguous(), num_negatives, temperature, seed)
        ctx.save_for_backward(dq, ditems)
        return loss


COMPILED_ITEM_GRAD_BYTES = 2**28  # the compiled sampled softmax's per-thread item-gradient tables, at most


def _compiled_sampled_softmax(q: torch.Tensor, items: torch.Tensor, num_items: int, log_q):
    """The compiled extension when it can compute this sampled softmax (CPU float32, no log Q, D <= 128,
    per-thread item-gradient tables within COMPILED_ITEM_GRAD_BYTES), else None."""
    if (log_q is not None or not 1 <= q.shape[-1] <= 128 or items.shape[0] != num_items + 1 or num_items < 1
            or len(q) == 0 or not kernels.applies(q, items)):
        return None
    padded = (q.shape[-1] + 7) // 8 * 8
    if items.shape[0] * padded * 4 * torch.get_num_threads() > COMPILED_ITEM_GRAD_BYTES:
        return None
    return kernels.silu_attention()


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A seed for the compiled kernels' hashed random numbers, from ``generator`` or the global one."""
    return int(torch.randint(0, 2**62, (), generator=generator))


def sampled_softmax(q: torch.Tensor, targets: torch.Tensor, items: torch.Tensor, num_items: int,
                    num_negatives: int, temperature: float, log_q: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    N = len(q)
    if num_negatives >= 1 and (kernel := _compiled_sampled_softmax(q, items, num_items, log_q)) is not None:
        # negatives drawn by hash from a seed (kernel.hashed_negatives(N, R, num_items, seed) lists them)
        return _CompiledSampledSoftmax.apply(q, items, targets, num_negatives, temperature, draw_seed(generator),
                                             kernel)
    negatives = torch.randint(1, num_items + 1, (N, num_negatives), device=q.device, generator=generator)  # (N, R)
    pos = (q * F.embedding(targets, items)).sum(-1, keepdim=True)  # (N, 1)
    neg = negative_scores(q, items, negatives)  # (N, R)
    logits = torch.cat([pos, neg], dim=1) / temperature  # (N, 1 + R)
    if log_q is not None:
        logits = logits - torch.cat([log_q[targets][:, None], log_q[negatives]], dim=1)
    logits[:, 1:] = logits[:, 1:].masked_fill(negatives == targets[:, None], NEG_INF)  # accidental hits
    return F.cross_entropy(logits, torch.zeros(N, dtype=torch.long, device=q.device))


def in_batch(q: torch.Tensor, targets: torch.Tensor, items: torch.Tensor, temperature: float,
             log_q: torch.Tensor | None = None) -> torch.Tensor:
    cand = F.embedding(targets, items)  # (N, D) the batch's targets are the candidates
    logits = (q @ cand.T) / temperature  # (N, N)
    if log_q is not None:
        logits = logits - log_q[targets][None, :]
    same = targets[:, None] == targets[None, :]
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, NEG_INF)  # another copy of the target is not a negative
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


def bce(q: torch.Tensor, targets: torch.Tensor, items: torch.Tensor, num_items: int, temperature: float,
        generator: torch.Generator | None = None) -> torch.Tensor:
    negatives = torch.randint(1, num_items + 1, targets.shape, device=q.device, generator=generator)
    pos = (q * F.embedding(targets, items)).sum(-1) / temperature
    neg = (q * F.embedding(negatives, items)).sum(-1) / temperature
    hit = negatives == targets  # an accidental hit is not a negative
    loss_pos = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos), reduction="sum")
    loss_neg = F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="none")
    return (loss_pos + loss_neg.masked_fill(hit, 0).sum()) / max(1, len(q))


class Loss:
    """Binds a LossConfig to a scorer: ``loss(hidden, targets, item_table)``."""

    def __init__(self, cfg: LossConfig, num_items: int, item_counts: torch.Tensor | None = None):
        self.cfg, self.num_items = cfg, num_items
        self.scorer = Scorer(l2_norm=cfg.l2_norm)
        self.log_q = None
        if cfg.logq_correction and item_counts is not None:
            p = item_counts.float().clamp(min=1)
            self.log_q = torch.log(p / p.sum())

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, D), targets (B, L) with 0 where there is nothing to predict."""
        valid = targets > 0
        if not valid.any():  # e.g. an empty slice of the last batch on one DDP rank: zero loss, same graph
            return (hidden.sum() + item_table.sum()) * 0.0
        q = self.scorer.queries(hidden[valid])  # (N, D)
        t = targets[valid]  # (N,)
        items = self.scorer.items(item_table)  # (I + 1, D)
        c = self.cfg
        if c.name == "full_softmax":
            return full_softmax(q, t, items, c.temperature, c.chunk_size)
        if c.name == "sampled_softmax":
            # negatives are uniform: log Q is the same constant for every candidate, so the correction is a no-op
            return sampled_softmax(q, t, items, self.num_items, c.num_negatives, c.temperature)
        if c.name == "in_batch":
            log_q = self.log_q.to(q.device) if self.log_q is not None else None
            return in_batch(q, t, items, c.temperature, log_q)
        if c.name == "bce":
            return bce(q, t, items, self.num_items, c.temperature)
        raise ValueError(f"unknown loss {c.name!r}")
