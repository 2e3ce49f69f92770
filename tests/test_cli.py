"""CLI smoke tests: every command end to end on tiny data, plus the errors users hit first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from genrec.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.dim=16", "model.num_blocks=1", "data.max_len=20", "train.epochs=2", "train.batch_size=64",
        "train.threads=1", "loss.num_negatives=16", "eval.ks=[5,10]"]


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "data"
    res = run("prepare", "synthetic", "tiny", out)
    assert "prepared" in res.output
    return out


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    res = run("train", REPO / "configs/synthetic/hstu.toml", f'data.path="{tiny_dataset}"', *TINY, "--out", run_dir)
    assert "protocol:" in res.output and "popularity" in res.output
    return run_dir


def test_help_lists_commands():
    out = run("--help").output
    for cmd in ("prepare", "stats", "train", "evaluate", "recommend", "demo"):
        assert cmd in out
    assert "FORMAT" in run("prepare", "--help").output


def test_stats_json_counts(tiny_dataset):
    stats = json.loads(run("stats", tiny_dataset, "--json").output)
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    assert stats["users"] == manifest["counts"]["users"] == 200
    assert stats["interactions"] == manifest["counts"]["interactions"]
    assert stats["length_percentiles"]["min"] >= 8
    assert "history length" in run("stats", tiny_dataset).output


def test_prepare_table_csv(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("uid,iid,ts\nu1,a,3\nu1,b,1\nu2,a,2\nu2,c,5\nu2,b,4\n")
    out = tmp_path / "ds"
    run("prepare", "table", csv, out, "--user-col", "uid", "--item-col", "iid", "--time-col", "ts")
    stats = json.loads(run("stats", out, "--json").output)
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 3, 5)


def test_prepare_errors_are_clear(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("uid,iid\nu1,a\n")
    res = run("prepare", "table", csv, tmp_path / "out", ok=False)
    assert res.exit_code != 0 and "no column 'user'" in res.output and "--user-col" in res.output
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    res = run("prepare", "table", empty, tmp_path / "out2", ok=False)
    assert res.exit_code != 0 and "empty" in res.output


def test_prepare_refuses_to_overwrite(tiny_dataset):
    before = (tiny_dataset / "items.npy").read_bytes()
    res = run("prepare", "synthetic", "tiny", tiny_dataset, ok=False)
    assert res.exit_code != 0 and "already exists" in res.output
    assert (tiny_dataset / "items.npy").read_bytes() == before


def test_train_evaluate_recommend(trained_run, tiny_dataset):
    for name in ("config.toml", "metrics.jsonl", "best.pt", "last.pt", "report.json"):
        assert (trained_run / name).is_file()
    report = json.loads((trained_run / "report.json").read_text())

    res = json.loads(run("evaluate", trained_run, "--json").output)
    assert res["split"] == "test" and "full ranking" in res["protocol"]
    assert res["metrics"]["hr@10"] == pytest.approx(report["test"]["hr@10"])
    valid = json.loads(run("evaluate", trained_run, "--split", "valid", "--json").output)
    assert valid["metrics"]["ndcg@10"] == pytest.approx(report["valid"]["ndcg@10"])
    assert "protocol:" in run("evaluate", trained_run).output

    from genrec.data.store import SequenceStore

    store = SequenceStore.load(tiny_dataset)
    history = [str(x) for x in store.item_vocab.to_raw(store.user_items(0)[:5])]
    out = json.loads(run("recommend", trained_run, "--history", ",".join(history), "-k", "7", "--json").stdout)
    assert len(out["items"]) == 7 and out["unknown"] == 0
    assert not set(map(str, out["items"])) & set(history)  # seen items excluded
    assert out["scores"] == sorted(out["scores"], reverse=True)
    out = json.loads(run("recommend", trained_run, "--history", "no-such-item," + history[0], "--json").stdout)
    assert out["unknown"] == 1 and len(out["items"]) == 10
    out = json.loads(run("recommend", trained_run, "--history", "no-such-item", "--json").stdout)
    assert out["fallback"] is True and len(out["items"]) == 10
    # a time-aware model without timestamps says so; with them it does not
    res = run("recommend", trained_run, "--history", ",".join(history))
    assert "note:" in res.stderr and "time bias" in res.stderr
    times = ",".join(str(int(t)) for t in store.timestamps[store.offsets[0]:store.offsets[0] + 5])
    res = run("recommend", trained_run, "--history", ",".join(history), "--timestamps", times, "--at", "1700000000")
    assert "note:" not in res.stderr and len(res.stdout.splitlines()) == 10
    res = run("recommend", trained_run, "--history", ",".join(history), "--timestamps", "1,2", ok=False)
    assert res.exit_code != 0 and "one time per history item" in res.output


def test_train_config_errors(tiny_dataset, tmp_path):
    cfg = REPO / "configs/synthetic/sasrec.toml"
    res = run("train", cfg, "train.epoch=3", "--out", tmp_path / "r1", ok=False)
    assert res.exit_code != 0 and "unknown key train.epoch" in res.output and "epochs" in res.output
    res = run("train", cfg, 'train.epochs="ten"', "--out", tmp_path / "r2", ok=False)
    assert res.exit_code != 0 and "train.epochs" in res.output and "integer" in res.output
    res = run("train", cfg, "data.path=/nonexistent", "--out", tmp_path / "r3", ok=False)
    assert res.exit_code != 0 and "not a prepared dataset" in res.output
    res = run("train", tmp_path / "missing.toml", "--out", tmp_path / "r4", ok=False)
    assert res.exit_code != 0 and "not found" in res.output


def test_train_refuses_existing_run_and_resumes(trained_run, tiny_dataset):
    cfg = REPO / "configs/synthetic/hstu.toml"
    before = (trained_run / "best.pt").read_bytes()
    res = run("train", cfg, f'data.path="{tiny_dataset}"', *TINY, "--out", trained_run, ok=False)
    assert res.exit_code != 0 and "--resume" in res.output
    assert (trained_run / "best.pt").read_bytes() == before
    res = run("train", cfg, f'data.path="{tiny_dataset}"', *TINY, "--out", trained_run, "--resume")
    assert "protocol:" in res.output  # already finished: resume re-reports without training more
    assert (trained_run / "best.pt").read_bytes() == before


def test_train_refit_and_train_on_valid_reports(tiny_dataset, tmp_path):
    cfg = REPO / "configs/synthetic/hstu.toml"
    tiny = [a for a in TINY if not a.startswith("train.epochs")] + ["train.epochs=1"]
    res = run("train", cfg, f'data.path="{tiny_dataset}"', *tiny, "train.refit=true", "--out", tmp_path / "r")
    assert "hstu refit" in res.output and "refit: a fresh model trained 1 epochs" in res.output
    assert (tmp_path / "r" / "refit" / "best.pt").is_file()
    res = run("train", cfg, f'data.path="{tiny_dataset}"', *tiny, "data.train_on_valid=true", "--out", tmp_path / "v")
    assert "epoch 1 tested (no validation)" in res.output and "validation events trained on" in res.output
    res = run("evaluate", tmp_path / "v", "--split", "valid", ok=False)
    assert res.exit_code != 0 and "no validation split" in res.output and "--split test" in res.output
    assert "hr@10" in run("evaluate", tmp_path / "v", "--split", "test").output.lower()


def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    res = run("demo", "--out", tmp_path / "demo", "--epochs", "1")
    out = res.output
    assert "protocol:" in out and "popularity" in out and "example recommendations" in out
    for name in ("sasrec", "hstu"):
        assert (tmp_path / "demo" / name / "report.json").is_file()


def test_prepare_refuses_out_containing_input(tmp_path):
    (tmp_path / "in").mkdir()
    seq = tmp_path / "in" / "seq.txt"
    seq.write_text("1 2 3\n2 3 4\n")
    res = run("prepare", "s3rec", seq, tmp_path / "in", "--overwrite", ok=False)
    assert res.exit_code != 0
    assert seq.read_text() == "1 2 3\n2 3 4\n"


def test_prepare_download_offline_is_a_clear_error(tmp_path, monkeypatch):
    from genrec.data import datasets

    monkeypatch.setattr(datasets, "GROUPLENS_URL", "http://127.0.0.1:9/{name}.zip")
    res = run("prepare", "grouplens", "ml-1m", tmp_path / "out", "--download", ok=False)
    assert res.exit_code != 0 and "offline" in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []  # no dataset and no empty download cache left behind
