"""Building blocks shared by the models: a fast CPU dropout, packed tokens, length groups.

``Dropout`` is ``nn.Dropout`` with a faster mask on CPU. PyTorch's CPU dropout draws one Bernoulli
sample per element (about 12 ns each here): on ML-1M it was 20 % of a SASRec step and 8 % of an
HSTU-large one. Here the mask comes from 63-bit integers drawn in bulk (``random_`` on int64, about
1 ns per 8 bytes), split into two 31-bit uniforms per integer and compared with ``p * 2^31``: the same
keep probability up to 2^-31, 3-4x faster. The mask is kept as bytes for the backward. When the compiled
kernels are built (genrec/models/kernels) the mask is instead a hash of a seed and each element's index
(16-bit uniforms: P(keep) = 1 - p to 2^-16), computed with the multiply in one pass and recomputed for
the backward: about 50x faster than the bulk integers again (0.26 against 14 ms for a (21,000 x 50)
tensor), no mask stored. On GPUs the fused native dropout is already fast and is used as is. All of them
draw from the global generator (the hashed one its seed), so ``torch.manual_seed`` and checkpointed RNG
state make runs reproducible as before.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from genrec.models import kernels

_UNIFORM_BITS = 31


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean mask with P(True) = 1 - p (to 2^-31), from bulk 63-bit random integers."""
    n = 1
    for s in shape:
        n *= int(s)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_()  # uniform on [0, 2^63)
    halves = bits.view(torch.int32)[:n]  # low half: 32 random bits; high half: 31 (top bit always 0)
    return (halves & ((1 << _UNIFORM_BITS) - 1)).ge_(round(p * (1 << _UNIFORM_BITS))).view(shape)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None, None


class _HashedDropout(torch.autograd.Function):
    """The compiled kernel's dropout: the mask is a hash of (seed, element index), so nothing is stored
    for the backward, which applies the same mask to the gradient (one call with the same seed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int, kernel) -> torch.Tensor:
        ctx.p, ctx.seed, ctx.kernel = p, seed, kernel
        return kernel.hashed_dropout(x, p, seed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # dropout is linear: its backward is itself (so twice differentiable)
        return _HashedDropout.apply(grad.contiguous(), ctx.p, ctx.seed, ctx.kernel), None, None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout`` semantics (zero with probability p, scale the rest by 1 / (1 - p))."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training=True)
    if x.is_contiguous() and kernels.applies(x) and (kernel := kernels.silu_attention()) is not None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # from the global generator: reproducible
        return _HashedDropout.apply(x, p, seed, kernel)
    return _MaskedScale.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p))


class _CompiledLayerNorm(torch.autograd.Function):
    """LayerNorm over the last dimension without affine parameters in one pass of the compiled kernel, or
    the gated u * LayerNorm(x) (HSTU's U * LN(O)); backward through aten's layer-norm backward with the
    kernel's mean and rstd (the gate's share: du = grad * xhat, the norm's input gradient from grad * u)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, u: torch.Tensor | None, eps: float, kernel) -> torch.Tensor:
        xhat, mean, rstd, *gated = kernel.layer_norm_train(x, u if u is not None else x.new_empty(0), eps)
        ctx.save_for_backward(x, mean, rstd, xhat if u is not None else None, u)
        return gated[0] if gated else xhat

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, mean, rstd, xhat, u = ctx.saved_tensors
        dxhat = grad if u is None else grad * u
        dx = torch.ops.aten.native_layer_norm_backward(dxhat, x, [x.shape[-1]], mean, rstd, None, None,
                                                       [True, False, False])[0]
        du = grad * xhat if u is not None and ctx.needs_input_grad[1] else None
        return dx, du, None, None


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm, gate: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(x)``, or ``gate * norm(x)``: through the compiled kernel (one pass, the gate included) when
    it applies (no affine parameters, plain CPU float32 (N, C) contiguous tensors, kernels built, not
    traced), else the module."""
    if (norm.elementwise_affine or x.dim() != 2 or not x.is_contiguous() or is_static() or not kernels.applies(x, gate)
            or (gate is not None and (gate.shape != x.shape or not gate.is_contiguous()))
            or (kernel := kernels.silu_attention()) is None):
        return norm(x) if gate is None else gate * norm(x)
    return _CompiledLayerNorm.apply(x, gate, norm.eps, kernel)


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


PACK_BELOW = 0.9  # pack the tokens when real ones are fewer than this share of the (B, L) grid

_STATIC = [False]


@contextlib.contextmanager
def static_shapes():
    """Inside: no data-dependent shapes (no packing, no length-sorted or jagged attention), so that
    ``torch.export`` can trace a model with dynamic batch and length. Same outputs at real positions;
    used by ``genrec export`` (genrec/infer/export.py)."""
    _STATIC[0] = True
    try:
        yield
    finally:
        _STATIC[0] = False


def is_static() -> bool:
    return _STATIC[0]


class _Pack(torch.autograd.Function):
    """``flat.index_select(0, index)`` for distinct indices: the backward copies the gradient back into
    place (index_copy) instead of autograd's accumulating scatter-add, which is several times slower."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = flat.shape[0]
        return flat.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, *grad.shape[1:]).index_copy_(0, index, grad), None


class Tokens:
    """The positions of a right-padded (B, L) batch that the per-token work runs on.

    When padding is a large share of the batch (random batches of mixed lengths), only the real tokens
    are kept, packed into (N, ...) rows: layer norms, projections, SiLU, dropout and the residual
    stream then cost what the real tokens need, and only attention goes back to the (B, L) layout.
    Otherwise (length-sorted batches) every position is kept and padding rows are zeroed by ``mask``;
    both give the same result at real positions.
    """

    def __init__(self, padding_mask: torch.Tensor):
        self.B, self.L = padding_mask.shape
        flat = padding_mask.reshape(-1)
        self.packed = not is_static() and int(flat.sum()) < PACK_BELOW * flat.numel()
        self.index = flat.nonzero().squeeze(1) if self.packed else None
        self.keep = None if self.packed else flat[:, None].to(torch.get_default_dtype())

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (N, ...)."""
        flat = t.reshape(self.B * self.L, *t.shape[2:])
        return _Pack.apply(flat, self.index) if self.packed else flat

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, L, ...), zeros at padding when packed."""
        if self.packed:
            t = t.new_zeros(self.B * self.L, *t.shape[1:]).index_copy(0, self.index, t)
        return t.reshape(self.B, self.L, *t.shape[1:])

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, position) of each of the N tokens."""
        if self.packed:
            return torch.div(self.index, self.L, rounding_mode="floor"), self.index % self.L
        grid = (self.B, self.L)  # no modulo by L: it exports to ONNX with a symbolic L
        return (torch.arange(self.B, device=self.keep.device)[:, None].expand(grid).reshape(-1),
                torch.arange(self.L, device=self.keep.device)[None, :].expand(grid).reshape(-1))

    def starts(self, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) index of each row's first token in the (N, ...) layout (its tokens follow it)."""
        if self.packed:
            return torch.cumsum(lengths, 0) - lengths
        return torch.arange(self.B, device=lengths.device) * self.L

    def last_index(self, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) index of each row's last real token in the (N, ...) layout (rows with >= 1 token)."""
        if self.packed:
            return torch.cumsum(lengths, 0) - 1
        return torch.arange(self.B, device=lengths.device) * self.L + lengths - 1

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        """Zero the padding tokens (nothing to do when packed)."""
        return t if self.packed else t * self.keep.to(t.dtype)


def check_length(L: int, max_len: int, what: str = "history") -> None:
    """Every model's input check: more positions than the model was built for is an error."""
    if L > max_len:
        raise ValueError(f"{what} length {L} exceeds model.max_len={max_len}")


class _PermuteRows(torch.autograd.Function):
    """``t[order]`` for a permutation: the backward is the inverse permutation, a gather too (autograd's
    default scatter-add for an index is 3x slower and starts from a zero-filled copy of ``t``)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return t.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(t: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``t[order]`` along dim 0 (``inverse = argsort(order)``), differentiable by a gather."""
    return _PermuteRows.apply(t, order, inverse)


def longest_first(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(lengths longest first, order): ``order`` sorts the rows, None when they already are longest first
    (evaluation batches, the Recommender's, and training batches from TrainLoader)."""
    if bool((lengths[:-1] >= lengths[1:]).all()):
        return lengths, None
    sorted_len, order = torch.sort(lengths, descending=True, stable=True)
    return sorted_len, order


def length_groups(lengths: torch.Tensor, group: int = 16) -> tuple[torch.Tensor | None, list[int], list[int]]:
    """(order, sizes, tops): the batch's rows longest first, cut into groups of ``group`` rows.

    ``order`` is as in ``longest_first``; ``sizes`` are the groups' row counts and ``tops`` their longest
    lengths. Attention over a group only needs its first ``top`` positions, so a random batch of mixed
    lengths costs about what its real tokens need."""
    sorted_len, order = longest_first(lengths)
    sizes = [min(group, len(lengths) - s) for s in range(0, len(lengths), group)]
    tops = [max(1, int(t)) for t in sorted_len[::group].tolist()]
    return order, sizes, tops


def in_length_groups(fn, seq: torch.Tensor, lengths: torch.Tensor, group: int = 16) -> torch.Tensor:
    """``fn`` over a right-padded (B, L, C) batch, a few rows at a time: the rows longest first, cut into
    groups of ``group`` rows, each group cut to its longest row. ``fn(part, part_lengths)`` maps a
    (b, m, C) group and its (b,) lengths to (b, m, C'); the result is (B, L, C') in the batch's row order,
    zero past each group's longest row. For work along each row (attention, a scan) on a random batch of
    mixed lengths: it then costs about what the real tokens need. One row permutation each way (indexing
    each group instead would zero-fill all of ``seq`` once per group in backward)."""
    L = seq.shape[1]
    lengths = lengths.clamp(min=1, max=L)
    order, sizes, tops = length_groups(lengths, group)
    if order is not None:
        inverse = torch.argsort(order)
        seq, lengths = permute_rows(seq, order, inverse), lengths.index_select(0, order)
    parts = [F.pad(fn(part[:, :m], n), (0, 0, 0, L - m))
             for part, n, m in zip(torch.split(seq, sizes), torch.split(lengths, sizes), tops)]
    y = torch.cat(parts) if len(parts) > 1 else parts[0]
    return permute_rows(y, inverse, order) if order is not None else y
