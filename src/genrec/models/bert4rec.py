"""BERT4Rec: bidirectional Transformer trained with a cloze objective.

Sun et al., "BERT4Rec: Sequential Recommendation with Bidirectional Encoder Representations from
Transformer", CIKM 2019. As in the paper's code:

    x0 = E[item] + P[t]; LayerNorm; dropout           (E has one extra row: the [mask] token)
    per block (post-LayerNorm):  x = LN(x + Dropout(MultiHeadAttention(x)))   every real position sees
                                 x = LN(x + Dropout(FFN_GELU(x)))             every other real position
    head: the hidden state is scored against the item table (tied weights) by the loss / evaluator

Training (``training_batch``): each training sequence (the last ``max_len`` training events) has every
position replaced by [mask] with probability ``mask_prob``; a sequence with no mask gets its last
event masked. The loss predicts the original item at the masked positions only, and a masked position
only ever sees its own [mask] token, never its label. Prediction: a [mask] token is appended after the
history (dropping the oldest event when the history already fills ``max_len``), and its output is the
next-item query; it is returned at the history's last position, where every evaluator reads it (the
other positions of ``forward``'s output are zero). Deviation: scoring is the library's (dot product
with the item table, optional cosine / temperature) instead of the paper's extra projection + bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from genrec.data.batches import Batch
from genrec.models.layers import Dropout, Tokens, check_length, dropout, in_length_groups


@dataclass
class BERT4RecConfig:
    dim: int = 64  # item embedding and hidden size D
    num_blocks: int = 2
    num_heads: int = 2
    ffn_dim: int = 256  # feed-forward hidden size (paper: 4 D)
    dropout: float = 0.1
    attn_dropout: float = 0.1
    mask_prob: float = 0.2  # cloze: probability that a training position is replaced by [mask]
    max_len: int = 200  # positions, the appended [mask] included

    def validate(self) -> None:
        for key in ("dim", "num_blocks", "num_heads", "ffn_dim", "max_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.max_len < 2:
            raise ValueError("model.max_len must be at least 2 (one event and the [mask] token)")
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.num_heads={self.num_heads}")
        for key in ("dropout", "attn_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be in [0, 1), got {getattr(self, key)}")
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"model.mask_prob must be in (0, 1), got {self.mask_prob}")


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention over the real positions of each row (padding keys masked)."""

    def __init__(self, dim: int, num_heads: int, attn_dropout: float):
        super().__init__()
        self.num_heads, self.attn_dropout = num_heads, attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def attend(self, qkv: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(b, m, 3D) -> (b, m, D): every query sees the first ``lengths`` keys of its row (at least one)."""
        b, m, D3 = qkv.shape
        D, H = D3 // 3, self.num_heads
        q, k, v = qkv.view(b, m, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (b, H, m, d)
        real = torch.arange(m, device=qkv.device)[None, :] < lengths.clamp(min=1)[:, None]  # (an empty row: no NaN)
        key_bias = torch.zeros(b, 1, 1, m, dtype=q.dtype, device=q.device).masked_fill_(
            ~real[:, None, None, :], float("-inf"))
        if self.training and self.attn_dropout > 0 and qkv.device.type == "cpu":
            weights = torch.softmax((q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(D // H)) + key_bias, dim=-1)
            y = dropout(weights, self.attn_dropout) @ v  # (the fast CPU mask; SDPA's CPU dropout is slow)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias,
                                               dropout_p=self.attn_dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(b, m, D)

    def forward(self, x: torch.Tensor, tokens: Tokens, lengths: torch.Tensor) -> torch.Tensor:
        """x (N, D) tokens -> (N, D). Rows go through attention in groups of similar length, each cut to
        its longest row (``in_length_groups``): the padding of a random batch costs no attention work."""
        qkv = tokens.unpack(self.qkv(x))  # (B, L, 3D)
        y = in_length_groups(self.attend, qkv, lengths) if tokens.packed else self.attend(qkv, lengths)
        return self.proj(tokens.pack(y))


class Block(nn.Module):
    def __init__(self, cfg: BERT4RecConfig):
        super().__init__()
        self.attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.attn_dropout)
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, tokens: Tokens, lengths: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.dropout(self.attn(x, tokens, lengths)))
        return self.ln2(x + self.dropout(self.ffn(x)))


class BERT4Rec(nn.Module):
    def __init__(self, cfg: BERT4RecConfig, num_items: int):
        super().__init__()
        self.cfg = cfg
        self.num_items = num_items
        self.mask_token = num_items + 1
        self.item_embedding = nn.Embedding(num_items + 2, cfg.dim, padding_idx=0)  # + padding row + [mask]
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.dim)
        self.input_norm = nn.LayerNorm(cfg.dim)
        self.dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.grad_checkpointing = False  # set by the trainer (train.grad_checkpointing)
        # BERT-style initialisation: truncated normal (std 0.02) for embeddings and weights, zero biases
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def encode(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Bidirectional encoding of right-padded ``items`` (B, L) -> (B, L, D); padding rows are zero.
        The per-token work runs on the real tokens only when padding is a large share (``Tokens``)."""
        B, L = items.shape
        check_length(L, self.cfg.max_len, "sequence")
        tokens = Tokens(torch.arange(L, device=items.device)[None, :] < lengths[:, None])
        x = self.item_embedding(items) + self.position_embedding(torch.arange(L, device=items.device))[None]
        x = tokens.mask(self.dropout(self.input_norm(tokens.pack(x))))  # (N, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = tokens.mask(checkpoint(block, x, tokens, lengths, use_reentrant=False))
            else:
                x = tokens.mask(block(x, tokens, lengths))
        return tokens.unpack(x)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Cloze batches (from ``training_batch``): the encoding of every position. Any other batch: the
        next-item query of each history at its last position (B, L, D), zeros elsewhere."""
        if batch.cloze:
            return self.encode(batch.items, batch.lengths)
        items, lengths = batch.items, batch.lengths
        B, L = items.shape
        rows = torch.arange(B, device=items.device)
        full = lengths >= self.cfg.max_len  # no room for the [mask]: drop the oldest event
        ext = torch.cat([items, items.new_zeros(B, 1)], dim=1)  # (B, L + 1)
        if bool(full.any()):
            ext[full] = torch.roll(ext[full], -1, dims=1)
        ext_len = torch.where(full, lengths, lengths + 1).clamp(min=1)
        ext[rows, ext_len - 1] = self.mask_token
        width = int(ext_len.max())
        h = self.encode(ext[:, :width], ext_len)  # (B, width, D)
        out = h.new_zeros(B, L, h.shape[-1])
        out[rows, (lengths - 1).clamp(min=0)] = h[rows, ext_len - 1]
        return out

    def training_batch(self, batch: Batch) -> Batch:
        """Cloze version of a next-item training batch: the whole training window (inputs and the last
        target, the last ``max_len`` of them) with random positions replaced by [mask]; ``targets`` holds
        the original items at the masked positions, 0 elsewhere. Draws from the global generator."""
        items, lengths, targets = batch.items, batch.lengths, batch.targets
        B, L = items.shape
        rows = torch.arange(B, device=items.device)
        seq = torch.cat([items, items.new_zeros(B, 1)], dim=1)  # (B, L + 1): append the last target
        seq[rows, lengths] = torch.where(lengths > 0, targets[rows, (lengths - 1).clamp(min=0)], 0)
        seq_len = torch.where(lengths > 0, lengths + 1, 0)
        over = seq_len > self.cfg.max_len
        if bool(over.any()):
            seq[over] = torch.roll(seq[over], -1, dims=1)
            seq[over, -1] = 0
            seq_len = seq_len.clamp(max=self.cfg.max_len)
        width = max(1, int(seq_len.max()))
        seq = seq[:, :width]
        real = torch.arange(width, device=items.device)[None, :] < seq_len[:, None]
        masked = (torch.rand(B, width, device=items.device) < self.cfg.mask_prob) & real
        none = ~masked.any(dim=1) & (seq_len > 0)  # every sequence predicts at least one item
        masked[rows[none], seq_len[none] - 1] = True
        return Batch(items=torch.where(masked, self.mask_token, seq), lengths=seq_len,
                     targets=torch.where(masked, seq, 0), users=batch.users, cloze=True)

    def item_vectors(self) -> torch.Tensor:
        """(num_items + 1, D) table the hidden states are scored against (row 0 = padding; no [mask] row)."""
        return self.item_embedding.weight[: self.num_items + 1]
