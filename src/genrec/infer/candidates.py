"""Candidate scoring in one pass (the HSTU paper's M-FALCON): m candidates for one user, each attending
to the user's history and to itself only.

Ranking with a sequential model appends a candidate item after the history and reads the model's
state at the candidate's position. Done one candidate at a time that is m full forward passes over the
history. Here the history runs once (``extend(..., final=True)`` keeps every layer's keys and values),
then the candidates go through the layers in micro-batches of ``micro_batch`` as tokens that all sit at
the same position (right after the history): a candidate's query meets the history's cached keys plus
its own key, never another candidate's, so its state is exactly what a separate forward over
``history + [candidate]`` gives (tested), at the cost of the history once plus m single tokens.

The states are what a ranking head scores: ``candidate_states`` returns them, ``candidate_scores`` passes
them through a head (any module or function mapping (b, D) states to (b,) or (b, tasks) scores, e.g. a
ranking model's task heads) one micro-batch at a time. genrec's retrieval models rank candidates by a dot
product with the next-item query instead (``Recommender.recommend(..., candidates=...)``), which needs no
candidate tokens.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from genrec.infer.hstu_cache import extend
from genrec.models.hstu import HSTU, time_buckets


@torch.no_grad()
def candidate_states(model: HSTU, history: torch.Tensor, candidates: torch.Tensor,
                     timestamps: torch.Tensor | None = None, query_time: int | None = None,
                     micro_batch: int = 256) -> torch.Tensor:
    """(m, D) state of each candidate appended after ``history`` (n,) dense ids, for ``candidates`` (m,).

    With the time bias, ``timestamps`` (n,) are the history's times and ``query_time`` the time the
    candidates are shown (default: the last event's time); a candidate's own query time is that time.
    """
    cfg = model.cfg
    n, m = int(history.shape[0]), int(candidates.shape[0])
    if n + 1 > cfg.max_len:
        raise ValueError(f"history of {n} events + the candidate exceed model.max_len={cfg.max_len}: "
                         f"keep the last {cfg.max_len - 1} events")
    if m == 0:
        return torch.zeros(0, cfg.dim)
    use_time = cfg.relative_bias == "position_time" and timestamps is not None
    t_c = None
    if use_time:
        t_c = int(timestamps[-1]) if query_time is None else int(query_time)
    _, cache = extend(model, None, history, timestamps, query_time=t_c, final=True)  # every layer's K/V, n events
    device = model.item_embedding.weight.device
    H, dqk, dv = cfg.num_heads, cfg.qk_dim, cfg.v_dim
    T = n + 1  # keys a candidate sees: the history and itself, at position n
    rel = torch.arange(T, device=device) - n + cfg.max_len - 1  # (T,) j - i
    buckets = None
    if use_time:
        times = torch.cat([cache.timestamps, torch.tensor([t_c], dtype=cache.timestamps.dtype)])
        buckets = time_buckets(torch.tensor([[t_c]]), times[None], cfg.num_time_buckets, cfg.time_log_base)[0, 0]
    out = []
    for s in range(0, m, micro_batch):
        c = candidates[s:s + micro_batch].to(device)
        b = c.shape[0]
        x = model.item_embedding(c) * math.sqrt(cfg.dim) + model.position_embedding.weight[n]  # (b, D)
        for li, layer in enumerate(model.layers):
            u, v, q, k = layer.projections(x)
            q, k, v = q.view(b, H, dqk), k.view(b, H, dqk), v.view(b, H, dv)
            scores = torch.cat([torch.einsum("bhd,jhd->bhj", q, cache.keys[li]),  # (b, H, n) the history
                                (q * k).sum(-1, keepdim=True)], dim=-1)  # (b, H, 1) itself
            if layer.rab is not None:
                bias = layer.rab.position[rel]
                if buckets is not None and layer.rab.time is not None:
                    bias = bias + layer.rab.time[buckets]
                scores = scores + bias
            w = F.silu(scores)
            o = torch.einsum("bhj,jhd->bhd", w[..., :n], cache.values[li]) + w[..., n:] * v  # (b, H, dv)
            # T keys visible, or max_len (extend above already refused the batch_max normaliser)
            o = o.reshape(b, H * dv) / (T if cfg.attn_norm == "visible" else cfg.max_len)
            x = layer.output(u, o, x)  # eval mode (extend checks it): no dropout
        out.append(F.normalize(x, dim=-1, eps=1e-6) if cfg.output_l2_norm else x)
    return torch.cat(out)


@torch.no_grad()
def candidate_scores(model: HSTU, history: torch.Tensor, candidates: torch.Tensor,
                     head: Callable[[torch.Tensor], torch.Tensor], timestamps: torch.Tensor | None = None,
                     query_time: int | None = None, micro_batch: int = 256) -> torch.Tensor:
    """``head`` applied to each candidate's state (``candidate_states``): (m,) or (m, tasks) scores, equal to
    scoring each candidate after its own forward pass over ``history + [candidate]``."""
    states = candidate_states(model, history, candidates, timestamps, query_time, micro_batch)
    if states.shape[0] == 0:
        return head(states)
    return torch.cat([head(states[s:s + micro_batch]) for s in range(0, states.shape[0], micro_batch)])
