"""HTTP service: validation (every kind of bad request -> 4xx with a message), micro-batching equals the
Python API, and a real HTTP round trip on loopback through `genrec serve`."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server needs the optional extra: pip install 'genrec[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from genrec.data.store import SequenceStore  # noqa: E402
from genrec.infer.recommender import Recommender  # noqa: E402
from genrec.infer.server import MicroBatcher, Recommended, create_app, request_model, run_metadata  # noqa: E402


@pytest.fixture(scope="module")
def rec(hstu_run):
    return Recommender.load(hstu_run)


@pytest.fixture(scope="module")
def client(rec, hstu_run):
    app = create_app(rec, run_metadata(hstu_run, rec), max_history=50, max_k=20, max_candidates=30,
                     max_body_bytes=4000)
    with TestClient(app) as c:  # runs the lifespan: the micro-batcher is live
        yield c


@pytest.fixture(scope="module")
def histories(tiny_data_dir):
    store = SequenceStore.load(tiny_data_dir)
    out = []
    for u in range(6):
        items = store.item_vocab.to_raw(store.user_items(u)).tolist()
        times = np.asarray(store.timestamps[store.offsets[u]:store.offsets[u + 1]]).tolist()
        out.append((items[-10:], times[-10:]))
    return out


def _same(got: dict, want) -> None:
    assert got["items"] == want.items and got["unknown"] == want.unknown and got["fallback"] == want.fallback
    np.testing.assert_allclose(got["scores"], want.scores, rtol=1e-5)


def test_recommend_round_trip_equals_python_api(client, rec, histories):
    items, times = histories[0]
    body = {"history": items + ["no-such-item"], "timestamps": times + [times[-1]], "query_time": times[-1] + 60,
            "k": 7}
    r = client.post("/recommend", json=body)
    assert r.status_code == 200, r.text
    (want,) = rec.recommend([items + ["no-such-item"]], k=7, timestamps=[times + [times[-1]]],
                            query_time=times[-1] + 60)
    _same(r.json(), want)
    assert r.json()["unknown"] == 1 and not set(r.json()["items"]) & set(items)
    # the answer is written directly, not through the response model: it still is exactly that model
    assert r.headers["content-type"] == "application/json"
    assert Recommended.model_validate(r.json(), strict=True).model_dump() == r.json()
    # exclude_seen, candidates, and raw ids given as strings of an integer vocabulary
    cands = [str(x) for x in items[:3]] + [str(x) for x in want.items[:4]]
    r = client.post("/recommend", json={"history": [str(x) for x in items], "k": 5, "exclude_seen": False,
                                        "candidates": cands, "timestamps": times, "query_time": times[-1] + 60})
    assert r.status_code == 200, r.text
    (want,) = rec.recommend([items], k=5, exclude_seen=False, candidates=[cands], timestamps=[times],
                            query_time=times[-1] + 60)
    _same(r.json(), want)
    assert set(r.json()["items"]) <= {int(x) for x in cands}
    # ids no vocabulary can hold (beyond int64, negative, long strings) are unknown ids, not errors
    r = client.post("/recommend", json={"history": items + [10**30, -5, "x" * 500], "k": 3, "timestamps": times + [1, 2, 3],
                                        "candidates": [10**30] + items[:1]})
    assert r.status_code == 200 and r.json()["unknown"] == 3 and r.json()["unknown_candidates"] == 1
    # empty history: popularity fallback, flagged
    r = client.post("/recommend", json={"history": [], "k": 3})
    assert r.status_code == 200 and r.json()["fallback"] and len(r.json()["items"]) == 3


def test_health_metadata_and_docs(client, rec):
    assert client.get("/healthz").json()["status"] == "ok"
    meta = client.get("/metadata").json()
    assert meta["model"] == "hstu" and meta["items"] == len(rec.vocab) and meta["uses_timestamps"] is True
    assert "full ranking" in meta["protocol"] and "hr@10" in meta["test_metrics"]
    assert meta["limits"]["max_k"] == 20
    schema = client.get("/openapi.json").json()
    assert "/recommend" in schema["paths"] and client.get("/docs").status_code == 200


BAD_REQUESTS = [  # (what, raw body, status, words the message must contain)
    ("bad JSON", b'{"history": [1, 2', 422, "json"),
    ("not an object", b"[1, 2, 3]", 422, "valid dictionary"),
    ("missing history", b'{"k": 5}', 422, "history"),
    ("history not a list", b'{"history": "1,2,3"}', 422, "valid list"),
    ("float item id", b'{"history": [1.5]}', 422, "history"),
    ("bool item id", b'{"history": [true]}', 422, "history"),
    ("k not an integer", b'{"history": [1], "k": "ten"}', 422, "integer"),
    ("k zero", b'{"history": [1], "k": 0}', 422, "greater than or equal to 1"),
    ("k too large", b'{"history": [1], "k": 21}', 422, "less than or equal to 20"),
    ("exclude_seen not a bool", b'{"history": [1], "exclude_seen": "yes"}', 422, "boolean"),
    ("unknown field", b'{"history": [1], "user": 3}', 422, "extra inputs are not permitted"),
    ("history over the limit", json.dumps({"history": list(range(51))}).encode(), 422, "at most 50"),
    ("too many candidates", json.dumps({"history": [1], "candidates": list(range(31))}).encode(), 422, "at most 30"),
    ("empty candidates", b'{"history": [1], "candidates": []}', 422, "at least 1"),
    ("timestamps of another length", b'{"history": [1, 2], "timestamps": [5]}', 422, "one time per history item"),
    ("query_time without timestamps", b'{"history": [1], "query_time": 5}', 422, "needs timestamps"),
    ("body over the byte limit", json.dumps({"history": ["x" * 40] * 100}).encode(), 413, "over the limit"),
]


@pytest.mark.parametrize("what,body,status,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_with_a_message(client, what, body, status, words):
    r = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, (what, r.status_code, r.text)
    assert words in r.text.lower(), (what, r.text)


def test_wrong_route_and_method_and_content_type(client):
    assert client.post("/recomend", json={"history": [1]}).status_code == 404
    assert client.get("/recommend").status_code == 405
    r = client.post("/recommend", content=b"history=1,2", headers={"content-type": "text/plain"})
    assert 400 <= r.status_code < 500 and r.json()["detail"]
    # the service still answers after all that
    assert client.post("/recommend", json={"history": [1], "k": 2}).status_code == 200


def test_micro_batching_equals_one_by_one(rec, histories):
    """Requests waiting together go through one forward pass, each with its own options, same answers."""
    Body = request_model(100, 50, 100)
    bodies = []
    for i, (items, times) in enumerate(histories):
        kw = {"history": items, "k": 3 + i, "exclude_seen": i % 2 == 0}
        if i % 3 == 0:
            kw.update(timestamps=times, query_time=times[-1] + 100)
        if i == 4:
            kw["candidates"] = items[:2] + [items[0] + 10_000]
        bodies.append(Body(**kw))

    async def go():
        batcher = MicroBatcher(rec, max_batch=64)
        futures = [asyncio.ensure_future(batcher.submit(b)) for b in bodies]
        await asyncio.sleep(0)  # every request is queued before the worker starts
        task = asyncio.create_task(batcher.run())
        results = await asyncio.gather(*futures)
        task.cancel()
        batcher.close()
        return batcher, results

    batcher, results = asyncio.run(go())
    assert batcher.batches == 1 and batcher.requests == len(bodies)
    for b, got in zip(bodies, results):
        with pytest.warns(UserWarning) if b.timestamps is None else _nothing():
            (want,) = rec.recommend([b.history], k=b.k, exclude_seen=b.exclude_seen,
                                    candidates=None if b.candidates is None else [b.candidates],
                                    timestamps=None if b.timestamps is None else [b.timestamps],
                                    query_time=b.query_time)
        _same(got.__dict__, want)
        assert got.unknown_candidates == (1 if b.candidates else 0)


def test_full_queue_is_a_503_not_a_hang(rec):
    Body = request_model(100, 50, 100)

    async def go():
        batcher = MicroBatcher(rec, max_queue=1)  # no worker running: the queue fills
        first = asyncio.ensure_future(batcher.submit(Body(history=[1])))
        await asyncio.sleep(0)
        with pytest.raises(asyncio.QueueFull):
            await batcher.submit(Body(history=[2]))
        first.cancel()
        batcher.close()

    asyncio.run(go())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes):
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_genrec_serve_real_http_round_trip(hstu_run, rec, histories):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "genrec.cli", "serve", str(hstu_run), "--port", str(port),
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                    assert json.loads(r.read())["status"] == "ok"
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"server did not start: {proc.stdout.read().decode()}") from None
                time.sleep(0.2)
        items, times = histories[1]
        status, got = _post(base + "/recommend", json.dumps({"history": items, "timestamps": times,
                                                             "query_time": times[-1] + 5, "k": 4}).encode())
        assert status == 200
        (want,) = rec.recommend([items], k=4, timestamps=[times], query_time=times[-1] + 5)
        _same(got, want)
        status, err = _post(base + "/recommend", b'{"history": [1], "k": -1}')
        assert status == 422 and "greater than or equal to 1" in json.dumps(err)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
