"""Straightforward dense implementations of the genrec models' math: the speed baseline.

Kept deliberately naive, as a first PyTorch port of the papers would be written: every batch padded
to ``max_len``, masks multiplied into full L x L score tensors, the relative biases gathered by plain
indexing (autograd's default backward), attention weights divided elementwise, and the sampled-softmax
negatives gathered as a (N, R, D) tensor. They reuse the parameters of a genrec model, so
``tests/test_dense_reference.py`` can check that both compute the same function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genrec.data.batches import Batch
from genrec.models.hstu import HSTU
from genrec.models.sasrec import SASRec


def pad_batch(batch: Batch, L: int) -> Batch:
    """Right-pad every (B, l) tensor of the batch to (B, L)."""
    def pad(t):
        return None if t is None or t.dim() != 2 else F.pad(t, (0, L - t.shape[1]))

    return Batch(items=pad(batch.items), lengths=batch.lengths, timestamps=pad(batch.timestamps),
                 query_time=pad(batch.query_time), actions=pad(batch.actions), targets=pad(batch.targets),
                 target=batch.target, users=batch.users)


def dense_hstu(model: HSTU, batch: Batch) -> torch.Tensor:
    cfg = model.cfg
    batch = pad_batch(batch, cfg.max_len)
    B, L = batch.items.shape
    H, dqk, dv = cfg.num_heads, cfg.qk_dim, cfg.v_dim
    valid = (torch.arange(L)[None, :] < batch.lengths[:, None]).float()  # (B, L)
    x = model.item_embedding(batch.items) * math.sqrt(cfg.dim) + model.position_embedding.weight[:L][None]
    x = model.dropout(x) * valid[..., None]
    mask = torch.tril(torch.ones(L, L))[None] * valid[:, None, :] * valid[:, :, None]  # (B, L, L)
    use_time = cfg.relative_bias == "position_time" and batch.timestamps is not None
    if use_time:
        dt = (batch.query_time[:, :, None] - batch.timestamps[:, None, :]).abs().clamp(min=1).float()
        buckets = (torch.log(dt) / cfg.time_log_base).floor().long().clamp(0, cfg.num_time_buckets)
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None] + cfg.max_len - 1  # (L, L) j - i
    for layer in model.layers:
        normed = F.layer_norm(x, (cfg.dim,), layer.in_norm.weight, layer.in_norm.bias, cfg.ln_eps)
        uvqk = normed @ layer.uvqk
        if cfg.silu == "uvqk":
            uvqk = F.silu(uvqk)
        u, v, q, k = torch.split(uvqk, [H * dv, H * dv, H * dqk, H * dqk], dim=-1)
        if cfg.silu == "u":
            u = F.silu(u)
        q = q.view(B, L, H, dqk).transpose(1, 2)
        k = k.view(B, L, H, dqk).transpose(1, 2)
        v = v.view(B, L, H, dv).transpose(1, 2)
        scores = torch.einsum("bhid,bhjd->bhij", q, k)  # (B, H, L, L)
        if cfg.attn_scale:
            scores = scores / math.sqrt(dqk)
        if layer.rab is not None:
            bias = layer.rab.position[rel][None]  # (1, L, L)
            if use_time:
                bias = bias + layer.rab.time[buckets]  # (B, L, L)
            scores = scores + bias[:, None]
        attn = F.silu(scores) * mask[:, None]
        if cfg.attn_norm == "max_len":
            attn = attn / cfg.max_len
        elif cfg.attn_norm == "batch_max":
            attn = attn / batch.lengths.max().float()
        else:
            attn = attn / mask.sum(-1, keepdim=True).clamp(min=1)[:, None]
        o = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(B, L, H * dv)
        normed_o = F.layer_norm(o, (H * dv,), layer.attn_norm.weight, layer.attn_norm.bias, cfg.ln_eps)
        o = torch.cat([u, o, u * normed_o], -1) if cfg.output == "concat" else u * normed_o
        x = (layer.out(layer.dropout(o)) + x) * valid[..., None]
    if cfg.output_l2_norm:
        x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    return x


def dense_sasrec(model: SASRec, batch: Batch) -> torch.Tensor:
    cfg = model.cfg
    batch = pad_batch(batch, cfg.max_len)
    B, L = batch.items.shape
    H, d = cfg.num_heads, cfg.dim // cfg.num_heads
    valid = (torch.arange(L)[None, :] < batch.lengths[:, None]).float()
    x = model.item_embedding(batch.items)
    if cfg.scale_embeddings:
        x = x * math.sqrt(cfg.dim)
    x = model.dropout(x + model.position_embedding.weight[:L][None]) * valid[..., None]
    allowed = torch.tril(torch.ones(L, L, dtype=torch.bool))  # (L, L)
    for block in model.blocks:
        h = block.ln1(x)
        q, k, v = block.attn.qkv(h).view(B, L, 3, H, d).permute(2, 0, 3, 1, 4)
        scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d)
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = torch.softmax(scores, -1)
        if model.training and block.attn.dropout > 0:
            attn = F.dropout(attn, block.attn.dropout)
        y = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(B, L, cfg.dim)
        x = x + block.dropout(block.attn.proj(y))
        x = (x + block.dropout(block.ffn(block.ln2(x)))) * valid[..., None]
    return model.final_ln(x) * valid[..., None]


def dense_sampled_softmax(q: torch.Tensor, targets: torch.Tensor, items: torch.Tensor, negatives: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """q (N, D), targets (N,), items (I + 1, D) already normalised, negatives (N, R)."""
    pos = (q * items[targets]).sum(-1, keepdim=True)
    neg = torch.einsum("nd,nrd->nr", q, items[negatives])
    neg = neg.masked_fill(negatives == targets[:, None], -1e9)
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))


def dense_forward(model, batch: Batch) -> torch.Tensor:
    return dense_hstu(model, batch) if isinstance(model, HSTU) else dense_sasrec(model, batch)


def dense_train_step(model, loss_cfg, scorer, optimizer: torch.optim.Optimizer, batch: Batch, num_items: int) -> int:
    """One optimisation step of the reference path (dense forward, (N, R, D) sampled softmax); returns
    the number of predicted positions."""
    hidden = dense_forward(model, batch)[:, :batch.targets.shape[1]]
    valid = batch.targets > 0
    q = scorer.queries(hidden[valid])
    items = scorer.items(model.item_vectors())
    negatives = torch.randint(1, num_items + 1, (len(q), loss_cfg.num_negatives))
    loss = dense_sampled_softmax(q, batch.targets[valid], items, negatives, loss_cfg.temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return int(valid.sum())
