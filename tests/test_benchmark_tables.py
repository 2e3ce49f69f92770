"""Tables of the benchmark scripts that summarise finished runs (benchmarks/precision.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import precision  # noqa: E402


def fake_run(out: Path, hrs: list[float], best: int, test_hr: float, seconds: float = 30.0) -> Path:
    out.mkdir(parents=True)
    lines = [{"epoch": e + 1, "seconds": seconds, "valid": {"hr@10": h, "ndcg@10": h / 2}} for e, h in enumerate(hrs)]
    lines.append({"final": True, "best_epoch": best})
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    test = {"hr@10": test_hr, "ndcg@10": test_hr / 2}
    (out / "report.json").write_text(json.dumps({"best_epoch": best, "test": test}))
    return out


def test_precision_table_compares_bf16_with_fp32_and_seed_noise(tmp_path):
    runs = {("fp32", 0): precision.read_run(fake_run(tmp_path / "a", [0.10, 0.20], 2, 0.19)),
            ("bf16", 0): precision.read_run(fake_run(tmp_path / "b", [0.10, 0.19], 2, 0.18, seconds=300.0)),
            ("fp32", 1): precision.read_run(fake_run(tmp_path / "c", [0.11, 0.21], 2, 0.20))}
    table = precision.format_table("configs/ml-100k/hstu.toml", 2, runs)
    assert "| 2 | 0.2000 / 0.1000 | 0.1900 / 0.0950 | 0.2100 / 0.1050 |" in table
    assert "0.1900 / 0.0950 (epoch 2)" in table and "10.0 min" in table  # bf16's test row and training time
    assert "0.1900 against 0.2000 (-5.0 %)" in table and "differ by 5.0 %" in table


def test_precision_runs_are_named_by_config_precision_seed_and_epochs():
    out = precision.run_dir("configs/ml-100k/hstu.toml", "bf16", 1, 10)
    assert out.name == "ml-100k-hstu-bf16-s1-e10" and out.parent.name == "precision"
