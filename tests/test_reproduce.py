"""benchmarks/reproduce.py: row selection, the results table from finished runs, and resumable commands."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import reproduce  # noqa: E402


def fake_run(out: Path, hr: float, epochs: int = 5, best: int = 4, wall: float = 120.0) -> None:
    out.mkdir(parents=True)
    test = {m: hr / (2 if "ndcg" in m else 1) for m in reproduce.METRICS}
    (out / "report.json").write_text(json.dumps({"test": test, "best_epoch": best,
                                                 "popularity_test": {"hr@10": 0.01}}))
    (out / "metrics.jsonl").write_text("\n".join(json.dumps({"epoch": e}) for e in range(1, epochs + 1)))
    (out / "wall.json").write_text(json.dumps({"seconds": wall, "command": "genrec train x"}))


@pytest.fixture(autouse=True)
def no_archive_or_table(tmp_path, monkeypatch):
    """Keep the tests away from the committed archive and RESULTS.md (they read and write their own)."""
    monkeypatch.setattr(reproduce, "ARCHIVE", tmp_path / "archive")
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "RESULTS.md")


def only_row(row: reproduce.Row, tmp_path: Path, monkeypatch) -> Path:
    """Make ``row`` the table's only row, with its runs under tmp_path; returns its seed-0 run directory."""
    monkeypatch.setattr(reproduce, "RUNS", tmp_path)
    monkeypatch.setattr(reproduce, "ROWS", [row])
    return reproduce.run_dir(row, 0)


def test_every_row_has_a_loadable_preset():
    from genrec.config import load_config

    root = Path(reproduce.REPO)
    for row in reproduce.ROWS:
        assert row.dataset in reproduce.DATASETS
        load_config(root / row.config)  # exists and validates


def test_select_rows():
    assert [r.key for r in reproduce.select(["lastfm/sasrec"])] == ["lastfm/sasrec"]
    assert {r.dataset for r in reproduce.select(["beauty"])} == {"beauty"}
    assert reproduce.select(["all"]) == reproduce.ROWS
    with pytest.raises(SystemExit, match="unknown row"):
        reproduce.select(["nope/model"])


def test_table_reports_mean_std_targets_and_missing_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "RUNS", tmp_path)
    rows = [reproduce.Row("lastfm", "sasrec", (0.0688, 0.0390), "S3-Rec paper", ">= published", seeds=[0, 1, 2]),
            reproduce.Row("beauty", "sasrec", (0.0605, 0.0318), "S3-Rec paper", ">= published"),
            reproduce.Row("beauty", "gru4rec"),
            reproduce.Row("lastfm", "hstu", (0.0807, 0.0435), "BSARec (aim)", "above our best SASRec; aim", seeds=[0]),
            reproduce.Row("beauty", "hstu", (0.1008, 0.0611), "BSARec (aim)", "above our best SASRec; aim")]
    monkeypatch.setattr(reproduce, "ROWS", rows)
    for seed, hr in zip([0, 1, 2], [0.07, 0.08, 0.09]):
        fake_run(reproduce.run_dir(rows[0], seed), hr)
    fake_run(reproduce.run_dir(rows[1], 0), 0.05)
    fake_run(reproduce.run_dir(rows[3], 0), 0.072)  # HSTU below the LastFM SASRec mean 0.08
    fake_run(reproduce.run_dir(rows[4], 0), 0.06)  # HSTU above the Beauty SASRec 0.05
    text = reproduce.table()
    lines = [line for line in text.splitlines() if line.startswith("| lastfm") or line.startswith("| beauty")]
    lastfm, beauty, gru, lastfm_hstu, beauty_hstu = lines
    assert "above our SASRec (0.0800 / 0.0400): MISSED by 10.0 % (HR@10)" in lastfm_hstu
    assert "above our SASRec (0.0500 / 0.0250): met" in beauty_hstu
    assert "0.0800 ± 0.0100" in lastfm and "| met |" in lastfm  # mean 0.08 >= 0.0688, ndcg 0.04 >= 0.039
    assert "5, 5, 5 (4, 4, 4)" in lastfm and "6 min" in lastfm  # epochs (best) and summed wall time
    assert "MISSED by 17.4 %" in beauty  # 0.05 vs 0.0605
    assert "not run yet (0/1 seeds)" in gru


def test_train_command_resumes_and_caps_epochs():
    row = reproduce.Row("lastfm", "hstu")
    cmd = reproduce.train_command(row, 2, 30, resume=True)
    assert cmd[:4] == ["genrec", "train", "configs/lastfm/hstu.toml", "train.seed=2"]
    assert "train.epochs=30" in cmd and cmd[-1] == "--resume"
    assert cmd[cmd.index("--out") + 1].endswith("lastfm-hstu/seed2")


def test_finished_runs_continue_when_the_preset_asks_for_more(tmp_path, monkeypatch):
    preset = tmp_path / "configs" / "x" / "m.toml"
    preset.parent.mkdir(parents=True)
    monkeypatch.setattr(reproduce, "REPO", tmp_path)
    row = reproduce.Row("x", "m")
    out = tmp_path / "run"
    out.mkdir()

    def state(run_epochs, run_patience, preset_epochs, preset_patience, cap=None):
        def toml(epochs, patience):
            return '[model]\nname = "sasrec"\n[train]\n' + (f"epochs = {epochs}\n" if epochs else "") + (
                f"patience = {patience}\n" if patience is not None else "")
        (out / "config.toml").write_text(toml(run_epochs, run_patience))
        preset.write_text(toml(preset_epochs, preset_patience))
        return reproduce._preset_asks_more(row, out, cap)

    from genrec.config import TrainConfig

    assert not state(101, 0, 101, 0)
    default = TrainConfig().patience
    assert state(101, default + 5, 101, None) and not state(101, default, 101, None)  # a preset without patience
    assert state(101, 0, 200, 0)  # more epochs
    assert state(200, 20, 200, 50)  # another patience (lifts an early stop)
    assert not state(200, 0, 101, 0)  # fewer epochs than the run had: nothing to do
    assert state(30, 0, 200, 0, cap=50) and not state(50, 0, 200, 0, cap=50)  # --epochs N sets train.epochs
    # a preset that refits: a finished run without a refit in its report continues (the resume refits)
    (out / "report.json").write_text(json.dumps({"best_epoch": 3}))
    (out / "config.toml").write_text('[model]\nname = "sasrec"\n[train]\nepochs = 5\n')
    preset.write_text('[model]\nname = "sasrec"\n[train]\nepochs = 5\nrefit = true\n')
    assert reproduce._preset_asks_more(row, out, None)
    (out / "report.json").write_text(json.dumps({"best_epoch": 3, "refit": {"epochs": 3}}))
    assert not reproduce._preset_asks_more(row, out, None)


def test_table_adds_a_refit_line(tmp_path, monkeypatch):
    out = only_row(reproduce.Row("ml-1m", "hstu", (0.3097, 0.1720), "HSTU paper", ">= published"), tmp_path,
                   monkeypatch)
    fake_run(out, 0.30, epochs=101, best=90)
    report = json.loads((out / "report.json").read_text())
    report["refit"] = {"epochs": 90, "test": {m: 0.36 / (2 if "ndcg" in m else 1) for m in reproduce.METRICS},
                       "popularity_test": {"hr@10": 0.02}}
    (out / "report.json").write_text(json.dumps(report))
    held_out, refit = [line for line in reproduce.table().splitlines() if line.startswith("| ml-1m")]
    assert "| hstu |" in held_out and "MISSED by 3.1 %" in held_out and "101 (90)" in held_out
    assert "| hstu (refit) |" in refit and "| 0.3600 | 0.1800 |" in refit and "| met |" in refit
    assert "| 90 |" in refit and "training + validation events" in refit


def test_rows_still_running_show_their_finished_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "RUNS", tmp_path)
    rows = [reproduce.Row("beauty", "sasrec", (0.0605, 0.0318), "S3-Rec paper", ">= published", seeds=[0, 1, 2]),
            reproduce.Row("beauty", "hstu", (0.1008, 0.0611), "BSARec (aim)", "above our best SASRec; aim",
                          seeds=[0, 1, 2])]
    monkeypatch.setattr(reproduce, "ROWS", rows)
    fake_run(reproduce.run_dir(rows[0], 0), 0.09)
    fake_run(reproduce.run_dir(rows[0], 2), 0.07)
    (reproduce.run_dir(rows[0], 1)).mkdir(parents=True)  # started, not finished
    fake_run(reproduce.run_dir(rows[1], 1), 0.085)
    sasrec, hstu = [line for line in reproduce.table().splitlines() if line.startswith("| beauty")]
    assert "0.0800 ± 0.0141" in sasrec and "so far: met" in sasrec and "seeds done: 0, 2 of 3" in sasrec
    assert "so far: above our SASRec (0.0800 / 0.0400, 2/3 seeds): met" in hstu and "seeds done: 1 of 3" in hstu


def test_wall_time_is_recorded_while_a_run_is_going(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "REPO", tmp_path)
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(reproduce, "ensure_dataset", lambda name: None)
    row = reproduce.Row("lastfm", "gru4rec")
    out = reproduce.run_dir(row, 0)
    out.mkdir(parents=True)
    (out / "wall.json").write_text(json.dumps({"seconds": 100.0, "command": "x"}))  # an earlier, killed part
    seen = []

    class FakeRun:  # a training process that is still going at the first check and then ends
        def __init__(self, cmd, cwd):
            self.checks = 0

        def wait(self, timeout):
            self.checks += 1
            if self.checks == 1:
                raise reproduce.subprocess.TimeoutExpired("genrec", timeout)
            seen.append(json.loads((out / "wall.json").read_text()))  # written before the end
            return 0

    monkeypatch.setattr(reproduce.subprocess, "Popen", FakeRun)
    reproduce.run_row(row, None)
    final = json.loads((out / "wall.json").read_text())
    assert seen and seen[0]["command"] != "x" and 100.0 < seen[0]["seconds"] <= final["seconds"] < 160.0
    assert final["command"].startswith("genrec train configs/lastfm/gru4rec.toml")


def test_a_run_being_continued_shows_its_last_report(tmp_path, monkeypatch):
    out = only_row(reproduce.Row("ml-1m", "sasrec", (0.2853, 0.1603), "HSTU paper", ">= published"), tmp_path,
                   monkeypatch)
    fake_run(out, 0.28, epochs=101, best=101)
    report = json.loads((out / "report.json").read_text())
    (out / "report.json").unlink()  # withdrawn: the run continues towards more epochs
    with open(out / "metrics.jsonl", "a") as f:
        f.write("\n" + json.dumps({"final": True, **report}) + "\n" + json.dumps({"epoch": 102}) + "\n")
    (line,) = [x for x in reproduce.table().splitlines() if x.startswith("| ml-1m")]
    assert "| 0.2800 |" in line and "so far: MISSED by 1.9 %" in line and "| 101 (101) |" in line
    assert "seed 0 continuing" in line
    # the refit of the earlier end is in its final record; a line cut short by a kill is skipped
    refit = {"epochs": 101, "test": {m: 0.30 for m in reproduce.METRICS}, "popularity_test": {"hr@10": 0.02}}
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"final": True, **report, "refit": refit}) + "\n" + json.dumps({"epoch": 103}) + "\n")
        f.write('{"epoch": 104, "train_lo')
    held_out, refit_line = [x for x in reproduce.table().splitlines() if x.startswith("| ml-1m")]
    assert "seed 0 continuing" in held_out and "| sasrec (refit) | 0.3000 |" in refit_line
    assert "so far: met" in refit_line


def test_refit_line_of_a_row_with_some_seeds_refit(tmp_path, monkeypatch):
    row = reproduce.Row("beauty", "sasrec", (0.0605, 0.0318), "S3-Rec paper", ">= published", seeds=[0, 1])
    only_row(row, tmp_path, monkeypatch)
    for seed in (0, 1):
        fake_run(reproduce.run_dir(row, seed), 0.09)
    path = reproduce.run_dir(row, 1) / "report.json"
    report = json.loads(path.read_text())
    path.write_text(json.dumps({**report, "refit": {"epochs": 4, "test": {m: 0.1 for m in reproduce.METRICS},
                                                    "popularity_test": {"hr@10": 0.01}}}))
    held_out, refit = [x for x in reproduce.table().splitlines() if x.startswith("| beauty")]
    assert "| met |" in held_out and "so far: met" in refit and "1 of 2 seeds refit so far" in refit


def test_finished_seeds_are_archived_and_the_table_reads_them_when_runs_are_gone(tmp_path, monkeypatch):
    row = reproduce.Row("beauty", "sasrec", (0.0605, 0.0318), "S3-Rec paper", ">= published", seeds=[0, 1])
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(reproduce, "ROWS", [row])
    fake_run(reproduce.run_dir(row, 0), 0.09)
    (reproduce.run_dir(row, 1)).mkdir(parents=True)  # started, not finished: nothing to archive
    assert reproduce.archive(row, 0) and not reproduce.archive(row, 1)
    kept = reproduce.archive_dir(row, 0)
    assert sorted(p.name for p in kept.iterdir()) == ["metrics.jsonl", "report.json", "wall.json"]
    assert not any(p.suffix == ".pt" for p in kept.iterdir())
    before = reproduce.table()
    shutil.rmtree(tmp_path / "runs")  # a new machine: runs/ is gone, the archive is committed
    assert reproduce.table() == before and "| 0.0900 |" in before and "seeds done: 0 of 2" in before
    assert reproduce.seed_done(row, 0) and not reproduce.seed_done(row, 1)
    fake_run(reproduce.run_dir(row, 0), 0.095)  # a newer finished run here wins over the archived copy
    assert "| 0.0950 |" in reproduce.table()
    # that run continued here (more epochs): its report withdrawn, its last one in metrics.jsonl
    out = reproduce.run_dir(row, 0)
    report = json.loads((out / "report.json").read_text())
    (out / "report.json").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write("\n" + json.dumps({"final": True, **report}) + "\n" + json.dumps({"epoch": 6}) + "\n")
    line = reproduce.table()
    assert "| 0.0950 |" in line and "seed 0 continuing" in line and "so far" in line
    assert not reproduce.seed_done(row, 0)


def test_rows_without_runs_or_archive_keep_their_previous_line(tmp_path, monkeypatch):
    rows = [reproduce.Row("beauty", "sasrec", (0.0605, 0.0318), "S3-Rec paper", ">= published"),
            reproduce.Row("ml-1m", "hstu", (0.3097, 0.1720), "HSTU paper", ">= published"),
            reproduce.Row("beauty", "hstu", (0.1008, 0.0611), "BSARec (aim)", "above our best SASRec; aim"),
            reproduce.Row("beauty", "gru4rec")]
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(reproduce, "ROWS", rows)
    old_sasrec = "| beauty | sasrec | 0.0935 ± 0.0008 | 0.0570 ± 0.0002 | x | kept from before |"
    old_hstu = "| ml-1m | hstu | 0.2992 | 0.1715 | held out |"
    old_refit = "| ml-1m | hstu (refit) | 0.2998 | 0.1707 | refit |"
    (tmp_path / "RESULTS.md").write_text("# Results\n\n<!-- reproduce:start -->\n## Reproduction\n\n| dataset | model |"
                                         f"\n|---|---|\n{old_sasrec}\n{old_hstu}\n{old_refit}\n"
                                         "| beauty | gru4rec | not run yet (0/1 seeds) | |\n<!-- reproduce:end -->\n")
    fake_run(reproduce.run_dir(rows[2], 0), 0.092)  # below the kept SASRec line's mean
    lines = [x for x in reproduce.table().splitlines() if x.startswith("| beauty") or x.startswith("| ml-1m")]
    assert lines[:3] == [old_sasrec, old_hstu, old_refit]
    assert "above our SASRec (0.0935 / 0.0570): MISSED by 1.6 % (HR@10)" in lines[3]
    assert "not run yet (0/1 seeds)" in lines[4]
