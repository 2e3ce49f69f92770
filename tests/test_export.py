"""genrec export: a torch.export program that a fresh process runs without genrec, equal to eager."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from genrec.cli import main
from genrec.infer.export import export_run
from genrec.infer.recommender import Recommender
from conftest import train_tiny

# runs in a fresh interpreter where importing genrec fails: only torch and the exported files
FRESH = r"""
import json, sys
sys.modules["genrec"] = None  # any import of genrec now raises ImportError
import torch
out, inputs_path, result_path = sys.argv[1:4]
program = torch.export.load(f"{out}/encoder.pt2").module()
items_table = torch.load(f"{out}/items.pt")
ids = json.load(open(f"{out}/item_ids.json"))
results = []
for inputs in torch.load(inputs_path):
    with torch.no_grad():
        q = program(*inputs)
    scores = q @ items_table.T
    scores[:, 0] = -float("inf")
    top = scores.topk(5).indices
    results.append({"queries": q, "top_ids": [[ids[i - 1] for i in row] for row in top.tolist()]})
torch.save(results, result_path)
print("genrec" in sys.modules and sys.modules["genrec"] is not None)
"""


@pytest.fixture(scope="module")
def sasrec_run(tiny_data_dir, tmp_path_factory):
    return train_tiny(tiny_data_dir, tmp_path_factory.mktemp("exp") / "sasrec",
                      {"name": "sasrec", "dim": 16, "num_blocks": 2, "num_heads": 2, "ffn_dim": 16}, epochs=1)


def _padded(rows: list[np.ndarray], L: int) -> torch.Tensor:
    out = np.zeros((len(rows), L), dtype=np.int64)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return torch.from_numpy(out)


@pytest.mark.parametrize("which", ["hstu_run", "sasrec_run"])
def test_exported_program_equals_eager_in_a_fresh_process(which, request, tmp_path):
    run = request.getfixturevalue(which)
    rec = Recommender.load(run)
    out = tmp_path / "export"
    info = export_run(run, out)
    assert {p.name for p in out.iterdir()} == {"encoder.pt2", "items.pt", "item_ids.json", "export.json"}
    assert json.loads((out / "export.json").read_text())["model"] == info["model"]
    g = np.random.default_rng(0)
    cases, wants = [], []
    for B, L in [(1, 1), (3, 7), (5, rec.max_len)]:  # dynamic batch and length, one-event histories included
        lengths = np.concatenate([[L], g.integers(1, L + 1, B - 1)])
        hist = [g.integers(1, len(rec.vocab) + 1, n) for n in lengths]
        times = [np.sort(g.integers(1_600_000_000, 1_700_000_000, n)) for n in lengths]
        query = np.array([t[-1] + 600 for t in times])
        inputs = [_padded(hist, L), torch.from_numpy(lengths)]
        if rec.uses_time:
            inputs += [_padded(times, L), torch.from_numpy(query)]
            wants.append(rec.encode(hist, times, query))
        else:
            wants.append(rec.encode(hist))
        cases.append(tuple(inputs))
    torch.save(cases, tmp_path / "inputs.pt")
    proc = subprocess.run([sys.executable, "-c", FRESH, str(out), str(tmp_path / "inputs.pt"), str(tmp_path / "res.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"  # genrec was never imported
    results = torch.load(tmp_path / "res.pt")
    for inputs, want, got in zip(cases, wants, results):
        torch.testing.assert_close(got["queries"], want, atol=1e-5, rtol=1e-5)
        # the same top items through the exported files as through the Recommender's table
        scores = want @ rec.item_table.T
        scores[:, 0] = -torch.inf
        assert got["top_ids"] == rec.vocab.to_raw(scores.topk(5).indices.numpy()).tolist()


def test_export_errors_and_cli(hstu_run, tiny_data_dir, tmp_path):
    out = tmp_path / "e"
    r = CliRunner().invoke(main, ["export", str(hstu_run), str(out)])
    assert r.exit_code == 0, r.output
    assert "encoder.pt2" in r.output and (out / "encoder.pt2").is_file()
    before = (out / "encoder.pt2").stat().st_mtime_ns
    r = CliRunner().invoke(main, ["export", str(hstu_run), str(out)])
    assert r.exit_code != 0 and "--overwrite" in r.output
    assert (out / "encoder.pt2").stat().st_mtime_ns == before  # the earlier export is untouched
    # a model without a static-shape path: a clear error, nothing written
    gru = train_tiny(tiny_data_dir, tmp_path / "gru", {"name": "gru4rec", "dim": 8}, epochs=1)
    with pytest.raises(ValueError, match="not exportable"):
        export_run(gru, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def _user_history(tiny_data_dir, u=0):
    from genrec.data.store import SequenceStore

    store = SequenceStore.load(tiny_data_dir)
    items = store.item_vocab.to_raw(store.user_items(u)).tolist()
    times = np.asarray(store.timestamps[store.offsets[u]:store.offsets[u + 1]]).tolist()
    return items, times


def test_single_history_encoder_is_used_for_lone_histories_only(hstu_run, tiny_data_dir, tmp_path):
    """Recommender.single_encoder (what `genrec serve --compile` plugs in) answers batches of one history,
    with the eager results; here it is the exported program, uncompiled (the compiled one: slow test)."""
    rec = Recommender.load(hstu_run)
    items, times = _user_history(tiny_data_dir)
    opts = dict(timestamps=[times], query_time=times[-1] + 60)
    (want,) = rec.recommend([items], k=10, **opts)
    export_run(hstu_run, tmp_path / "e")
    program, calls = torch.export.load(tmp_path / "e" / "encoder.pt2").module(), []
    rec.single_encoder = lambda *a: calls.append(a) or program(*a)
    (got,) = rec.recommend([items], k=10, **opts)
    assert len(calls) == 1 and got.items == want.items
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)
    rec.recommend([items, items[:5]], k=10, timestamps=[times, times[:5]])  # two histories: eager
    with pytest.warns(UserWarning, match="time bias"):
        rec.recommend([items], k=10)  # a time model without timestamps: eager (the program needs them)
    assert len(calls) == 1


@pytest.mark.slow  # an AOTInductor build (C++ compile, about a minute); the test above covers the serving path
def test_compiled_encoder_equals_eager(hstu_run, tiny_data_dir, tmp_path):
    import shutil

    from genrec.infer.export import compiled_encoder

    run = tmp_path / "run"
    shutil.copytree(hstu_run, run)
    rec = Recommender.load(run)
    items, times = _user_history(tiny_data_dir)
    (want,) = rec.recommend([items], k=10, timestamps=[times], query_time=times[-1] + 60)
    rec.single_encoder = compiled_encoder(run, echo=lambda *a: None)
    assert len(list((run / "compiled").iterdir())) == 1
    (got,) = rec.recommend([items], k=10, timestamps=[times], query_time=times[-1] + 60)
    assert got.items == want.items
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4)


@pytest.mark.parametrize("which", ["hstu_run", "sasrec_run"])
def test_onnx_export_equals_eager_in_onnxruntime(which, request, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="ONNX export is optional: pip install 'genrec[onnx]'")
    from genrec.infer.export import UserEncoder, example_inputs

    run = request.getfixturevalue(which)
    info = export_run(run, tmp_path / "e", onnx=True)
    rec = Recommender.load(run)
    session = ort.InferenceSession(str(tmp_path / "e" / "encoder.onnx"))
    for B, L in [(1, 1), (4, 9), (2, rec.max_len)]:
        inputs = example_inputs(rec, B, L)
        with torch.no_grad():
            want = UserEncoder(rec).eval()(*inputs)
        (got,) = session.run(None, {n: x.numpy() for n, x in zip(info["inputs"], inputs)})
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)


def test_overwrite_replaces_the_export_whole(hstu_run, tmp_path):
    out = tmp_path / "e"
    export_run(hstu_run, out)
    (out / "stale.txt").write_text("from before")
    export_run(hstu_run, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "encoder.pt2").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no temporary or replaced directory left behind
