"""End-to-end training on the tiny synthetic dataset: run artefacts, exact resume, checkpoints, quality."""

from __future__ import annotations

import json
import os

from pathlib import Path

import pytest
import torch

from genrec.config import load_config
from genrec.train.trainer import RunError, train

MODEL_KEYS = {
    "sasrec": {"ffn_dim": 32},
    "hstu": {"qk_dim": 16, "v_dim": 16},
    "bert4rec": {"ffn_dim": 32, "num_heads": 2, "mask_prob": 0.3},
    "mamba4rec": {"ffn_dim": 32, "d_state": 8, "head_dim": 8, "chunk_size": 8},
    "gru4rec": {"hidden_size": 32},
}


def tiny_config(data_dir, model="hstu", **train_overrides):
    raw = {
        "data": {"path": str(data_dir), "max_len": 20},
        "model": {"name": model, "dim": 16, "dropout": 0.1, **({} if model == "gru4rec" else {"num_blocks": 1}),
                  **MODEL_KEYS[model]},
        "loss": {"name": "sampled_softmax", "num_negatives": 32, "temperature": 0.1},
        "train": {"epochs": 3, "batch_size": 32, "eval_every": 1, "threads": 1, "lr": 5e-3, "patience": 0,
                  **train_overrides},
        "eval": {"ks": [10, 50]},
    }
    return load_config(base=raw)


def quiet(*args, **kwargs):
    pass


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def epoch_records(path):
    """Per-epoch records without wall-clock fields."""
    return {r["epoch"]: {k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")}
            for r in read_jsonl(path) if "epoch" in r}


@pytest.fixture(scope="module", params=["hstu", "sasrec"])
def full_run(request, tiny_data_dir, tmp_path_factory):
    """An uninterrupted 3-epoch run (run A of the resume test)."""
    run_dir = tmp_path_factory.mktemp("runs") / f"{request.param}-a"
    report = train(tiny_config(tiny_data_dir, request.param), run_dir, echo=quiet)
    return request.param, run_dir, report


def test_run_writes_all_artefacts(full_run):
    model, run_dir, report = full_run
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["best.pt", "config.toml", "last.pt", "metrics.jsonl", "report.json"]  # no temp files left
    assert load_config(run_dir / "config.toml").to_dict()["model"]["name"] == model
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["model"] == model
    assert set(on_disk["test"]) == {"hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr"}
    assert all(0.0 <= v <= 1.0 for v in on_disk["test"].values())
    assert "full ranking" in on_disk["protocol"] and "leave-one-out" in on_disk["protocol"]
    assert "history excluded" in on_disk["protocol"]
    assert on_disk["num_test_users"] == 200
    assert set(on_disk["popularity_test"]) == set(on_disk["test"])
    records = read_jsonl(run_dir / "metrics.jsonl")
    epochs = [r for r in records if "epoch" in r and not r.get("final")]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]  # 1-based, as printed
    assert all("valid" in r and r["steps"] == 7 and r["train_loss"] > 0 for r in epochs)
    assert records[-1]["final"] is True and records[-1]["test"] == on_disk["test"]
    # the test split is evaluated with the checkpoint that was best on validation
    best = max(epochs, key=lambda r: (r["valid"]["ndcg@10"], -r["epoch"]))
    assert on_disk["best_epoch"] == best["epoch"] and on_disk["valid"] == best["valid"]


def test_checkpoints_load_with_weights_only(full_run):
    model, run_dir, _ = full_run
    best = torch.load(run_dir / "best.pt", weights_only=True)
    last = torch.load(run_dir / "last.pt", weights_only=True)
    for ckpt in (best, last):
        assert ckpt["config"]["model"]["name"] == model
        assert "item_vocab" in ckpt and "item_embedding.weight" in ckpt["model"]
        assert ckpt["model"]["item_embedding.weight"].shape == (121, 16)
    assert last["state"]["epoch"] == 3
    assert {"optimizer", "rng"} <= set(last)
    assert best["epoch"] == json.loads((run_dir / "report.json").read_text())["best_epoch"]


def test_resume_equals_uninterrupted(full_run, tiny_data_dir, tmp_path):
    model, run_a, report_a = full_run
    run_b = tmp_path / "b"
    train(tiny_config(tiny_data_dir, model, epochs=1), run_b, echo=quiet)
    assert torch.load(run_b / "last.pt", weights_only=True)["state"]["epoch"] == 1
    report_b = train(tiny_config(tiny_data_dir, model, epochs=3), run_b, resume=True, echo=quiet)

    a = torch.load(run_a / "last.pt", weights_only=True)
    b = torch.load(run_b / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], atol=1e-6, rtol=0, msg=key)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], atol=1e-6, rtol=0)
    assert a["state"] == b["state"]
    assert epoch_records(run_b / "metrics.jsonl") == epoch_records(run_a / "metrics.jsonl")
    assert report_b == report_a
    assert json.loads((run_b / "report.json").read_text()) == json.loads((run_a / "report.json").read_text())


def test_refuses_non_empty_run_dir_without_resume(full_run, tiny_data_dir):
    model, run_dir, _ = full_run
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(RunError, match="resume"):
        train(tiny_config(tiny_data_dir, model), run_dir, echo=quiet)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # nothing already written is lost


def test_resume_errors(tiny_data_dir, tmp_path):
    with pytest.raises(RunError, match="last.pt"):
        train(tiny_config(tiny_data_dir), tmp_path / "nothing", resume=True, echo=quiet)
    run = tmp_path / "r"
    train(tiny_config(tiny_data_dir, epochs=1, max_steps_per_epoch=1), run, echo=quiet)
    with pytest.raises(RunError, match="config differs"):
        train(tiny_config(tiny_data_dir, epochs=2, max_steps_per_epoch=1, lr=1e-2), run, resume=True, echo=quiet)


def test_resume_a_run_from_before_a_config_key_existed(tiny_data_dir, tmp_path):
    """A run started by an older genrec lacks the keys added since: they take their defaults on resume."""
    from genrec.train.checkpoint import save_checkpoint

    run = tmp_path / "old"
    train(tiny_config(tiny_data_dir, epochs=1, max_steps_per_epoch=1), run, echo=quiet)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    del ckpt["config"]["data"]["train_on_valid"], ckpt["config"]["train"]["refit"]
    save_checkpoint(ckpt, run / "last.pt")
    report = train(tiny_config(tiny_data_dir, epochs=2, max_steps_per_epoch=1), run, resume=True, echo=quiet)
    assert report["best_epoch"] in (1, 2)
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if "epoch" in r] == [1, 2]


def test_early_stopping(tiny_data_dir, tmp_path):
    """lr ~ 0: validation never improves after the first evaluation, so patience 2 stops after 3 epochs."""
    run = tmp_path / "stop"
    report = train(tiny_config(tiny_data_dir, epochs=10, lr=1e-12, patience=2, max_steps_per_epoch=1), run,
                   echo=quiet)
    epochs = [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if "epoch" in r]
    assert epochs == [1, 2, 3]
    assert report["best_epoch"] == 1
    assert torch.load(run / "last.pt", weights_only=True)["state"]["stopped"] is True
    # a larger patience on resume lifts the stop: 3 more validations without gain (5 in all), then it stops again
    report = train(tiny_config(tiny_data_dir, epochs=10, lr=1e-12, patience=5, max_steps_per_epoch=1), run,
                   resume=True, echo=quiet)
    epochs = [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if "epoch" in r]
    assert epochs == [1, 2, 3, 4, 5, 6] and report["best_epoch"] == 1
    # the same patience again: the run is finished, resuming only returns its report
    again = train(tiny_config(tiny_data_dir, epochs=10, lr=1e-12, patience=5, max_steps_per_epoch=1), run,
                  resume=True, echo=quiet)
    assert again == report and len([r for r in read_jsonl(run / "metrics.jsonl") if "epoch" in r]) == 6


def test_continued_run_killed_midway_does_not_look_finished(tiny_data_dir, tmp_path):
    """A finished run continued for more epochs withdraws its old report.json: killed before the new end, the
    run must not pass for finished (benchmarks/reproduce.py would skip it with stale metrics)."""
    run = tmp_path / "continued"
    first = train(tiny_config(tiny_data_dir, epochs=1, max_steps_per_epoch=1), run, echo=quiet)

    def killed_after_epoch_2(line="", *args, **kwargs):
        if str(line).startswith("epoch   2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_data_dir, epochs=3, max_steps_per_epoch=1), run, resume=True, echo=killed_after_epoch_2)
    assert not (run / "report.json").exists()
    finals = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("final")]
    assert len(finals) == 1 and finals[0]["test"] == first["test"]  # the earlier report is not lost
    report = train(tiny_config(tiny_data_dir, epochs=3, max_steps_per_epoch=1), run, resume=True, echo=quiet)
    assert json.loads((run / "report.json").read_text()) == report
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if "epoch" in r] == [1, 2, 3]


@pytest.mark.parametrize("model", ["sasrec", "hstu", "bert4rec", "mamba4rec", "gru4rec"])
def test_learns_beyond_popularity(tiny_data_dir, tmp_path, model):
    # the cloze objective predicts 30 % of the positions per pass: BERT4Rec needs more epochs (as in its paper)
    options = {"epochs": 30, "lr": 1e-2} if model == "bert4rec" else {"epochs": 8}
    report = train(tiny_config(tiny_data_dir, model, **options), tmp_path / model, echo=quiet)
    pop = report["popularity_test"]["hr@10"]
    assert pop > 0.1  # a meaningful baseline on this data
    assert report["test"]["hr@10"] >= 2 * pop, report


@pytest.mark.parametrize("loss,split,model", [
    ("full_softmax", "leave_one_out", "hstu"),
    ("in_batch", "temporal", "sasrec"),
    ("bce", "leave_one_out", "sasrec"),
    ("sampled_softmax", "temporal", "hstu"),
])
def test_every_loss_and_split_trains(tiny_data_dir, tmp_path, loss, split, model):
    cfg = tiny_config(tiny_data_dir, model, epochs=1, max_steps_per_epoch=2)
    cfg.loss.name, cfg.data.split = loss, split
    report = train(cfg, tmp_path / "run", echo=quiet)
    record = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert record["steps"] == 2 and 0 < record["train_loss"] < 1e3
    assert record["tokens"] > 0
    assert ("temporal" in report["protocol"]) == (split == "temporal")
    assert 0 < report["num_test_users"] <= 200


def test_production_hstu_trains(tiny_data_dir, tmp_path):
    cfg = tiny_config(tiny_data_dir, "hstu", epochs=1, max_steps_per_epoch=2)
    for key in ("silu", "attn_scale", "attn_norm", "output", "ln_affine"):
        setattr(cfg.model, key, getattr(type(cfg.model).production(), key))
    train(cfg, tmp_path / "run", echo=quiet)
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]
    assert "layers.0.attn_norm.weight" in state and state["layers.0.out.weight"].shape == (16, 3 * 16)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from genrec.train import checkpoint as ck

    path = tmp_path / "x.pt"
    good = {"config": {}, "item_vocab": {}, "model": {"w": torch.ones(3)}}
    ck.save_checkpoint(good, path)

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError):
        ck.save_checkpoint({**good, "model": {"w": torch.zeros(3)}}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temp file left behind
    torch.testing.assert_close(ck.load_checkpoint(path)["model"]["w"], torch.ones(3))  # the old one survives
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "missing.pt")


def test_text_files_of_a_run_are_replaced_atomically(tmp_path, monkeypatch):
    from genrec.train import checkpoint as ck

    path = tmp_path / "report.json"
    ck.write_text_atomically(path, '{"old": 1}')
    real_write = Path.write_text

    def broken_write(self, text, *args, **kwargs):
        real_write(self, text[:3])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken_write)
    with pytest.raises(OSError):
        ck.write_text_atomically(path, '{"new": 2}')
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"] and path.read_text() == '{"old": 1}'
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as readable as a file written in place


def test_resume_with_a_smaller_patience_stops(tiny_data_dir, tmp_path):
    run = tmp_path / "r"
    train(tiny_config(tiny_data_dir, epochs=4, lr=1e-12, patience=0, max_steps_per_epoch=1), run, echo=quiet)
    report = train(tiny_config(tiny_data_dir, epochs=10, lr=1e-12, patience=2, max_steps_per_epoch=1), run,
                   resume=True, echo=quiet)  # 3 validations without gain already: nothing more to train
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if "epoch" in r] == [1, 2, 3, 4]
    assert report["best_epoch"] == 1


def test_damaged_checkpoints_give_clear_errors(tmp_path):
    from genrec.train import checkpoint as ck

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ck.CheckpointError, match="junk.pt is not a readable checkpoint"):
        ck.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ck.CheckpointError, match="not a genrec checkpoint"):
        ck.load_checkpoint(tmp_path / "other.pt")


def test_diverging_loss_stops_with_a_clear_error(tiny_data_dir, tmp_path, monkeypatch):
    from genrec.config import ConfigError
    from genrec.losses import Loss

    with pytest.raises(ConfigError, match="train.lr must be positive"):
        tiny_config(tiny_data_dir, lr=float("nan"))
    run = tmp_path / "nan"
    real_call = Loss.__call__
    monkeypatch.setattr(Loss, "__call__", lambda self, *a: real_call(self, *a) * float("nan"))
    with pytest.raises(RunError, match="loss became nan.*lower train.lr"):
        train(tiny_config(tiny_data_dir, epochs=1), run, echo=quiet)
    monkeypatch.undo()
    assert not (run / "best.pt").exists()
    # the directory of a run that never finished an epoch can be reused without --resume
    report = train(tiny_config(tiny_data_dir, epochs=1, max_steps_per_epoch=1), run, echo=quiet)
    assert report["best_epoch"] == 1


def test_resuming_a_finished_run_reports_without_retraining(full_run, tiny_data_dir):
    model, run_dir, _ = full_run
    before = (run_dir / "metrics.jsonl").read_text()
    report = train(tiny_config(tiny_data_dir, model), run_dir, resume=True, echo=quiet)
    assert report == json.loads((run_dir / "report.json").read_text())
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_run_setup_errors(tiny_data_dir, tmp_path):
    with pytest.raises(RunError, match="no CUDA device"):
        train(tiny_config(tiny_data_dir, epochs=1, device="cuda"), tmp_path / "gpu", echo=quiet)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    with pytest.raises(RunError, match="not a genrec run"):
        train(tiny_config(tiny_data_dir, epochs=1), tmp_path / "busy", echo=quiet)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep"


def test_no_evaluation_users_is_an_error_before_training(tmp_path):
    import numpy as np

    from genrec.data.ingest import build_store

    build_store(np.array([1, 1, 2, 2]), np.array([1, 2, 2, 1])).save(tmp_path / "short")
    with pytest.raises(RunError, match="at least 3 events"):
        train(tiny_config(tmp_path / "short", epochs=1), tmp_path / "run", echo=quiet)
    assert not (tmp_path / "run").exists()


def test_training_options_gradient_checkpointing_and_length_window(tiny_data_dir, tmp_path):
    base = train(tiny_config(tiny_data_dir, epochs=1, max_steps_per_epoch=3), tmp_path / "base", echo=quiet)
    ckpt = train(tiny_config(tiny_data_dir, epochs=1, max_steps_per_epoch=3, grad_checkpointing=True),
                 tmp_path / "ckpt", echo=quiet)
    assert ckpt["valid"] == pytest.approx(base["valid"], abs=1e-6)  # same math, recomputed
    bucketed = train(tiny_config(tiny_data_dir, epochs=1, length_window=4), tmp_path / "len", echo=quiet)
    assert bucketed["test"]["hr@10"] > 0


def test_bf16_autocast_trains_close_to_fp32(tiny_data_dir, tmp_path):
    fp32 = train(tiny_config(tiny_data_dir, epochs=1, max_steps_per_epoch=2), tmp_path / "fp32", echo=quiet)
    bf16 = train(tiny_config(tiny_data_dir, epochs=1, max_steps_per_epoch=2, precision="bf16"), tmp_path / "bf16",
                 echo=quiet)
    a = [json.loads(x) for x in (tmp_path / "fp32" / "metrics.jsonl").read_text().splitlines()][0]
    b = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()][0]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.02)  # bf16 rounding, same optimisation
    assert b["train_loss"] != a["train_loss"]  # autocast really ran in bf16
    assert bf16["valid"]["hr@10"] == pytest.approx(fp32["valid"]["hr@10"], abs=0.05)


def test_train_on_valid_trains_on_the_validation_events_and_tests_the_last_epoch(tiny_data_dir, tmp_path):
    from genrec.train.trainer import item_counts, load_data

    cfg = tiny_config(tiny_data_dir, epochs=2, max_steps_per_epoch=2)
    store, split = load_data(cfg)
    cfg.data.train_on_valid = True
    _, refit_split = load_data(cfg)
    valid_items = torch.bincount(torch.from_numpy(store.items[split.valid.target_rows].astype("int64")),
                                 minlength=store.num_items + 1)
    assert torch.equal(item_counts(store, refit_split), item_counts(store, split) + valid_items)

    report = train(cfg, tmp_path / "r", echo=quiet)
    records = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [r["epoch"] for r in records if "epoch" in r] == [1, 2]
    assert not any("valid" in r for r in records if "epoch" in r)  # nothing to validate on
    assert report["best_epoch"] == 2 and report["valid"] is None
    assert "validation events trained on" in report["protocol"]


def test_refit_after_selection(tiny_data_dir, tmp_path):
    """train.refit: a fresh model on train + validation events for the chosen epochs, tested once; the same
    as running that refit by hand; resumable when killed during the refit; toggled on for a finished run."""
    run = tmp_path / "run"
    report = train(tiny_config(tiny_data_dir, epochs=4, max_steps_per_epoch=2, refit=True), run, echo=quiet)
    chosen = report["best_epoch"]
    assert report["refit"]["epochs"] == chosen and "validation events trained on" in report["refit"]["protocol"]
    assert json.loads((run / "report.json").read_text()) == report
    by_hand = tiny_config(tiny_data_dir, epochs=chosen, max_steps_per_epoch=2)
    by_hand.data.train_on_valid = True
    alone = train(by_hand, tmp_path / "by-hand", echo=quiet)
    assert alone["test"] == report["refit"]["test"] and alone["test"] != report["test"]

    # a finished run resumed with refit on refits; killed during the refit, the next resume finishes it
    run2 = tmp_path / "run2"
    train(tiny_config(tiny_data_dir, epochs=4, max_steps_per_epoch=2), run2, echo=quiet)

    def killed_in_refit(line="", *args, **kwargs):
        if str(line).startswith("epoch   1") and (run2 / "refit" / "last.pt").exists():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_data_dir, epochs=4, max_steps_per_epoch=2, refit=True), run2, resume=True,
              echo=killed_in_refit)
    assert "refit" not in json.loads((run2 / "report.json").read_text())
    again = train(tiny_config(tiny_data_dir, epochs=4, max_steps_per_epoch=2, refit=True), run2, resume=True,
                  echo=quiet)
    assert again["refit"] == report["refit"]


def test_refit_needs_validation(tiny_data_dir):
    from genrec.config import ConfigError

    with pytest.raises(ConfigError, match="train.refit"):
        load_config(base={**tiny_config(tiny_data_dir, refit=True).to_dict(),
                          "data": {"path": str(tiny_data_dir), "train_on_valid": True}})


def test_refit_with_more_epochs_than_chosen_is_moved_aside(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    report = train(tiny_config(tiny_data_dir, epochs=2, max_steps_per_epoch=1), run, echo=quiet)
    longer = tiny_config(tiny_data_dir, epochs=report["best_epoch"] + 1, max_steps_per_epoch=1)
    longer.data.train_on_valid = True
    train(longer, run / "refit", echo=quiet)
    report = train(tiny_config(tiny_data_dir, epochs=2, max_steps_per_epoch=1, refit=True), run, resume=True,
                   echo=quiet)
    stale = run / f"refit.stale-{report['best_epoch'] + 1}"
    assert (stale / "last.pt").is_file() and (stale / "report.json").is_file()  # kept, not deleted
    assert report["refit"]["epochs"] == report["best_epoch"]
    assert [r["epoch"] for r in read_jsonl(run / "refit" / "metrics.jsonl") if "epoch" in r] == \
        list(range(1, report["best_epoch"] + 1))


def test_continuing_a_refit_run_continues_its_refit(tiny_data_dir, tmp_path):
    """More epochs for a run that refit: the choice can only move later, the refit resumes from its last
    epoch, and the result equals a fresh refit of the new length (the path the ML-1M presets take)."""
    run = tmp_path / "run"
    options = dict(max_steps_per_epoch=2, lr=2e-3, patience=0, refit=True)
    first = train(tiny_config(tiny_data_dir, epochs=2, **options), run, echo=quiet)
    later = train(tiny_config(tiny_data_dir, epochs=5, **options), run, resume=True, echo=quiet)
    assert later["best_epoch"] > first["best_epoch"]  # so that the refit really continues
    assert later["refit"]["epochs"] == later["best_epoch"]
    refit_epochs = [r["epoch"] for r in read_jsonl(run / "refit" / "metrics.jsonl") if "epoch" in r]
    assert refit_epochs == list(range(1, later["best_epoch"] + 1))  # continued, no epoch trained twice
    fresh = tiny_config(tiny_data_dir, epochs=later["best_epoch"], max_steps_per_epoch=2, lr=2e-3)
    fresh.data.train_on_valid = True
    alone = train(fresh, tmp_path / "fresh", echo=quiet)
    assert alone["test"] == pytest.approx(later["refit"]["test"], abs=1e-6)
    finals = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("final")]
    assert finals[-1]["refit"] == later["refit"]  # the refit is in metrics.jsonl too (reproduce.py reads it)


def test_train_on_valid_resumed_with_fewer_epochs_tests_its_last_epoch(tiny_data_dir, tmp_path):
    run = tmp_path / "r"
    cfg = tiny_config(tiny_data_dir, epochs=4, max_steps_per_epoch=1)
    cfg.data.train_on_valid = True

    def killed_after_epoch_3(line="", *args, **kwargs):
        if str(line).startswith("epoch   3"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, echo=killed_after_epoch_3)
    cfg.train.epochs = 2
    report = train(cfg, run, resume=True, echo=quiet)
    assert report["best_epoch"] == 3 and torch.load(run / "best.pt", weights_only=True)["epoch"] == 3


def test_refit_refuses_a_report_without_a_chosen_epoch(tiny_data_dir, tmp_path):
    from genrec.train.distributed import Dist
    from genrec.train.trainer import _refit

    with pytest.raises(RunError, match="best_epoch = -1"):
        _refit(tiny_config(tiny_data_dir, refit=True), tmp_path, {"best_epoch": -1}, False, quiet, Dist())
