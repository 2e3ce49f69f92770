"""Two processes under torchrun (gloo, CPU) follow the single-process run on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from genrec.config import load_config
from genrec.train.trainer import train

# deterministic objective (full softmax) and no dropout: the only difference left is summation order
RAW = {
    "model": {"name": "hstu", "dim": 16, "num_blocks": 2, "num_heads": 2, "qk_dim": 8, "v_dim": 8,
              "dropout": 0.0, "linear_dropout": 0.0},
    "loss": {"name": "full_softmax", "temperature": 0.1},
    "train": {"epochs": 2, "batch_size": 32, "threads": 1, "lr": 3e-3, "eval_every": 1},
    "eval": {"ks": [10]},
}
TOLERANCE = 1e-5  # max |weight difference| after 2 epochs x 7 steps of AdamW (measured: 6e-8)


def config_file(tmp_path, data_dir):
    from genrec.config import dump_toml

    raw = {"data": {"path": str(data_dir), "max_len": 20}, **RAW}
    path = tmp_path / "ddp.toml"
    path.write_text(dump_toml(raw))
    return path, load_config(base=raw)


def test_two_processes_match_one(tiny_data_dir, tmp_path):
    path, cfg = config_file(tmp_path, tiny_data_dir)
    single = train(cfg, tmp_path / "single", echo=lambda *a, **k: None)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "genrec.cli", "train", str(path), "--out", str(tmp_path / "ddp")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x 2 processes" in res.stdout

    a = torch.load(tmp_path / "single" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    print(f"max |weight difference| single vs 2 processes: {diff:.2e}")
    assert diff < TOLERANCE, f"max weight difference {diff}"
    assert len(b["rng"]["torch_ranks"]) == 2
    ddp = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert ddp["best_epoch"] == single["best_epoch"]
    for k, v in single["test"].items():
        assert ddp["test"][k] == pytest.approx(v, abs=0.011), k  # a rank may move by one user near ties

    # resume under torchrun: 1 epoch, then resume to 2, equals the uninterrupted 2-process run
    short = tmp_path / "short.toml"
    short.write_text(path.read_text().replace("epochs = 2", "epochs = 1"))
    # (the resume also refits: rank 0 decides, both ranks train the refit, as one process does)
    for cfg_path, extra in ((short, []), (path, ["train.refit=true", "--resume"])):
        res = subprocess.run(cmd[:-3] + [str(cfg_path), "--out", str(tmp_path / "ddp-resumed"), *extra],
                             capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    c = torch.load(tmp_path / "ddp-resumed" / "last.pt", weights_only=True)
    for k in b["model"]:
        torch.testing.assert_close(c["model"][k], b["model"][k], atol=1e-6, rtol=0, msg=k)
    cfg.train.refit = True
    single_refit = train(cfg, tmp_path / "single", resume=True, echo=lambda *a, **k: None)["refit"]
    ddp_refit = json.loads((tmp_path / "ddp-resumed" / "report.json").read_text())["refit"]
    assert ddp_refit["epochs"] == single_refit["epochs"] == single["best_epoch"]
    ra = torch.load(tmp_path / "single" / "refit" / "last.pt", weights_only=True)
    rb = torch.load(tmp_path / "ddp-resumed" / "refit" / "last.pt", weights_only=True)
    assert len(rb["rng"]["torch_ranks"]) == 2
    assert max((ra["model"][k] - rb["model"][k]).abs().max().item() for k in ra["model"]) < TOLERANCE

    # the training loss logged by rank 0 is the global one
    la = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(la[:2], lb[:2]):
        assert rb["tokens"] == ra["tokens"]
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)


def test_ranks_split_the_global_batch(tiny_data_dir):
    from genrec.data.batches import TrainLoader
    from genrec.data.split import leave_one_out
    from genrec.data.store import SequenceStore

    store = SequenceStore.load(tiny_data_dir)
    split = leave_one_out(store)
    one = TrainLoader(store, split, 32, 20, seed=1).batches(0)
    two = [TrainLoader(store, split, 32, 20, seed=1, rank=r, world_size=2).batches(0) for r in range(2)]
    lengths = np.minimum(split.train_end - store.offsets[:-1] - 1, 20)  # training positions, capped at max_len
    for g, r0, r1 in zip(one, *two):
        assert list(g[0::2]) == list(r0) and list(g[1::2]) == list(r1)  # together: the single-process batch
        for rows in (g, r0, r1):
            assert np.all(np.diff(lengths[rows]) <= 0)  # longest first (no row permutation in attention)
