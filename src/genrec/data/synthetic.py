"""A deterministic synthetic interaction log with structure a sequence model can learn.

Each user belongs to a taste cluster. The next item is drawn, in order of preference, from
- the current item's few "successor" items (sequential transitions: what a sequence model learns),
- the user's cluster catalogue (long-term taste),
- global popularity (a Zipf law: what a popularity baseline learns).
Timestamps grow by exponential gaps (per-user activity rate); action types (1 = view, 2 = click,
3 = cart, 4 = buy) are skewed towards views and more likely to be strong after a transition.

Users are simulated in fixed chunks of ``chunk_users``, each with its own RNG stream derived from
(seed, chunk), vectorised over the chunk's users (one numpy step per position, never a loop per
event). ``generate`` builds an in-memory store; ``generate_to`` streams the same events straight into
a dataset directory in bounded memory (100M events in a few GiB), so both give identical data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from genrec.data.ingest import build_store
from genrec.data.store import SequenceStore, staging, write_metadata
from genrec.data.vocab import Vocab


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
    chunk_users: int = 20_000  # users simulated per RNG stream (part of the data's definition)


PRESETS = {
    "tiny": SyntheticConfig(num_users=200, num_items=120, num_clusters=4, mean_len=20, max_len=60),
    "small": SyntheticConfig(num_users=1000, num_items=500, mean_len=30, max_len=100),
    "default": SyntheticConfig(),
    "1m": SyntheticConfig(num_users=10_000, num_items=10_000, num_clusters=50, mean_len=100, max_len=1000),
    "100m": SyntheticConfig(num_users=1_000_000, num_items=1_000_000, num_clusters=200, mean_len=100,
                            max_len=1000),
}


def _world(cfg: SyntheticConfig) -> dict:
    """Everything shared by all users: popularity, clusters, successors, per-user lengths and clusters."""
    rng = np.random.default_rng([cfg.seed, 0])
    I = cfg.num_items
    pop = 1.0 / (rng.permutation(I) + 1.0) ** cfg.zipf
    pop /= pop.sum()
    item_cluster = rng.integers(0, cfg.num_clusters, size=I)
    order = np.argsort(item_cluster, kind="stable")
    bounds = np.searchsorted(item_cluster[order], np.arange(cfg.num_clusters + 1))
    cluster_items = [order[bounds[c]:bounds[c + 1]] for c in range(cfg.num_clusters)]
    cluster_cdfs = [np.cumsum(pop[ix]) / pop[ix].sum() for ix in cluster_items]
    succ = np.empty((I, cfg.successors), dtype=np.int64)
    for ix in cluster_items:  # loop over clusters, not events
        succ[ix] = ix[rng.integers(0, len(ix), size=(len(ix), cfg.successors))]
    lengths = np.clip(rng.geometric(1.0 / max(1, cfg.mean_len - cfg.min_len), size=cfg.num_users) + cfg.min_len,
                      cfg.min_len, cfg.max_len)
    return {"pop_cdf": np.cumsum(pop), "cluster_items": cluster_items, "cluster_cdfs": cluster_cdfs,
            "succ": succ, "user_cluster": rng.integers(0, cfg.num_clusters, size=cfg.num_users),
            "lengths": lengths}


def _simulate(cfg: SyntheticConfig, w: dict, users: np.ndarray, chunk: int):
    """Events of ``users`` (dense 0-based ids, one chunk) in user order: raw items, times, actions."""
    rng = np.random.default_rng([cfg.seed, 1 + chunk])
    U, I = len(users), cfg.num_items
    lengths = w["lengths"][users]
    by_len = np.argsort(-lengths, kind="stable")  # longest first: the users active at step t are a prefix
    sorted_len = lengths[by_len]
    clusters = w["user_cluster"][users][by_len]
    T = int(sorted_len[0])

    def sample_cluster(cl: np.ndarray) -> np.ndarray:
        out = np.empty(len(cl), dtype=np.int64)
        for c in np.unique(cl):  # loop over clusters
            sel = cl == c
            ix, cdf = w["cluster_items"][c], w["cluster_cdfs"][c]
            out[sel] = ix[np.minimum(np.searchsorted(cdf, rng.random(sel.sum())), len(ix) - 1)]
        return out

    seq = np.zeros((U, T), dtype=np.int64)
    strong = np.zeros((U, T), dtype=bool)
    seq[:, 0] = sample_cluster(clusters)
    for t in range(1, T):  # loop over positions, vectorised over the users still active
        n = int(np.searchsorted(-sorted_len, -t, side="left"))  # users with length > t
        r = rng.random(n)
        trans = r < cfg.p_transition
        clus = (~trans) & (r < cfg.p_transition + cfg.p_cluster)
        glob = ~(trans | clus)
        nxt = np.empty(n, dtype=np.int64)
        nxt[trans] = w["succ"][seq[:n][trans, t - 1], rng.integers(0, cfg.successors, size=int(trans.sum()))]
        nxt[clus] = sample_cluster(clusters[:n][clus])
        nxt[glob] = np.minimum(np.searchsorted(w["pop_cdf"], rng.random(int(glob.sum()))), I - 1)
        seq[:n, t] = nxt
        strong[:n, t] = trans

    unsort = np.argsort(by_len, kind="stable")
    seq, strong = seq[unsort], strong[unsort]
    valid = np.arange(T)[None, :] < lengths[:, None]
    rate = rng.lognormal(mean=np.log(3600.0), sigma=1.0, size=U)  # seconds between events per user
    start = cfg.start_time + rng.integers(0, 180 * 86400, size=U)
    times = (start[:, None] + np.cumsum(rng.exponential(1.0, size=(U, T)) * rate[:, None], axis=1)).astype(np.int64)
    a = rng.random((U, T))
    actions = np.where(a < 0.6, 1, np.where(a < 0.85, 2, np.where(a < 0.95, 3, 4)))
    actions = np.where(strong & (rng.random((U, T)) < 0.3), 4, actions)
    return seq[valid] + 1, times[valid], actions[valid].astype(np.int16)


def _chunks(cfg: SyntheticConfig):
    for c, start in enumerate(range(0, cfg.num_users, cfg.chunk_users)):
        yield c, np.arange(start, min(cfg.num_users, start + cfg.chunk_users))


def generate(cfg: SyntheticConfig = SyntheticConfig()) -> SequenceStore:
    """The whole log in memory (small and medium presets)."""
    w = _world(cfg)
    parts = [(users, *_simulate(cfg, w, users, c)) for c, users in _chunks(cfg)]
    users = np.concatenate([np.repeat(u + 1, w["lengths"][u]) for u, *_ in parts])  # raw user ids 1..U
    items, times, actions = (np.concatenate([p[i] for p in parts]) for i in (1, 2, 3))
    return build_store(users, items, times, actions, source={"format": "synthetic", "config": asdict(cfg)})


def generate_to(cfg: SyntheticConfig, out_dir: str | Path, overwrite: bool = False, progress: bool = False) -> Path:
    """Stream the log into a dataset directory chunk by chunk; memory stays bounded by one chunk.

    Writes the same dataset as ``generate(cfg).save(out_dir)``: events are already grouped by user and
    sorted by time, and items are renumbered densely (in raw id order) in a second, chunked pass.
    """
    from tqdm.auto import tqdm

    w = _world(cfg)
    offsets = np.zeros(cfg.num_users + 1, dtype=np.int64)
    np.cumsum(w["lengths"], out=offsets[1:])
    N = int(offsets[-1])
    with staging(out_dir, overwrite) as tmp:
        np.save(tmp / "offsets.npy", offsets)
        items = np.lib.format.open_memmap(tmp / "items.npy", mode="w+", dtype=np.int32, shape=(N,))
        times = np.lib.format.open_memmap(tmp / "timestamps.npy", mode="w+", dtype=np.int64, shape=(N,))
        actions = np.lib.format.open_memmap(tmp / "actions.npy", mode="w+", dtype=np.int16, shape=(N,))
        seen = np.zeros(cfg.num_items + 1, dtype=bool)
        chunks = list(_chunks(cfg))
        for c, users in tqdm(chunks, desc="simulate", disable=not progress):
            it, ti, ac = _simulate(cfg, w, users, c)
            rows = slice(offsets[users[0]], offsets[users[-1] + 1])
            items[rows], times[rows], actions[rows] = it, ti, ac
            seen[it] = True
        dense = np.cumsum(seen).astype(np.int32)  # raw item id -> dense id (1.. in raw id order)
        step = 1 << 24
        for s in tqdm(range(0, N, step), desc="renumber", disable=not progress):
            items[s:s + step] = dense[items[s:s + step]]
        for arr in (items, times, actions):
            arr.flush()
        del items, times, actions
        raw_actions = [str(a) for a in range(1, 5)]
        write_metadata(tmp, Vocab(np.arange(1, cfg.num_users + 1), start=0), Vocab(np.flatnonzero(seen), start=1),
                       offsets, {"source": {"format": "synthetic", "config": asdict(cfg)},
                                 "filters": {"dedup": "none", "min_user_count": 0, "min_item_count": 0,
                                             "rows_in": N, "rows_kept": N},
                                 "actions": raw_actions},
                       ["timestamps", "actions"])
    return Path(out_dir)
