"""HSTU inference with a key/value cache: appending events costs work for the new events only.

HSTU is causal, so the per-layer keys and values of a user's past events never change when events are
appended, with one exception: with the time bias, event i's output depends on the time of event i + 1
(its query time), so the last event stays *pending* until the next one arrives and is recomputed then.
``HSTUCache`` keeps the settled keys and values; ``extend`` runs only the pending and the new events
through every layer (their queries attend to the cached keys and to each other) and returns the
next-item query after the last one, exactly what a full recompute of the whole history gives (tested).
One user per cache.

Limits: the cache holds at most ``model.max_len`` events (positions are absolute; beyond that the
history window slides and every position changes: recompute with ``HSTU.next_item_queries``), and
the ``batch_max`` attention normaliser depends on the final length, so it cannot be cached (an error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from genrec.models.hstu import HSTU, time_buckets


@dataclass
class HSTUCache:
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer (S, H, dqk), settled events only
    values: list[torch.Tensor] = field(default_factory=list)  # per layer (S, H, dv)
    timestamps: torch.Tensor | None = None  # (length,) event times, when the model uses them
    length: int = 0  # events seen
    pending: torch.Tensor | None = None  # item ids after the settled ones (the last event, with the time bias)

    @property
    def settled(self) -> int:
        return self.length - (0 if self.pending is None else len(self.pending))


@torch.no_grad()
def extend(model: HSTU, cache: HSTUCache | None, items: torch.Tensor, timestamps: torch.Tensor | None = None,
           query_time: int | None = None, final: bool = False) -> tuple[torch.Tensor, HSTUCache]:
    """Append dense item ids ``items`` (n,) (and their ``timestamps``) to the cached history.

    ``query_time`` is the time of the event to predict (default: the last new event's time), as in
    evaluation. Returns the scorer-ready next-item hidden state (D,) and the updated cache.
    ``final=True`` settles the last event too: the caller promises that the next event happens at
    ``query_time`` (candidate scoring appends its candidates at that time).
    """
    cfg = model.cfg
    if model.training:
        raise ValueError("cached inference runs in eval mode: call model.eval() first")
    if cfg.attn_norm == "batch_max":
        raise ValueError("the batch_max normaliser depends on the final length: recompute instead of caching")
    cache = cache or HSTUCache()
    if int(items.shape[0]) == 0:
        raise ValueError("extend needs at least one new event")
    use_time = cfg.relative_bias == "position_time" and timestamps is not None
    if cache.length and use_time and cache.timestamps is None:
        raise ValueError("this cache was built without timestamps; keep passing none or start a new cache")
    device = model.item_embedding.weight.device
    items = items.to(device)
    if cache.pending is not None:  # recompute the pending event(s) with the new ones
        items = torch.cat([cache.pending, items])
    T0, T = cache.settled, cache.length + int(items.shape[0]) - (0 if cache.pending is None else len(cache.pending))
    n = T - T0
    if T > cfg.max_len:
        raise ValueError(f"{T} events exceed model.max_len={cfg.max_len}: the window slides, recompute instead")
    H, dqk, dv = cfg.num_heads, cfg.qk_dim, cfg.v_dim
    pos = torch.arange(T0, T, device=device)
    x = model.item_embedding(items) * math.sqrt(cfg.dim) + model.position_embedding(pos)  # (n, D)
    all_times = None
    if use_time:
        all_times = torch.cat([cache.timestamps, timestamps]) if cache.timestamps is not None else timestamps
        last = int(all_times[-1]) if query_time is None else int(query_time)
        qt = torch.cat([all_times[T0 + 1:T], torch.tensor([last], dtype=all_times.dtype)])  # (n,) next event times
        buckets = time_buckets(qt[None], all_times[None], cfg.num_time_buckets, cfg.time_log_base)[0]  # (n, T)
    rel = (torch.arange(T, device=device)[None, :] - pos[:, None]) + cfg.max_len - 1  # (n, T): j - i
    future = torch.arange(T, device=device)[None, :] > pos[:, None]  # (n, T)
    keep = T - 1 if use_time and not final else T  # with the time bias the last event's output changes with the next time
    new_keys, new_values = [], []
    for li, layer in enumerate(model.layers):
        u, v, q, k = layer.projections(x)
        q = q.view(n, H, dqk)
        keys = torch.cat([cache.keys[li], k.view(n, H, dqk)]) if T0 else k.view(n, H, dqk)  # (T, H, dqk)
        values = torch.cat([cache.values[li], v.view(n, H, dv)]) if T0 else v.view(n, H, dv)
        scores = torch.einsum("ihd,jhd->hij", q, keys)  # (H, n, T)
        if layer.rab is not None:
            bias = layer.rab.position[rel]
            if use_time and layer.rab.time is not None:
                bias = bias + layer.rab.time[buckets]
            scores = scores + bias[None]
        weights = F.silu(scores).masked_fill(future[None], 0.0)
        o = torch.einsum("hij,jhd->ihd", weights, values).reshape(n, H * dv)
        o = o / ((pos + 1)[:, None].to(o.dtype) if cfg.attn_norm == "visible" else float(cfg.max_len))
        x = layer.output(u, o, x)  # eval mode: no dropout
        new_keys.append(keys[:keep])
        new_values.append(values[:keep])
    out = x[-1]
    if cfg.output_l2_norm:
        out = F.normalize(out, dim=-1, eps=1e-6)
    pending = items[-1:] if use_time and not final else None
    return out, HSTUCache(new_keys, new_values, all_times, T, pending)
