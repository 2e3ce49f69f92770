"""SASRec: self-attentive sequential recommendation.

Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018.
Configured as the SASRec baseline of the HSTU paper (generative-recommenders, ML-1M presets).

Deviations from the original paper, all standard in later reimplementations:
- pre-LayerNorm blocks (the original normalises only the query input of attention), a final LayerNorm;
- fused causal attention through ``torch.nn.functional.scaled_dot_product_attention``;
- the feed-forward activation is a switch (``gelu`` default; the HSTU repository's preset uses ``relu``);
- initialisation follows the HSTU repository's SASRec (truncated-normal embeddings, Xavier-normal weights);
- the training objective lives in ``genrec.losses`` (the paper used BCE with one negative; the HSTU
  baseline uses sampled softmax), and scoring is a dot product with the item embedding table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from genrec.data.batches import Batch
from genrec.models.layers import Dropout, Tokens, check_length, dropout, in_length_groups


@dataclass
class SASRecConfig:
    dim: int = 50  # item embedding and hidden size D
    num_blocks: int = 2
    num_heads: int = 1
    ffn_dim: int = 50  # feed-forward hidden size
    ffn_activation: str = "gelu"  # gelu | relu
    dropout: float = 0.2
    max_len: int = 200  # size of the position table; histories longer than this are cut
    scale_embeddings: bool = True  # multiply item embeddings by sqrt(D) (as in the reference code)

    def validate(self) -> None:
        for key in ("dim", "num_blocks", "num_heads", "ffn_dim", "max_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.num_heads={self.num_heads}")
        if self.ffn_activation not in ("gelu", "relu"):
            raise ValueError(f"model.ffn_activation must be gelu or relu, got {self.ffn_activation!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


def dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
    """Causal softmax attention with dropout on the weights, for CPU training.

    Same function as ``scaled_dot_product_attention(..., is_causal=True, dropout_p=p)``, whose CPU kernel
    falls back to an unfused path with a slow per-element Bernoulli mask when dropout is on: here the
    scale and the causal mask are folded into one baddbmm and the mask comes from ``layers.dropout``.
    q, k, v: (B, H, L, d) -> (B, H, L, d).
    """
    B, H, L, d = q.shape
    causal = torch.full((L, L), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)[None]  # (1, L, L)
    scores = torch.baddbmm(causal, q.reshape(B * H, L, d), k.reshape(B * H, L, d).transpose(1, 2),
                           alpha=1.0 / math.sqrt(d))  # (B*H, L, L)
    weights = dropout(torch.softmax(scores, dim=-1), p)
    return torch.bmm(weights, v.reshape(B * H, L, d)).view(B, H, L, d)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """(b, m, 3D) -> (b, m, D): causal attention over the first m positions of a few rows."""
        b, m, D3 = qkv.shape
        D, H = D3 // 3, self.num_heads
        q, k, v = qkv.reshape(b, m, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (b, H, m, d)
        # Right padding + causal mask: a real position never sees a padded key, so no extra mask is needed.
        if self.training and self.dropout > 0 and qkv.device.type == "cpu":
            y = dropout_attention(q, k, v, self.dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)  # (b, H, m, d)
        return y.transpose(1, 2).reshape(b, m, D)

    def forward(self, x: torch.Tensor, tokens: Tokens, lengths: torch.Tensor) -> torch.Tensor:
        """x (N, D) tokens -> (N, D). Rows go through attention in groups of similar length (longest
        first), each cut to its longest row: the padding of a random batch costs no attention work."""
        qkv = tokens.unpack(self.qkv(x))  # (B, L, 3D)
        if not tokens.packed:
            return self.proj(tokens.pack(self.attend(qkv)))
        return self.proj(tokens.pack(in_length_groups(lambda part, _: self.attend(part), qkv, lengths)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg.dim, cfg.num_heads, cfg.dropout)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim, cfg.ffn_activation, cfg.dropout)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, tokens: Tokens, lengths: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), tokens, lengths))
        return x + self.dropout(self.ffn(self.ln2(x)))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig, num_items: int):
        super().__init__()
        self.cfg = cfg
        self.item_embedding = nn.Embedding(num_items + 1, cfg.dim, padding_idx=0)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.dim)
        self.dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.final_ln = nn.LayerNorm(cfg.dim)
        self.grad_checkpointing = False  # set by the trainer (train.grad_checkpointing)
        # initialisation as in the HSTU repository's SASRec: truncated normals for the embeddings,
        # Xavier-normal for every weight matrix of the blocks (biases and LayerNorms keep their defaults)
        nn.init.trunc_normal_(self.item_embedding.weight, std=0.02, a=-0.04, b=0.04)
        std = math.sqrt(1.0 / cfg.dim)
        nn.init.trunc_normal_(self.position_embedding.weight, std=std, a=-2 * std, b=2 * std)
        for name, p in self.blocks.named_parameters():
            if p.dim() >= 2:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def forward(self, batch: Batch) -> torch.Tensor:
        items = batch.items
        B, L = items.shape
        check_length(L, self.cfg.max_len)
        tokens = Tokens(batch.padding_mask)
        x = self.item_embedding(items)  # (B, L, D)
        if self.cfg.scale_embeddings:
            x = x * math.sqrt(self.cfg.dim)
        x = tokens.pack(x + self.position_embedding(torch.arange(L, device=items.device))[None])  # (N, D)
        x = tokens.mask(self.dropout(x))
        for block in self.blocks:
            if self.grad_checkpointing and self.training:  # recompute the block in backward
                x = tokens.mask(checkpoint(block, x, tokens, batch.lengths, use_reentrant=False))
            else:
                x = tokens.mask(block(x, tokens, batch.lengths))
        return tokens.unpack(tokens.mask(self.final_ln(x)))  # (B, L, D), zero at padding

    def item_vectors(self) -> torch.Tensor:
        """(num_items + 1, D) table the hidden states are scored against (row 0 = padding)."""
        return self.item_embedding.weight
