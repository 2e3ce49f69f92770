"""Mamba4Rec with a Mamba-2 (state-space duality) layer, in plain PyTorch.

Liu et al., "Mamba4Rec: Towards Efficient Sequential Recommendation with Selective State Space Models",
2024 (embedding -> dropout -> LayerNorm; per block a Mamba layer and a feed-forward network, each with
dropout, a residual and a post-LayerNorm; no position embedding). The Mamba layer is Mamba-2's (Dao &
Gu, "Transformers are SSMs", ICML 2024):

    z, xBC, dt = split(in_proj(x))
    xBC = SiLU(causal depthwise conv1d(xBC)); x, B, C = split(xBC)
    dt = softplus(dt + dt_bias); A = -exp(A_log)                      (one scalar decay per head)
    per head h:  S_t = exp(dt_t A_h) S_{t-1} + B_t (dt_t x_t)^T,  y_t = S_t^T C_t + D_h x_t
    out = out_proj(RMSNorm(y * SiLU(z)))

The recurrence is evaluated by ``ssd_scan`` in chunks of ``chunk_size`` steps: inside a chunk as a
masked, decay-weighted attention-like product (matmuls), across chunks by carrying the (N x P) state
per head; ``ssd_recurrence`` is the step-by-step definition the tests compare it with. With the
``mamba-ssm`` package installed and CUDA tensors, its fused Triton kernel replaces ``ssd_scan``
(``use_kernels``); it is never required. Deviation from the Mamba4Rec paper: with one block the paper
drops the residual around the Mamba layer; here every block has it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from genrec.data.batches import Batch
from genrec.models.layers import Dropout, Tokens, check_length, in_length_groups


@dataclass
class Mamba4RecConfig:
    dim: int = 64  # item embedding and model size D
    num_blocks: int = 1
    d_state: int = 32  # N: state size per head
    d_conv: int = 4  # causal depthwise convolution width
    expand: int = 2  # inner size = expand * D
    head_dim: int = 32  # P: inner channels per head (inner size / head_dim heads)
    chunk_size: int = 64  # steps per chunk of the SSD scan
    ffn_dim: int = 256  # feed-forward hidden size
    dropout: float = 0.2
    max_len: int = 200  # histories longer than this are cut
    use_kernels: bool = True  # mamba-ssm's fused kernel on CUDA when installed

    def validate(self) -> None:
        for key in ("dim", "num_blocks", "d_state", "d_conv", "expand", "head_dim", "chunk_size", "ffn_dim",
                    "max_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if (self.expand * self.dim) % self.head_dim:
            raise ValueError(f"model.expand * model.dim = {self.expand * self.dim} must be divisible by "
                             f"model.head_dim = {self.head_dim}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


def ssd_recurrence(x: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The definition, one step at a time: S_t = exp(a_t) S_{t-1} + B_t x_t^T, y_t = S_t^T C_t.

    x (b, l, h, p) (already multiplied by dt), a (b, l, h) log decays (<= 0), B, C (b, l, h, n) or
    (b, l, 1, n) (shared by the heads).
    Returns y (b, l, h, p).
    """
    b, l, h, p = x.shape
    state = x.new_zeros(b, h, B.shape[-1], p)
    ys = []
    for t in range(l):
        state = torch.exp(a[:, t])[..., None, None] * state + B[:, t, :, :, None] * x[:, t, :, None, :]
        ys.append(torch.einsum("bhnp,bhn->bhp", state, C[:, t]))
    return torch.stack(ys, dim=1)


def ssd_scan(x: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``ssd_recurrence`` computed chunk by chunk (same arguments and result; B and C may also be
    (b, l, 1, n), one group shared by all heads, which skips computing the same C . B once per head).

    With Q = ``chunk_size`` and s_i = the cumulative log decay inside a chunk:
    - inside a chunk, y_i = sum_{j <= i} (C_i . B_j) exp(s_i - s_j) x_j: a causal, decay-weighted
      (Q x Q) score matrix times x, all matmuls;
    - each chunk's own contribution to the state at its end is sum_j exp(s_Q - s_j) B_j x_j^T;
    - the state entering chunk c is carried from chunk to chunk (a loop over l / Q chunks only), and
      adds exp(s_i) C_i . S_in to every output of the chunk. A single chunk starts from the zero state
      and needs none of this.
    """
    b, l, h, p = x.shape
    n, g = B.shape[-1], B.shape[-2]
    Q = min(chunk_size, l)
    pad = (-l) % Q
    if pad:  # zero inputs and zero log-decay after the end: they change nothing before it
        x, a, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, a, B, C))
    c = x.shape[1] // Q
    x = x.reshape(b, c, Q, h, p)
    B, C = (t.reshape(b, c, Q, g, n) for t in (B, C))
    a = a.reshape(b, c, Q, h).permute(0, 1, 3, 2)  # (b, c, h, Q)
    s = torch.cumsum(a, dim=-1)  # (b, c, h, Q) cumulative log decay within each chunk
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    diff = (s[..., :, None] - s[..., None, :]).masked_fill(~causal, float("-inf"))  # (b, c, h, Q, Q): s_i - s_j
    scores = torch.einsum("bcihn,bcjhn->bchij", C, B) * torch.exp(diff)  # (b, c, g, Q, Q) broadcast to h
    y = torch.einsum("bchij,bcjhp->bcihp", scores, x)  # within-chunk outputs
    if c > 1:
        to_end = torch.exp(s[..., -1:] - s)  # (b, c, h, Q) decay from step j to the chunk's end
        chunk_states = torch.einsum("bcjhn,bchj,bcjhp->bchnp", B, to_end, x)  # (b, c, h, n, p)
        state = x.new_zeros(b, h, n, p)
        entering = [state]
        for k in range(c - 1):
            state = torch.exp(s[:, k, :, -1])[..., None, None] * state + chunk_states[:, k]
            entering.append(state)
        entering = torch.stack(entering, dim=1)  # (b, c, h, n, p)
        y = y + torch.einsum("bcihn,bchnp->bcihp", C, entering) * torch.exp(s).permute(0, 1, 3, 2)[..., None]
    return y.reshape(b, c * Q, h, p)[:, :l]


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Causal depthwise convolution along time: x (b, l, C), weight (C, 1, K) -> (b, l, C) with
    y_t = bias + sum_k weight[:, 0, k] * x_{t - K + 1 + k} (zeros before the start), what ``nn.Conv1d``
    with groups = C and padding K - 1 gives in its first l outputs. As K shifted multiply-adds: in the
    (b, l, C) layout, with no transposes, and its backward is elementwise too (oneDNN's depthwise
    convolution backward was a fifth of a Beauty training step)."""
    K, l = weight.shape[-1], x.shape[1]
    xp = F.pad(x, (0, 0, K - 1, 0))  # K - 1 zero steps before the start
    w, bias = weight[:, 0, :].to(x.dtype), bias.to(x.dtype)  # (C, K); x's dtype, as conv1d under autocast
    y = torch.addcmul(bias, xp[:, K - 1:], w[:, K - 1])
    for k in range(K - 1):
        y = torch.addcmul(y, xp[:, k:k + l], w[:, k])
    return y


def _mamba_ssm_kernel():
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # not installed, or installed without a usable GPU toolchain
        return None
    return mamba_chunk_scan_combined


class Mamba2Layer(nn.Module):
    def __init__(self, cfg: Mamba4RecConfig):
        super().__init__()
        self.cfg = cfg
        inner = cfg.expand * cfg.dim
        self.inner, self.heads = inner, inner // cfg.head_dim
        conv_dim = inner + 2 * cfg.d_state  # x, B, C (one group of B / C shared by the heads)
        self.in_proj = nn.Linear(cfg.dim, inner + conv_dim + self.heads, bias=False)
        self.conv = nn.Conv1d(conv_dim, conv_dim, cfg.d_conv, groups=conv_dim, padding=cfg.d_conv - 1)
        # dt initialised log-uniformly in [1e-3, 1e-1] through the inverse softplus of its bias (as Mamba)
        dt = torch.exp(torch.rand(self.heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = nn.RMSNorm(inner, eps=1e-5)
        self.out_proj = nn.Linear(inner, cfg.dim, bias=False)
        self.group_rows = 32  # rows per length group of a packed batch (see forward)

    def forward(self, x: torch.Tensor, tokens: Tokens, lengths: torch.Tensor) -> torch.Tensor:
        """x (N, D) tokens -> (N, D). The projections and the gate run on the tokens; the convolution and
        the scan, which run along each row, go through the (B, L) layout in groups of rows of similar
        length (longest first), each cut to its longest row: the padding of a random batch costs nothing."""
        n = self.cfg.d_state
        z, xbc, dt = torch.split(self.in_proj(x), [self.inner, self.inner + 2 * n, self.heads], dim=-1)
        seq = tokens.unpack(torch.cat([xbc, dt], dim=-1))  # (B, L, conv channels + heads)
        if tokens.packed:
            y = in_length_groups(lambda part, _: self.mix(part), seq, lengths, self.group_rows)
        else:
            y = self.mix(seq)
        y = self.norm(tokens.pack(y) * F.silu(z))
        return self.out_proj(y)

    def mix(self, seq: torch.Tensor) -> torch.Tensor:
        """(b, l, conv channels + heads) -> (b, l, inner): the causal convolution, the SSD scan and the skip."""
        cfg = self.cfg
        b, l, _ = seq.shape
        h, p, n = self.heads, cfg.head_dim, cfg.d_state
        xbc, dt = torch.split(seq, [self.inner + 2 * n, h], dim=-1)
        xbc = F.silu(causal_conv(xbc, self.conv.weight, self.conv.bias))
        xs, B, C = torch.split(xbc, [self.inner, n, n], dim=-1)
        xs = xs.reshape(b, l, h, p)
        dt = F.softplus(dt + self.dt_bias)  # (b, l, h)
        A = -torch.exp(self.A_log.float())  # (h,)
        kernel = _mamba_ssm_kernel() if cfg.use_kernels and seq.is_cuda else None
        if kernel is not None:
            y = kernel(xs, dt, A, B[:, :, None], C[:, :, None], cfg.chunk_size)
        else:
            y = ssd_scan(xs * dt[..., None], dt * A, B[:, :, None], C[:, :, None], cfg.chunk_size)
        y = y + xs * self.D[:, None]
        return y.reshape(b, l, self.inner)


class Block(nn.Module):
    def __init__(self, cfg: Mamba4RecConfig):
        super().__init__()
        self.mamba = Mamba2Layer(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(), Dropout(cfg.dropout),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, tokens: Tokens, lengths: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.dropout(self.mamba(x, tokens, lengths)))
        return self.ln2(x + self.dropout(self.ffn(x)))


class Mamba4Rec(nn.Module):
    def __init__(self, cfg: Mamba4RecConfig, num_items: int):
        super().__init__()
        self.cfg = cfg
        self.item_embedding = nn.Embedding(num_items + 1, cfg.dim, padding_idx=0)
        self.dropout = Dropout(cfg.dropout)
        self.input_norm = nn.LayerNorm(cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.grad_checkpointing = False  # set by the trainer (train.grad_checkpointing)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def forward(self, batch: Batch) -> torch.Tensor:
        B, L = batch.items.shape
        check_length(L, self.cfg.max_len)
        tokens = Tokens(batch.padding_mask)  # per-token work on the real tokens only (random batches)
        x = self.input_norm(self.dropout(tokens.pack(self.item_embedding(batch.items))))  # (N, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, tokens, batch.lengths, use_reentrant=False)
            else:
                x = block(x, tokens, batch.lengths)
        # (B, L, D), zero at padding; the scan is causal, so right padding never reaches a real position
        return tokens.unpack(tokens.mask(x))

    def item_vectors(self) -> torch.Tensor:
        return self.item_embedding.weight
