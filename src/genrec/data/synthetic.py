"""A deterministic synthetic interaction log with structure a sequence model can learn.

Each user belongs to a taste cluster. The next item is drawn, in order of preference, from
- the current item's few "successor" items (sequential transitions: what a sequence model learns),
- the user's cluster catalogue (long-term taste),
- global popularity (a Zipf law: what a popularity baseline learns).
Timestamps grow by exponential gaps (per-user activity rate); action types (1 = view, 2 = click,
3 = cart, 4 = buy) are skewed towards views and more likely to be strong after a transition.

Generation is vectorised over users: one numpy step per position, never a loop per event. The same
seed gives the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genrec.data.ingest import build_store
from genrec.data.store import SequenceStore


@dataclass
class SyntheticConfig:
    num_users: int = 3000
    num_items: int = 1500
    num_clusters: int = 12
    successors: int = 3  # successor items per item
    p_transition: float = 0.65  # next item follows the current item's successors
    p_cluster: float = 0.25  # ... else from the user's cluster; else global popularity
    zipf: float = 1.0  # popularity exponent
    min_len: int = 8
    mean_len: int = 40
    max_len: int = 200
    start_time: int = 1_600_000_000
    seed: int = 0


PRESETS = {
    "tiny": SyntheticConfig(num_users=200, num_items=120, num_clusters=4, mean_len=20, max_len=60),
    "small": SyntheticConfig(num_users=1000, num_items=500, mean_len=30, max_len=100),
    "default": SyntheticConfig(),
}


def generate(cfg: SyntheticConfig = SyntheticConfig()) -> SequenceStore:
    rng = np.random.default_rng(cfg.seed)
    U, I = cfg.num_users, cfg.num_items

    # global popularity: Zipf over a random permutation of the items
    ranks = rng.permutation(I) + 1
    pop = 1.0 / ranks**cfg.zipf
    pop /= pop.sum()
    pop_cdf = np.cumsum(pop)

    # clusters: each item belongs to one cluster; a cluster samples its items by popularity
    item_cluster = rng.integers(0, cfg.num_clusters, size=I)
    cluster_items = [np.flatnonzero(item_cluster == c) for c in range(cfg.num_clusters)]
    cluster_cdfs = [np.cumsum(pop[ix]) / pop[ix].sum() for ix in cluster_items]

    # successors: mostly within the item's own cluster
    succ = np.empty((I, cfg.successors), dtype=np.int64)
    for c, ix in enumerate(cluster_items):  # loop over clusters, not events
        succ[ix] = rng.choice(ix, size=(len(ix), cfg.successors), replace=True)

    user_cluster = rng.integers(0, cfg.num_clusters, size=U)
    lengths = np.clip(rng.geometric(1.0 / max(1, cfg.mean_len - cfg.min_len), size=U) + cfg.min_len,
                      cfg.min_len, cfg.max_len)
    T = int(lengths.max())

    def sample_cluster(users: np.ndarray) -> np.ndarray:
        out = np.empty(len(users), dtype=np.int64)
        clusters = user_cluster[users]
        for c in np.unique(clusters):  # loop over clusters
            sel = clusters == c
            r = rng.random(sel.sum())
            out[sel] = cluster_items[c][np.minimum(np.searchsorted(cluster_cdfs[c], r), len(cluster_items[c]) - 1)]
        return out

    seq = np.zeros((U, T), dtype=np.int64)
    strong = np.zeros((U, T), dtype=bool)
    all_users = np.arange(U)
    seq[:, 0] = sample_cluster(all_users)
    for t in range(1, T):  # loop over positions, vectorised over users
        r = rng.random(U)
        nxt = np.empty(U, dtype=np.int64)
        trans = r < cfg.p_transition
        clus = (~trans) & (r < cfg.p_transition + cfg.p_cluster)
        glob = ~(trans | clus)
        nxt[trans] = succ[seq[trans, t - 1], rng.integers(0, cfg.successors, size=trans.sum())]
        nxt[clus] = sample_cluster(all_users[clus])
        nxt[glob] = np.minimum(np.searchsorted(pop_cdf, rng.random(glob.sum())), I - 1)
        seq[:, t] = nxt
        strong[:, t] = trans

    valid = np.arange(T)[None, :] < lengths[:, None]
    users = np.broadcast_to(all_users[:, None], (U, T))[valid]
    items = seq[valid] + 1  # raw item ids 1..I

    rate = rng.lognormal(mean=np.log(3600.0), sigma=1.0, size=U)  # seconds between events per user
    gaps = rng.exponential(1.0, size=(U, T)) * rate[:, None]
    start = cfg.start_time + rng.integers(0, 180 * 86400, size=U)
    times = (start[:, None] + np.cumsum(gaps, axis=1)).astype(np.int64)[valid]

    a = rng.random((U, T))
    actions = np.where(a < 0.6, 1, np.where(a < 0.85, 2, np.where(a < 0.95, 3, 4)))
    actions = np.where(strong & (rng.random((U, T)) < 0.3), 4, actions)[valid]

    return build_store(users.astype(np.int64) + 1, items, times, actions,
                       source={"format": "synthetic", "config": cfg.__dict__})
