"""HSTU: hierarchical sequential transduction units.

Zhai et al., "Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers for
Generative Recommendations", ICML 2024. Defaults follow the research code that produced the paper's
public ML-1M / ML-20M / Books numbers (generative-recommenders, ``research/``):

    x0 = E[id] * sqrt(D) + P[t]; dropout; padding rows zero
    per layer:  X~ = LayerNorm(X)                       (no affine, eps 1e-6)
                U, V, Q, K = split(SiLU(X~ W_uvqk))      (no bias)
                A[h,i,j] = SiLU(Q_h[i].K_h[j] + rab_p(j - i) + rab_t(i, j)) / N   for j <= i, else 0
                Y = Linear(Dropout(U * LayerNorm(concat_h A_h V_h))) + X
    output:     L2-normalised

There is no feed-forward network and no 1/sqrt(d) in the reference. ``N`` is the padded length; here
it is the configured ``max_len`` so that a position's output never depends on how long the other rows
of its batch are. rab_p is a learned scalar per relative position; rab_t a learned scalar per
log-time bucket ``clamp(floor(ln(max(|t_{i+1} - t_j|, 1)) / 0.301), 0, 128)``, where ``t_{i+1}`` is the
time of the event predicted at position i (``Batch.query_time``). Both are per layer, shared by heads.

Switches for the variants the anchors disagree on (reference value first):
- ``silu``: "uvqk" (SiLU on U, V, Q and K) | "u" (SiLU on U only, newer production layer)
- ``attn_scale``: False | True (multiply Q.K by 1/sqrt(d_qk))
- ``attn_norm``: "max_len" (divide by N) | "visible" (by the number of keys each query sees; the
  TensorFlow port) | "batch_max" (by the batch's longest history; production layer)
- ``relative_bias``: "position_time" | "position" | "none" ("position_time" needs timestamps and falls
  back to position-only for batches without them)
- ``output``: "u_ln_o" (U * LN(O)) | "concat" (Linear([U, O, U * LN(O)]), production layer)
- ``ln_affine``: False | True (learnable LayerNorm scale and shift)
:meth:`HSTUConfig.production` returns the production preset.

Note on ``attn_norm``: every normaliser is one scalar per query row, and with ``output = "u_ln_o"`` the
attention output goes straight into a LayerNorm, which cancels any per-row scale (up to its eps). So
the normaliser changes the model only through ``ln_eps`` unless ``output = "concat"``, where O also
enters unnormalised. It still matters for numerics (bf16 range) and is kept as the reference wrote it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from genrec.data.batches import Batch
from genrec.models import kernels
from genrec.models.layers import Dropout, Tokens, check_length, is_static, layer_norm, longest_first, permute_rows


@dataclass
class HSTUConfig:
    dim: int = 50  # item embedding and residual stream size D
    num_blocks: int = 2
    num_heads: int = 1
    qk_dim: int = 50  # per-head query/key size (reference: dqk)
    v_dim: int = 50  # per-head value/U size (reference: dv)
    dropout: float = 0.2  # input (embedding) dropout
    linear_dropout: float = 0.2  # dropout before the output projection
    max_len: int = 200  # position table size and the attention normaliser N
    silu: str = "uvqk"  # uvqk | u
    attn_scale: bool = False  # multiply Q.K by 1/sqrt(qk_dim)
    attn_norm: str = "max_len"  # max_len | visible | batch_max
    relative_bias: str = "position_time"  # position_time | position | none
    output: str = "u_ln_o"  # u_ln_o | concat
    ln_affine: bool = False
    output_l2_norm: bool = True
    num_time_buckets: int = 128
    time_log_base: float = 0.301  # bucket width in ln-seconds (about ln 2 / 2.3: log10-spaced)
    ln_eps: float = 1e-6

    def validate(self) -> None:
        for key in ("dim", "num_blocks", "num_heads", "qk_dim", "v_dim", "max_len", "num_time_buckets"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.time_log_base <= 0:
            raise ValueError(f"model.time_log_base must be positive, got {self.time_log_base}")
        options = {"silu": ("uvqk", "u"), "attn_norm": ("max_len", "visible", "batch_max"),
                   "relative_bias": ("position_time", "position", "none"), "output": ("u_ln_o", "concat")}
        for key, allowed in options.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key} = {getattr(self, key)!r}; choose one of {', '.join(allowed)}")
        for key in ("dropout", "linear_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be in [0, 1)")

    @classmethod
    def production(cls, **overrides) -> "HSTUConfig":
        """The newer production HSTU layer (SiLU on U only, scaled scores, batch-max normaliser, concat output)."""
        return replace(cls(silu="u", attn_scale=True, attn_norm="batch_max", output="concat", ln_affine=True),
                       **overrides)


def time_buckets(query_time: torch.Tensor, key_time: torch.Tensor, num_buckets: int, base: float) -> torch.Tensor:
    """(B, L, L) bucket of |t_query[i] - t_key[j]|: clamp(floor(ln(max(|dt|, 1)) / base), 0, num_buckets)."""
    dt = (query_time[:, :, None] - key_time[:, None, :]).abs().clamp(min=1).float()  # (B, L, L)
    return (torch.log(dt) / base).floor().long().clamp(0, num_buckets)


class _GatherScalars(torch.autograd.Function):
    """``table[index]`` for a 1-D table, with a bincount backward.

    Autograd's default backward for this gather is an accumulating index_put, which serialises on CPU
    when millions of indices hit a few hundred slots (the time buckets); bincount is one fast pass.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.size = table.shape[0]
        return table[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        if grad.dim() > index.dim():  # broadcast dimensions in front (e.g. batch) are summed first
            grad = grad.sum(dim=tuple(range(grad.dim() - index.dim())))
        g = torch.bincount(index.reshape(-1), weights=grad.reshape(-1).float(), minlength=ctx.size)
        return g.to(grad.dtype), None


def gather_scalars(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and table.requires_grad):
        return table[index]  # inference: no autograd node
    return _GatherScalars.apply(table, index)


@functools.lru_cache(maxsize=64)
def _relative_index(L: int, max_len: int, device: torch.device) -> torch.Tensor:
    """(L, L) index of j - i into a (2 * max_len - 1) relative-position table (cached: every layer and call)."""
    idx = torch.arange(L, device=device)
    return (idx[None, :] - idx[:, None]) + max_len - 1


def toeplitz(table: torch.Tensor, L: int) -> torch.Tensor:
    """(L, L) ``table[j - i + M - 1]`` for a (2M - 1) relative-position table, M >= L, without an index:
    row i is the window of L entries starting at M - 1 - i, so the rows are the table's last-but-M windows
    in reverse order (one copy of L x L values; a gather reads an (L, L) index as well)."""
    M = (table.shape[0] + 1) // 2
    if L > M:
        raise ValueError(f"a relative-position table of {table.shape[0]} entries reaches {M} positions, not {L}")
    return table.unfold(0, L, 1)[M - L:M].flip(0)


@functools.lru_cache(maxsize=64)
def _lower_ones(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n, n) lower-triangular ones: the causal keep-mask of a diagonal block (cached, never written)."""
    return torch.ones(n, n, dtype=dtype, device=device).tril()


ATTENTION_BLOCK = 64  # query rows per block in causal_silu_attention (smaller: less of the diagonal blocks' upper half)
# score elements per tile (1 MiB in fp32): stays in cache. Without autograd too: 2^20 measured equal at
# 128 users per batch and 1.35x slower at 32 (HSTU-large, ML-1M histories, 2 threads)
ATTENTION_TILE = 1 << 18


def _tiles(BH: int, L: int, H: int, per_row: bool, block: int, tile: int, row_len: list[int] | None = None):
    """(r0, r1, q0, q1): (batch*head) rows [r0, r1) x query rows [q0, q1) of about ``tile`` scores each.

    With ``row_len`` (per (batch*head) row, longest first) a tile stops at its longest row's length:
    the padding beyond it is never computed."""
    rows = max(1, tile // (min(block, L) * L))
    if per_row:
        rows = max(H, rows - rows % H)  # whole batch rows, so each tile uses one slice of the bias
    for r0 in range(0, BH, rows):
        end = L if row_len is None else row_len[r0]
        for q0 in range(0, end, block):
            yield r0, min(BH, r0 + rows), q0, min(end, q0 + block)


def _scores(qf, kf, bias, r0: int, r1: int, q0: int, q1: int, H: int) -> torch.Tensor:
    """(rows, q1 - q0, q1) scores of query rows [q0, q1) against keys [0, q1), bias included."""
    qt, kt = qf[r0:r1, q0:q1], kf[r0:r1, :q1].transpose(1, 2)
    if bias is None:
        return torch.bmm(qt, kt)
    if bias.shape[0] == 1:
        b = bias[:, q0:q1, :q1]
    else:  # per batch row: one copy per head
        b = bias[r0 // H:r1 // H, q0:q1, :q1].repeat_interleave(H, dim=0)
    return torch.baddbmm(b, qt, kt)


def _mask_future(t: torch.Tensor, q0: int, q1: int, keep: torch.Tensor) -> torch.Tensor:
    """Zero the future keys of a (rows, q1 - q0, q1) tile in place: only its diagonal block has any.

    A multiply after SiLU rather than a large negative bias before it: SiLU and its backward run 2.5x
    slower on CPU when exp overflows, which a -1e9 bias would make it do on every masked score."""
    t[:, :, q0:q1] *= keep[:q1 - q0, :q1 - q0]
    return t


def _attention_forward(qf, kf, vf, bias, H: int, block: int, tile: int, row_len: list[int] | None) -> torch.Tensor:
    BH, L, _ = qf.shape
    out = (qf.new_empty if row_len is None else qf.new_zeros)(BH, L, vf.shape[-1])
    keep = _lower_ones(block, qf.dtype, qf.device)
    for r0, r1, q0, q1 in _tiles(BH, L, H, bias is not None and bias.shape[0] > 1, block, tile, row_len):
        weights = _mask_future(F.silu(_scores(qf, kf, bias, r0, r1, q0, q1, H)), q0, q1, keep)
        out[r0:r1, q0:q1] = torch.bmm(weights, vf[r0:r1, :q1])  # (bmm into a strided view would loop)
    return out


class _CausalSiluAttention(torch.autograd.Function):
    """Tiled pointwise attention that recomputes its scores in backward instead of saving them.

    Autograd would keep two (B, H, L, L) tensors per layer (the scores for SiLU's backward and the
    weights for the value matmul) and stream them through RAM twice more in backward. Here nothing of
    size L x L is saved: backward recomputes each tile's scores from q, k and the bias while the tile is
    in cache (the FlashAttention recipe, with SiLU in place of the softmax, so no row statistics are
    needed). qf, kf (B*H, L, dqk), vf (B*H, L, dv) contiguous (bmm on strided per-head views is 25 %
    slower than one transposing copy); bias (B or 1, L, L) or None. Output (B*H, L, dv).
    """

    @staticmethod
    def forward(ctx, qf, kf, vf, bias, H: int, block: int, tile: int, row_len: list[int] | None):
        ctx.save_for_backward(qf, kf, vf, bias)
        ctx.config = (H, block, tile, row_len)
        return _attention_forward(qf, kf, vf, bias, H, block, tile, row_len)

    @staticmethod
    def backward(ctx, grad):
        qf, kf, vf, bias = ctx.saved_tensors
        H, block, tile, row_len = ctx.config
        BH, L, _ = qf.shape
        grad = grad.contiguous()
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        dbias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[3] else None
        keep = _lower_ones(block, qf.dtype, qf.device)
        for r0, r1, q0, q1 in _tiles(BH, L, H, bias is not None and bias.shape[0] > 1, block, tile, row_len):
            qt, kt, vt = qf[r0:r1, q0:q1], kf[r0:r1, :q1], vf[r0:r1, :q1]
            scores = _scores(qf, kf, bias, r0, r1, q0, q1, H)  # (n, Tq, q1)
            g = grad[r0:r1, q0:q1]  # (n, Tq, dv)
            weights = _mask_future(F.silu(scores), q0, q1, keep)
            dv[r0:r1, :q1] += torch.bmm(weights.transpose(1, 2), g)  # (baddbmm_ into a strided view loops)
            dscores = torch.ops.aten.silu_backward(torch.bmm(g, vt.transpose(1, 2)), scores)
            dscores = _mask_future(dscores, q0, q1, keep)
            dq[r0:r1, q0:q1] = torch.bmm(dscores, kt)
            dk[r0:r1, :q1] += torch.bmm(dscores.transpose(1, 2), qt)
            if dbias is not None:
                if bias.shape[0] > 1:  # per batch row: sum its heads
                    dbias[r0 // H:r1 // H, q0:q1, :q1] += dscores.view(-1, H, q1 - q0, q1).sum(1)
                else:
                    dbias[0, q0:q1, :q1] += dscores.sum(0)
        return dq, dk, dv, dbias, None, None, None, None


def _kernel_args(q, k, v, bias):
    """q, k, v (last dimension contiguous; views of one projection stay views) and the bias (contiguous, or
    an empty tensor) as the compiled kernels take them, outside autograd."""
    qkv = (t.detach() if t.stride(-1) == 1 else t.detach().contiguous() for t in (q, k, v))
    return (*qkv, bias.detach().contiguous() if bias is not None else q.new_empty(0))


class _CompiledSiluAttention(torch.autograd.Function):
    """The compiled kernels' forward and backward (CPU, float32) on views of the projection, in the (B, L, H, d)
    grid or packed (N, H, d) with ``starts``: no layout copies, no row permutation; backward recomputes the
    scores in registers as the forward does (nothing of size L x L is saved or written). Outputs and
    gradients at padding positions are zero."""

    @staticmethod
    def forward(ctx, q, k, v, bias, lengths, starts, kernel, scale):
        args = _kernel_args(q, k, v, bias)
        ctx.save_for_backward(*args, lengths, starts)
        ctx.kernel, ctx.has_bias, ctx.scale = kernel, bias is not None, scale
        return kernel.causal_silu_attention(*args, lengths, starts, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, bias, lengths, starts = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        dq, dk, dv, dbias = ctx.kernel.causal_silu_attention_backward(
            q, k, v, bias, lengths, starts, grad, ctx.has_bias and ctx.needs_input_grad[3], ctx.scale)
        return dq, dk, dv, dbias if dbias.numel() else None, None, None, None, None


class _CompiledSiluSplitAttention(torch.autograd.Function):
    """The training layer's middle from the raw projection, for SiLU on U, V, Q and K: ``(U, O)`` with
    U, V, Q, K = split(SiLU(raw)) and O = causal_silu_attention(Q, K, V, bias) * scale, packed tokens.

    What it saves over composing SiLU, split and ``_CompiledSiluAttention``: backward writes dU and the
    attention kernel's dV, dQ, dK straight into the column slices of one (N, W) gradient and applies SiLU'
    over it in place, instead of a concatenation of four gradients and a separate ``silu_backward``
    allocating another (N, W). A bf16 projection (bf16 autocast) goes, where the CPU has AVX512-BF16, to the
    bf16 dot-product kernels (``silu_attention_bf16``: SiLU applied as they read the projection, products
    on bf16 operands with float32 sums as a bf16 matmul's, the bf16 gradient written by the kernel);
    elsewhere it is made float32 for SiLU and the float32 kernels and gets a bf16 gradient. raw (N, W)
    contiguous, columns U | V | Q | K, heads adjacent within each; returns U (N, H*dv) and O (N, H*dv),
    float32.
    """

    @staticmethod
    def forward(ctx, raw, bias, lengths, starts, kernel, H: int, dqk: int, dv: int, scale: float):
        ctx.config = (kernel, H, dqk, dv, scale, bias is not None)
        bias_arg = bias.detach().contiguous() if bias is not None else raw.new_empty(0, dtype=torch.float32)
        if raw.dtype == torch.bfloat16 and kernel.has_bf16_attention():  # bf16 dot products, SiLU inside
            ctx.save_for_backward(raw, None, bias_arg, lengths, starts)
            u, o = kernel.silu_attention_bf16(raw, bias_arg, lengths, starts, H, dqk, dv, scale)
            return u, o
        y = F.silu(raw) if raw.dtype == torch.float32 else F.silu(raw.float(), inplace=True)  # (N, W) float32
        N = y.shape[0]
        u, v, q, k = torch.split(y, [H * dv, H * dv, H * dqk, H * dqk], dim=-1)
        args = (q.view(N, H, dqk), k.view(N, H, dqk), v.view(N, H, dv), bias_arg)
        ctx.save_for_backward(raw, y, bias_arg, lengths, starts)
        return u, kernel.causal_silu_attention(*args, lengths, starts, scale).view(N, H * dv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, du, do):
        raw, y, bias, lengths, starts = ctx.saved_tensors
        kernel, H, dqk, dv, scale, has_bias = ctx.config
        want_dbias = has_bias and ctx.needs_input_grad[1]
        if y is None:
            return _bf16_split_attention_backward(ctx, raw, bias, lengths, starts, du, do, want_dbias)
        N, W = y.shape
        grad = y.new_empty(N, W)  # (N, W): dU | dV | dQ | dK before SiLU'
        gu, gv, gq, gk = torch.split(grad, [H * dv, H * dv, H * dqk, H * dqk], dim=-1)
        if du is None:
            gu.zero_()
        else:
            gu.copy_(du)
        _, v, q, k = torch.split(y, [H * dv, H * dv, H * dqk, H * dqk], dim=-1)
        if do is None:
            grad[:, H * dv:].zero_()
            dbias = torch.zeros_like(bias) if want_dbias else None
        else:
            do = do if do.stride(-1) == 1 else do.contiguous()
            *_, dbias = kernel.causal_silu_attention_backward(
                q.view(N, H, dqk), k.view(N, H, dqk), v.view(N, H, dv), bias, lengths, starts, do.view(N, H, dv),
                want_dbias, scale, [gq.view(N, H, dqk), gk.view(N, H, dqk), gv.view(N, H, dv)])
        draw = kernel.silu_backward_(grad, raw).to(raw.dtype)  # SiLU' in place (bf16 raw: then rounded to bf16)
        return draw, (dbias if want_dbias and dbias.numel() else None), None, None, None, None, None, None, None


def _bf16_split_attention_backward(ctx, raw, bias, lengths, starts, du, do, want_dbias):
    """``_CompiledSiluSplitAttention``'s backward on the bf16 dot-product kernels: dU, dV, dQ, dK times SiLU',
    written as bf16 straight into the projection's gradient."""
    kernel, H, dqk, dv, scale, _ = ctx.config
    draw = torch.empty_like(raw)  # (N, W) bf16
    du = du.contiguous() if du is not None else raw.new_empty(0, dtype=torch.float32)
    do = do.contiguous() if do is not None else torch.zeros(raw.shape[0], H * dv)
    dbias = kernel.silu_attention_bf16_backward(raw, bias, lengths, starts, du, do, want_dbias, scale, draw, H, dqk, dv)
    return draw, (dbias if want_dbias and dbias.numel() else None), None, None, None, None, None, None, None


def compiled_silu_attention(q, k, v, bias, lengths, starts=None, scale: float = 1.0):
    """The compiled kernels' causal SiLU attention, or None when they do not apply (not CPU float32, not
    built, forward-mode AD): (B, L, H, d) inputs, or packed (N, H, d) tokens with ``starts`` (B,), the
    first token of each row (then returns (N, H, dv)); the output times ``scale``, which costs nothing
    there. Differentiable (``_CompiledSiluAttention``)."""
    if not kernels.applies(q, k, v, bias) or (kernel := kernels.silu_attention()) is None:
        return None
    if lengths is None:
        lengths = torch.full((q.shape[0],), q.shape[1], dtype=torch.long)
    starts = starts if starts is not None else lengths.new_empty(0)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias)):
        return _CompiledSiluAttention.apply(q, k, v, bias, lengths, starts, kernel, scale)
    with torch.no_grad():
        return kernel.causal_silu_attention(*_kernel_args(q, k, v, bias), lengths, starts, scale)


def causal_silu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                          lengths: torch.Tensor | None = None, block: int = ATTENTION_BLOCK,
                          tile: int | None = None) -> torch.Tensor:
    """O[b,i,h] = sum_{j<=i} SiLU(q[b,i,h].k[b,j,h] + bias[b,i,j]) v[b,j,h], tile by tile.

    The pointwise attention is memory-bound on CPU: every pass over a full (B, H, L, L) score tensor
    streams it through RAM. The work is cut into tiles of about ``tile`` scores, a few (batch, head)
    rows times one block of ``block`` query rows, whose matmul -> SiLU -> matmul chain stays in cache;
    under autograd, backward recomputes the tiles (``_CausalSiluAttention``) rather than saving any
    L x L tensor. Query block [q0, q1) only scores keys [0, q1): the upper triangle right of the
    diagonal blocks is never computed, and the future keys inside the diagonal block are zeroed after
    SiLU (exactly 0, in forward and backward). The bias is folded into the score matmul (baddbmm).
    With ``lengths`` (B,) the rows are processed longest first and each tile stops at its longest
    row's length, so a batch of mixed lengths costs about what its real tokens need (jagged attention
    without changing the batch); outputs at padding positions are then unspecified (finite).
    On CPU in float32 the compiled register-blocked kernels of genrec/models/kernels compute it when they
    build (``GENREC_KERNELS``), forward and backward (``_CompiledSiluAttention``): the same function, the
    forward 2-3x and forward + backward about 2.7x faster than the tiles; outputs and gradients at padding
    positions are then zero.
    q, k: (B, L, H, dqk); v: (B, L, H, dv) (views of one projection are fine); bias: (B or 1, L, L) or
    None. Returns (B, L, H, dv).
    """
    B, L, H, dqk = q.shape
    dv = v.shape[-1]
    if bias is not None:
        bias = bias.to(q.dtype)
    if is_static():
        return _dense_silu_attention(q, k, v, bias)
    if (out := compiled_silu_attention(q, k, v, bias, lengths)) is not None:
        return out
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias))
    row_len = order = None
    if lengths is not None and B > 1:
        sorted_len, order = longest_first(lengths.clamp(min=1, max=L))
        row_len = sorted_len.repeat_interleave(H).tolist()
        if order is not None:
            inverse = torch.argsort(order)
            q, k, v = (permute_rows(t, order, inverse) for t in (q, k, v))
            if bias is not None and bias.shape[0] > 1:
                bias = permute_rows(bias, order, inverse)
    qf, kf, vf = (t.transpose(1, 2).reshape(B * H, L, t.shape[-1]) for t in (q, k, v))  # (B*H, L, d)
    if needs_grad:
        out = _CausalSiluAttention.apply(qf, kf, vf, bias, H, block, tile or ATTENTION_TILE, row_len)
    else:
        out = _attention_forward(qf, kf, vf, bias, H, block, tile or ATTENTION_TILE, row_len)
    out = out.view(B, H, L, dv)
    if order is not None:
        out = permute_rows(out, inverse, order)
    return out.transpose(1, 2)  # (B, L, H, dv)


def _dense_silu_attention(q, k, v, bias) -> torch.Tensor:
    """The same function on full (B, H, L, L) scores: no loop over tiles, no data-dependent shapes
    (the traceable path for ``torch.export``; slower)."""
    L = q.shape[1]
    scores = torch.einsum("bihd,bjhd->bhij", q, k)
    if bias is not None:
        scores = scores + bias[:, None]
    weights = F.silu(scores) * torch.ones(L, L, dtype=q.dtype, device=q.device).tril()
    return torch.einsum("bhij,bjhd->bihd", weights, v)


class RelativeBias(nn.Module):
    """rab_p(j - i) + rab_t(bucket(t_{i+1} - t_j)): learned scalars shared by the heads of one layer."""

    def __init__(self, max_len: int, use_time: bool, num_buckets: int, base: float):
        super().__init__()
        self.max_len = max_len
        self.position = nn.Parameter(torch.empty(2 * max_len - 1).normal_(std=0.02))
        self.time = nn.Parameter(torch.empty(num_buckets + 1).normal_(std=0.02)) if use_time else None
        self.num_buckets, self.base = num_buckets, base

    def forward(self, L: int, buckets: torch.Tensor | None) -> torch.Tensor:
        if is_static():  # traced with a symbolic L: no cache keyed on it
            idx = torch.arange(L, device=self.position.device)
            bias = self.position[idx[None, :] - idx[:, None] + self.max_len - 1][None]
        elif not (torch.is_grad_enabled() and self.position.requires_grad):
            bias = toeplitz(self.position, L)[None]  # inference: no index tensor (an 8th of a request's time)
        else:
            bias = gather_scalars(self.position, _relative_index(L, self.max_len, self.position.device))[None]
        if self.time is not None and buckets is not None:
            bias = bias + gather_scalars(self.time, buckets)  # (B, L, L)
        return bias


class HSTULayer(nn.Module):
    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.cfg = cfg
        H, dqk, dv = cfg.num_heads, cfg.qk_dim, cfg.v_dim
        self.uvqk = nn.Parameter(torch.empty(cfg.dim, 2 * H * dv + 2 * H * dqk).normal_(std=0.02))  # no bias
        self.rab = (RelativeBias(cfg.max_len, cfg.relative_bias == "position_time", cfg.num_time_buckets,
                                 cfg.time_log_base) if cfg.relative_bias != "none" else None)
        self.in_norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps, elementwise_affine=cfg.ln_affine)
        self.attn_norm = nn.LayerNorm(H * dv, eps=cfg.ln_eps, elementwise_affine=cfg.ln_affine)
        self.dropout = Dropout(cfg.linear_dropout)
        self.out = nn.Linear(H * dv * (3 if cfg.output == "concat" else 1), cfg.dim)
        nn.init.xavier_uniform_(self.out.weight)

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens x (N, D) -> U, V (N, H*dv), Q (scaled as configured), K (N, H*dqk), SiLU as configured.

        The per-token half of the layer as the cached and candidate paths (genrec/infer) run it; ``forward``
        and ``forward_last`` inline it to unpack or gather the projection before splitting it."""
        cfg = self.cfg
        H, dqk, dv = cfg.num_heads, cfg.qk_dim, cfg.v_dim
        uvqk = self.in_norm(x) @ self.uvqk
        if cfg.silu == "uvqk":
            uvqk = F.silu(uvqk, inplace=not torch.is_grad_enabled())  # in place when nothing needs it
        u, v, q, k = torch.split(uvqk, [H * dv, H * dv, H * dqk, H * dqk], dim=-1)
        if cfg.silu == "u":
            u = F.silu(u)
        return u, v, (q * (1.0 / math.sqrt(dqk)) if cfg.attn_scale else q), k

    def output(self, u: torch.Tensor, o: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """U and the normalised attention output O (N, H*dv) -> the layer's output Linear(U * LN(O)) + x (or the
        ``concat`` variant's Linear([U, O, U * LN(O)]) + x)."""
        if self.cfg.output == "concat":
            o = torch.cat([u, o, layer_norm(o, self.attn_norm, gate=u)], dim=-1)  # (N, 3*H*dv)
        else:
            o = layer_norm(o, self.attn_norm, gate=u)  # (N, H*dv)
        return residual + self.out(self.dropout(o))

    def forward(self, x: torch.Tensor, tokens: Tokens, lengths: torch.Tensor,
                buckets: torch.Tensor | None) -> torch.Tensor:
        """x (N, D): the batch's tokens (``tokens.pack`` layout) -> (N, D)."""
        cfg = self.cfg
        B, L = tokens.B, tokens.L
        H, dqk, dv = cfg.num_heads, cfg.qk_dim, cfg.v_dim
        kernel = self._fused_kernel(x)  # inference, reference options: compiled norm, then SiLU -> attention -> gate
        uvqk = (kernel.layer_norm(x, cfg.ln_eps) if kernel is not None else layer_norm(x, self.in_norm)) @ self.uvqk
        if kernel is not None:
            return self.out(self.dropout(self._fused_middle(kernel, uvqk, tokens, lengths, buckets, False))) + x
        if (middle := self._silu_split_attention(uvqk, x, tokens, lengths, buckets)) is not None:
            return self.output(*middle, x)
        uvqk = self._kernel_dtype(uvqk, x)
        if cfg.silu == "uvqk":
            uvqk = F.silu(uvqk, inplace=not torch.is_grad_enabled())  # in place when nothing needs it
        # one split for all four: its backward is one concatenation of their gradients (a separate slice
        # for U would add a zero-filled (N, W) gradient and a sum of the two in backward)
        u, v, q, k = torch.split(uvqk, [H * dv, H * dv, H * dqk, H * dqk], dim=-1)
        if cfg.silu == "u":
            u = F.silu(u)
        bias = self.rab(L, buckets) if self.rab is not None else None  # (B or 1, L, L)
        if (o := self._compiled_attention(v, q, k, tokens, lengths, bias)) is not None:
            return self.output(u, o, x)
        # attention needs the (B, L) layout: V, Q and K go back to padded rows in one copy
        v, q, k = torch.split(tokens.unpack(uvqk[:, H * dv:]), [H * dv, H * dqk, H * dqk], dim=-1)
        q, k, v = q.view(B, L, H, dqk), k.view(B, L, H, dqk), v.view(B, L, H, dv)  # strided views

        if cfg.attn_scale:
            q = q * (1.0 / math.sqrt(dqk))
        # Dividing the (B, L, H, dv) output instead of the (B, H, L, L) weights: same result, less work.
        o = causal_silu_attention(q, k, v, bias, lengths) / self.normaliser(L, lengths, x.device)  # (B, L, H, dv)
        o = tokens.pack(o.reshape(B, L, H * dv))  # (N, H*dv)
        return self.output(u, o, x)

    def _silu_split_attention(self, uvqk: torch.Tensor, x: torch.Tensor, tokens: Tokens, lengths: torch.Tensor,
                              buckets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """U and the normalised attention output, (N, H*dv) each, from the raw projection (float32, or bf16 under
        autocast) through ``_CompiledSiluSplitAttention``; None when it does not apply: SiLU on U only or scaled
        queries (``_compiled_attention`` then), or the compiled kernels cannot run (not CPU, not built, tracing)."""
        cfg = self.cfg
        if (cfg.silu != "uvqk" or cfg.attn_scale or is_static() or not kernels.applies(x) or uvqk.device.type != "cpu"
                or uvqk.dtype not in (torch.float32, torch.bfloat16) or not uvqk.is_contiguous()):
            return None
        if (kernel := kernels.silu_attention()) is None:
            return None
        bias = self.rab(tokens.L, buckets) if self.rab is not None else None  # (B or 1, L, L)
        scale, per_token = self._kernel_normaliser(tokens, lengths, x.device)
        u, o = _CompiledSiluSplitAttention.apply(uvqk, bias, lengths, tokens.starts(lengths), kernel, cfg.num_heads,
                                                 cfg.qk_dim, cfg.v_dim, scale)
        return u, (o if per_token is None else o / per_token)

    def _kernel_normaliser(self, tokens: Tokens, lengths: torch.Tensor,
                           device: torch.device) -> tuple[float, torch.Tensor | None]:
        """The attention normaliser as the compiled kernels take it: (1 / n, None) when it is one number (folded
        into their output and gradient scale), else (1.0, (N, 1) count per token) to divide their output by."""
        norm = self.normaliser(tokens.L, lengths, device)
        if isinstance(norm, torch.Tensor) and norm.dim() == 4:  # visible: one count per query position
            return 1.0, tokens.pack(norm.expand(tokens.B, tokens.L, 1, 1)).view(-1, 1)
        return 1.0 / float(norm), None

    @staticmethod
    def _kernel_dtype(uvqk: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The projection back in the residual stream's float32 when bf16 autocast made it bf16 and the
        compiled kernels can run the rest of the layer: the matmuls then run on the bf16 units (3-4x the
        fp32 rate on such CPUs) while SiLU, attention, norm, gate and dropout stay float32 kernels (under
        plain autocast they would take the stock bf16 path, several times slower here)."""
        if uvqk.dtype == x.dtype or not kernels.applies(x) or kernels.silu_attention() is None:
            return uvqk
        return uvqk.to(x.dtype)

    def _compiled_attention(self, v: torch.Tensor, q: torch.Tensor, k: torch.Tensor, tokens: Tokens,
                            lengths: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The normalised attention output (N, H*dv) straight from the packed projection's V, Q and K (after
        SiLU) through the compiled kernels (training included), or None when they do not apply. No
        unpacking to the (B, L) grid and back: the kernels read each row's tokens where they are."""
        cfg = self.cfg
        H, dqk, dv = cfg.num_heads, cfg.qk_dim, cfg.v_dim
        if is_static() or not kernels.applies(v) or kernels.silu_attention() is None:  # CPU float32, built
            return None
        if cfg.attn_scale:
            q = q * (1.0 / math.sqrt(dqk))
        N = v.shape[0]
        scale, per_token = self._kernel_normaliser(tokens, lengths, v.device)
        o = compiled_silu_attention(q.view(N, H, dqk), k.view(N, H, dqk), v.view(N, H, dv), bias, lengths,
                                    tokens.starts(lengths), scale)  # (N, H, dv)
        if o is None:
            return None
        o = o.view(N, H * dv)
        return o if per_token is None else o / per_token

    def _fused_kernel(self, x: torch.Tensor):
        """The compiled extension when it can run this layer's input norm (``layer_norm``) and middle
        (``hstu_attention_gate``): no autograd, the reference layer's options (SiLU on U, V, Q, K; norms
        without affine; output U * LN(O); one normaliser per batch), plain CPU float32; else None."""
        cfg = self.cfg
        if (torch.is_grad_enabled() or is_static() or cfg.silu != "uvqk" or cfg.output != "u_ln_o"
                or cfg.ln_affine or cfg.attn_norm == "visible" or not x.is_contiguous()
                or not kernels.applies(x)):
            return None
        return kernels.silu_attention()

    def _fused_middle(self, kernel, uvqk: torch.Tensor, tokens: Tokens, lengths: torch.Tensor,
                      buckets: torch.Tensor | None, last_only: bool) -> torch.Tensor:
        """SiLU(U) * LN(attention / N) from the raw projection (N, W) through the kernel: (N, H*dv), or
        (B, H*dv) at each row's last token with ``last_only``."""
        cfg = self.cfg
        return kernel.hstu_attention_gate(
            uvqk, tokens.starts(lengths), lengths, self._gate_bias(uvqk, tokens.L, buckets), cfg.num_heads,
            cfg.qk_dim, cfg.v_dim, *self._gate_scales(tokens.L, lengths, uvqk.device), cfg.ln_eps, last_only)

    def _gate_bias(self, like: torch.Tensor, L: int, buckets: torch.Tensor | None) -> torch.Tensor:
        """The bias the compiled gate takes: none (an empty tensor), the (2 max_len - 1) position table itself
        (the kernel reads j - i from it), or with time buckets the (B, L, L) sum."""
        if self.rab is None:
            return like.new_empty(0)
        if self.rab.time is None or buckets is None:
            return self.rab.position.detach()
        return self.rab(L, buckets).contiguous()

    def _gate_scales(self, L: int, lengths: torch.Tensor, device: torch.device) -> tuple[float, float]:
        """(q_scale, inv_norm) of the compiled gate: Q's factor and 1 / the attention normaliser."""
        cfg = self.cfg
        return (1.0 / math.sqrt(cfg.qk_dim) if cfg.attn_scale else 1.0,
                1.0 / float(self.normaliser(L, lengths, device)))

    def forward_last(self, x: torch.Tensor, tokens: Tokens, lengths: torch.Tensor,
                     buckets: torch.Tensor | None) -> torch.Tensor:
        """The layer's output at each row's last real token only, (B, D): what next-item prediction needs
        from the final layer. Keys and values still come from every token, in the packed layout (no
        padded buffer); the one query per user replaces the (L x L) attention and the work after it."""
        cfg = self.cfg
        B, L = tokens.B, tokens.L
        H, dqk, dv = cfg.num_heads, cfg.qk_dim, cfg.v_dim
        kernel = self._fused_kernel(x)
        uvqk = (kernel.layer_norm(x, cfg.ln_eps) if kernel is not None else layer_norm(x, self.in_norm)) @ self.uvqk
        last = tokens.last_index(lengths)  # (B,) token index of each row's last event
        if kernel is not None:  # the fused middle with one query per row
            return self.out(self.dropout(self._fused_middle(kernel, uvqk, tokens, lengths, buckets, True))) + x[last]
        if cfg.silu == "uvqk":
            uvqk = F.silu(uvqk, inplace=not torch.is_grad_enabled())  # in place when nothing needs it
        u, q = uvqk[last, :H * dv], uvqk[last, 2 * H * dv:2 * H * dv + H * dqk]  # (B, H*dv), (B, H*dqk)
        if cfg.silu == "u":
            u = F.silu(u)
        v = uvqk[:, H * dv:2 * H * dv].reshape(-1, H, dv)  # (N, H, dv)
        k = uvqk[:, 2 * H * dv + H * dqk:].reshape(-1, H, dqk)  # (N, H, dqk)
        q = q.view(B, H, dqk) * ((1.0 / math.sqrt(dqk)) if cfg.attn_scale else 1.0)
        row, col = tokens.positions()  # (N,) batch row and position of every token
        query_pos = (lengths - 1)[row]  # (N,) position of the row's last event
        scores = (q[row] * k).sum(-1)  # (N, H)
        if self.rab is not None:
            bias = self.rab.position[col - query_pos + cfg.max_len - 1]  # j - i
            if self.rab.time is not None and buckets is not None:
                bias = bias + self.rab.time[buckets[row, query_pos, col]]
            scores = scores + bias[:, None]
        weights = F.silu(scores) * (col <= query_pos)[:, None]  # padding tokens (unpacked layout) drop out
        o = x.new_zeros(B, H, dv).index_add_(0, row, weights[..., None] * v).reshape(B, H * dv)
        if cfg.attn_norm == "visible":
            o = o / lengths[:, None].to(o.dtype)
        else:
            o = o / self.normaliser(L, lengths, x.device)
        return self.output(u, o, x[last])

    def normaliser(self, L: int, lengths: torch.Tensor, device: torch.device) -> torch.Tensor | float:
        if self.cfg.attn_norm == "max_len":
            return float(self.cfg.max_len)
        if self.cfg.attn_norm == "batch_max":
            return lengths.max().clamp(min=1).to(torch.float32)
        # visible: query i sees keys 0..i -> i + 1 keys
        return torch.arange(1, L + 1, device=device, dtype=torch.float32)[None, :, None, None]  # (1, L, 1, 1)


class HSTU(nn.Module):
    def __init__(self, cfg: HSTUConfig, num_items: int):
        super().__init__()
        self.cfg = cfg
        self.item_embedding = nn.Embedding(num_items + 1, cfg.dim, padding_idx=0)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.dim)
        self.dropout = Dropout(cfg.dropout)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.num_blocks))
        self.grad_checkpointing = False  # set by the trainer (train.grad_checkpointing)
        # initialisation as in the reference: item embeddings truncated normal (std 0.02); the position
        # table ends up Xavier-normal (the reference model re-initialises every non-HSTU, non-embedding
        # matrix that way); inside the layers W_uvqk and the relative biases are normal(0.02), the output
        # projection Xavier-uniform.
        nn.init.trunc_normal_(self.item_embedding.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.xavier_normal_(self.position_embedding.weight)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def _inputs(self, batch: Batch) -> tuple[Tokens, torch.Tensor, torch.Tensor | None]:
        """(tokens, x (N, D) embedded and dropped out, time buckets (B, L, L) or None)."""
        L = batch.items.shape[1]
        check_length(L, self.cfg.max_len)
        tokens = Tokens(batch.padding_mask)
        x = self.item_embedding(batch.items) * math.sqrt(self.cfg.dim)  # (B, L, D)
        x = tokens.pack(x + self.position_embedding(torch.arange(L, device=x.device))[None])  # (N, D)
        x = tokens.mask(self.dropout(x))
        buckets = None
        if self.cfg.relative_bias == "position_time" and batch.timestamps is not None:
            query_time = batch.query_time if batch.query_time is not None else batch.timestamps
            buckets = time_buckets(query_time, batch.timestamps, self.cfg.num_time_buckets, self.cfg.time_log_base)
        return tokens, x, buckets

    def forward(self, batch: Batch) -> torch.Tensor:
        tokens, x, buckets = self._inputs(batch)
        for layer in self.layers:
            if self.grad_checkpointing and self.training:  # recompute the layer in backward: O(L) memory per layer
                x = tokens.mask(checkpoint(layer, x, tokens, batch.lengths, buckets, use_reentrant=False))
            else:
                x = tokens.mask(layer(x, tokens, batch.lengths, buckets))
        if self.cfg.output_l2_norm:
            x = F.normalize(x, dim=-1, eps=1e-6)
        return tokens.unpack(x)  # (B, L, D), zero at padding

    def next_item_queries(self, batch: Batch) -> torch.Tensor:
        """(B, D): ``forward(batch)`` at each row's last event, computing only that row in the final layer
        (evaluation and recommendation need nothing else; 1 / num_blocks of the attention saved)."""
        if not is_static() and int(batch.lengths.min()) < 1:
            raise ValueError("next_item_queries needs at least one event per history")
        tokens, x, buckets = self._inputs(batch)
        if (kernel := self._stack_kernel(x, buckets)) is not None:  # the whole stack in one compiled call
            cfg = self.cfg
            x = kernel.hstu_next_item_queries(
                x, [layer.uvqk.detach() for layer in self.layers], [layer.out.weight.detach() for layer in self.layers],
                [layer.out.bias.detach() for layer in self.layers],
                [layer._gate_bias(x, tokens.L, None) for layer in self.layers], tokens.starts(batch.lengths),
                batch.lengths, cfg.num_heads, cfg.qk_dim, cfg.v_dim,
                *self.layers[0]._gate_scales(tokens.L, batch.lengths, x.device), cfg.ln_eps)
            return F.normalize(x, dim=-1, eps=1e-6) if cfg.output_l2_norm else x
        for layer in self.layers[:-1]:
            x = tokens.mask(layer(x, tokens, batch.lengths, buckets))
        x = self.layers[-1].forward_last(x, tokens, batch.lengths, buckets)  # (B, D)
        return F.normalize(x, dim=-1, eps=1e-6) if self.cfg.output_l2_norm else x

    def _stack_kernel(self, x: torch.Tensor, buckets: torch.Tensor | None):
        """The compiled extension when it can run every layer of ``next_item_queries`` at once: the fused
        layer applies (see ``HSTULayer._fused_kernel``), the layers' dropout in evaluation mode (the input
        dropout runs before, in ``_inputs``), an output Linear with a bias, and no time buckets (the position
        table is the only bias it takes); else None."""
        if buckets is not None or any(layer.dropout.training or layer.out.bias is None for layer in self.layers):
            return None
        return self.layers[0]._fused_kernel(x)

    def compiled_inference(self) -> bool:
        """Whether ``next_item_queries`` runs as one compiled call on this machine for every request: not
        for a time-bias model, whose requests with timestamps go layer by layer."""
        if self.cfg.relative_bias == "position_time":
            return False
        with torch.no_grad():
            return self._stack_kernel(self.item_embedding.weight.detach(), None) is not None

    def item_vectors(self) -> torch.Tensor:
        """(num_items + 1, D) table the hidden states are scored against (row 0 = padding)."""
        return self.item_embedding.weight
