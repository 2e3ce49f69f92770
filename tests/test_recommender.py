"""Recommender: raw ids in and out, and the same query vectors as evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrec.data.batches import eval_batch
from genrec.data.split import leave_one_out
from genrec.data.store import SequenceStore
from genrec.eval.ranking import last_hidden
from genrec.infer.recommender import Recommender

from conftest import train_tiny


def test_queries_equal_evaluation_queries(hstu_run, tiny_data_dir):
    """With the history's timestamps and the target's time, recommend() scores exactly as evaluate() ranks."""
    store = SequenceStore.load(tiny_data_dir)
    split = leave_one_out(store)
    rec = Recommender.load(hstu_run)
    users, rows = split.test.users[:20], split.test.target_rows[:20]
    batch = eval_batch(store, users, rows, rec.max_len)
    with torch.no_grad():
        want = last_hidden(rec.model, rec.scorer)(batch)
    hist = [np.asarray(store.items[max(store.offsets[u], r - rec.max_len):r]) for u, r in zip(users, rows)]
    times = [np.asarray(store.timestamps[max(store.offsets[u], r - rec.max_len):r]) for u, r in zip(users, rows)]
    got = rec.encode(hist, times, np.asarray(store.timestamps[rows]))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the time matters: another query time gives another query
    other = rec.encode(hist, times, np.asarray(store.timestamps[rows]) + 10**7)
    assert not torch.allclose(other, want, atol=1e-4)


@pytest.mark.parametrize("model", [
    {"name": "sasrec", "dim": 16, "num_blocks": 1, "num_heads": 2, "ffn_dim": 16},
    {"name": "bert4rec", "dim": 16, "num_blocks": 1, "num_heads": 2, "ffn_dim": 16},
    {"name": "mamba4rec", "dim": 16, "num_blocks": 1, "d_state": 4, "head_dim": 8, "ffn_dim": 16},
    {"name": "gru4rec", "dim": 16, "hidden_size": 16},
], ids=lambda m: m["name"])
def test_every_model_recommends_with_the_evaluation_queries(model, tiny_data_dir, tmp_path):
    """Histories of mixed lengths, some cut at max_len: the Recommender's queries (its own batching,
    longest first) equal evaluation's, for the models other than HSTU too, and top-k comes back."""
    run = train_tiny(tiny_data_dir, tmp_path / model["name"], model, epochs=1)
    store = SequenceStore.load(tiny_data_dir)
    split = leave_one_out(store)
    rec = Recommender.load(run)
    users, rows = split.test.users[:40], split.test.target_rows[:40]
    with torch.no_grad():
        want = last_hidden(rec.model, rec.scorer)(eval_batch(store, users, rows, rec.max_len))
    hist = [np.asarray(store.items[max(store.offsets[u], r - rec.max_len):r]) for u, r in zip(users, rows)]
    assert len({len(h) for h in hist}) > 3  # mixed lengths: packed tokens and length groups are used
    got = rec.encode(hist)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    out = rec.recommend([store.item_vocab.to_raw(h).tolist() for h in hist[:3]], k=5)
    assert len(out) == 3 and all(len(r.items) == 5 and r.unknown == 0 and not r.fallback for r in out)


def test_recommend_raw_ids_exclusion_and_fallback(hstu_run, tiny_data_dir):
    store = SequenceStore.load(tiny_data_dir)
    rec = Recommender.load(hstu_run)
    items = store.item_vocab.to_raw(store.user_items(0)).tolist()
    times = np.asarray(store.timestamps[store.offsets[0]:store.offsets[1]]).tolist()
    (r,) = rec.recommend([items], k=15, timestamps=[times], query_time=times[-1] + 60)
    assert len(r.items) == 15 and not set(r.items) & set(items)
    assert all(x in set(store.item_vocab.raw.tolist()) for x in r.items)
    (seen,) = rec.recommend([items], k=rec.vocab.raw.size, exclude_seen=False, timestamps=[times],
                            query_time=times[-1] + 60)
    assert set(items) <= set(seen.items)  # without exclusion the history items can come back
    with pytest.warns(UserWarning, match="time bias"):
        (plain,) = rec.recommend([items + ["unknown-id"]], k=5)
    assert plain.unknown == 1 and len(plain.items) == 5
    empty, = rec.recommend([[]], k=4, timestamps=[[]])
    assert empty.fallback and len(empty.items) == 4
    counts = rec.item_counts.clone()
    counts[0] = -1
    assert empty.items == rec.vocab.to_raw(torch.topk(counts, 4).indices.numpy()).tolist()
    with pytest.raises(ValueError, match="one time per history item"):
        rec.recommend([items], timestamps=[times[:-1]])
    with pytest.raises(ValueError, match="k must be positive"):
        rec.recommend([items], k=0)


def test_recommend_candidates_and_per_row_options(hstu_run, tiny_data_dir):
    """Candidates restrict the full ranking (same order, same scores); options can differ per history."""
    store = SequenceStore.load(tiny_data_dir)
    rec = Recommender.load(hstu_run)
    items = store.item_vocab.to_raw(store.user_items(0)).tolist()
    times = np.asarray(store.timestamps[store.offsets[0]:store.offsets[1]]).tolist()
    opts = dict(timestamps=[times], query_time=times[-1] + 60)
    (full,) = rec.recommend([items], k=len(rec.vocab), exclude_seen=False, **opts)
    cands = full.items[::3][:7] + [items[0], "no-such-item"]
    (r,) = rec.recommend([items], k=5, exclude_seen=False, candidates=[cands], **opts)
    want = [x for x in full.items if x in set(cands)][:5]
    assert r.items == want and r.unknown_candidates == 1
    np.testing.assert_allclose(r.scores, [full.scores[full.items.index(x)] for x in want], rtol=1e-6)
    # one call, different options per row == separate calls
    two = rec.recommend([items, items], k=20, exclude_seen=[True, False], candidates=[None, cands],
                        timestamps=[times, times], query_time=[times[-1] + 60, times[-1] + 60])
    for got, want in zip(two, [rec.recommend([items], k=20, **opts)[0],
                               rec.recommend([items], k=20, exclude_seen=False, candidates=[cands], **opts)[0]]):
        assert got.items == want.items and got.unknown_candidates == want.unknown_candidates
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)
    assert len(two[1].items) == 8  # only the 8 known candidates exist
    # excluding the history removes the seen candidate
    (ex,) = rec.recommend([items], k=20, candidates=[cands], **opts)
    assert items[0] not in ex.items and len(ex.items) == len(set(cands) - {"no-such-item"} - set(items))
    # an empty history falls back to popularity among the candidates
    (pop,) = rec.recommend([[]], k=3, candidates=[cands], timestamps=[[]])
    counts = {x: float(rec.item_counts[d]) for x, d in zip(cands[:-1], rec.vocab.to_dense(cands[:-1]))}
    assert pop.fallback and pop.items == sorted(counts, key=lambda x: -counts[x])[:3]
    with pytest.raises(ValueError, match="one entry"):
        rec.recommend([items, items], candidates=[cands])


# ----------------------------------------------------------------------------------------------
# batch recommendations from a file (genrec recommend RUN --input F --output F)


def _histories(tiny_data_dir, n=7):
    store = SequenceStore.load(tiny_data_dir)
    out = []
    for u in range(n):
        items = store.item_vocab.to_raw(store.user_items(u)).tolist()
        times = np.asarray(store.timestamps[store.offsets[u]:store.offsets[u + 1]]).tolist()
        out.append((f"u{u}", items, times))
    return out


@pytest.mark.parametrize("fmt_in,fmt_out", [("jsonl", "parquet"), ("parquet", "jsonl"), ("csv", "jsonl")])
def test_batch_file_equals_python_api(hstu_run, tiny_data_dir, tmp_path, fmt_in, fmt_out):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from genrec.infer.batch import recommend_file

    rows = _histories(tiny_data_dir)
    rows.append(("nobody", ["unknown-a", "unknown-b"], [1, 2]))  # only unknown ids: popularity fallback
    src = tmp_path / f"in.{fmt_in}"
    if fmt_in == "jsonl":
        src.write_text("".join(json.dumps({"user": u, "history": h, "timestamps": t}) + "\n" for u, h, t in rows))
    elif fmt_in == "parquet":
        pq.write_table(pa.table({"user": [u for u, _, _ in rows], "history": [[str(x) for x in h] for _, h, _ in rows],
                                 "timestamps": [t for _, _, t in rows]}), src)
    else:
        src.write_text("user,history,timestamps\n" + "".join(
            f'{u},"{" ".join(map(str, h))}","{",".join(map(str, t))}"\n' for u, h, t in rows))
    out = tmp_path / f"out.{fmt_out}"
    rec = Recommender.load(hstu_run)
    counts = recommend_file(rec, src, out, k=5, batch_size=3)  # several batches, the last one partial
    assert counts == {"users": len(rows), "unknown_ids": 2, "fallbacks": 1}
    got = (pq.read_table(out).to_pylist() if fmt_out == "parquet"
           else [json.loads(line) for line in out.read_text().splitlines()])
    assert [g["user"] for g in got] == [u for u, _, _ in rows]
    want = rec.recommend([[str(x) for x in h] for _, h, _ in rows], k=5, timestamps=[t for _, _, t in rows])
    for g, w in zip(got, want):
        assert [str(x) for x in g["items"]] == [str(x) for x in w.items] and g["fallback"] == w.fallback
        np.testing.assert_allclose(g["scores"], w.scores, rtol=1e-4, atol=1e-4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_batch_file_errors_leave_no_output(hstu_run, tmp_path):
    from genrec.infer.batch import recommend_file

    rec = Recommender.load(hstu_run)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": 1, "history": ["1"]}\n' * 20 + '{not json}\n')
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="line 21 is not valid JSON"):
        recommend_file(rec, bad, out, batch_size=1)  # the first read (16 rows) was already written to the temp file
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]
    bad.write_text('{"user": 1, "items": ["1"]}\n')
    with pytest.raises(ValueError, match="'history' column"):
        recommend_file(rec, bad, out)
    bad.write_text('{"history": ["1", "2"], "timestamps": [5]}\n')
    with pytest.raises(ValueError, match="1 timestamps for 2 history items"):
        recommend_file(rec, bad, out)
    out.write_text("keep me")
    bad.write_text('{"history": ["1"]}\n')
    with pytest.raises(ValueError, match="--overwrite"):
        recommend_file(rec, bad, out)
    assert out.read_text() == "keep me"  # never clobbered without --overwrite
    with pytest.raises(ValueError, match="unknown output format"):
        recommend_file(rec, bad, tmp_path / "out.xlsx")
    with pytest.raises(FileNotFoundError):
        recommend_file(rec, tmp_path / "missing.jsonl", tmp_path / "o.jsonl")


def test_batch_cli(hstu_run, tiny_data_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from genrec.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"user": u, "history": h}) + "\n" for u, h, _ in _histories(tiny_data_dir, 4)))
    out = tmp_path / "recs.jsonl"
    result = CliRunner().invoke(main, ["recommend", str(hstu_run), "--input", str(src), "--output", str(out), "-k", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote 4 recommendation lists" in result.output
    assert [len(json.loads(line)["items"]) for line in out.read_text().splitlines()] == [3, 3, 3, 3]
    for args, msg in [([], "either --history"), (["--history", "1", "--input", str(src)], "either --history"),
                      (["--input", str(src)], "needs --output")]:
        result = CliRunner().invoke(main, ["recommend", str(hstu_run), *args])
        assert result.exit_code != 0 and msg in result.output


def test_batch_file_empty_input_gives_an_empty_valid_output(hstu_run, tmp_path):
    import pyarrow.parquet as pq

    from genrec.infer.batch import recommend_file

    src = tmp_path / "empty.jsonl"
    src.write_text("\n")
    counts = recommend_file(Recommender.load(hstu_run), src, tmp_path / "out.parquet")
    table = pq.read_table(tmp_path / "out.parquet")
    assert counts["users"] == 0 and table.num_rows == 0
    assert table.column_names == ["user", "items", "scores", "unknown", "fallback"]
