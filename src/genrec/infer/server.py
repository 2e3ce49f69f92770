"""HTTP service: ``genrec serve RUN_DIR`` -> POST /recommend, GET /healthz, GET /metadata, /docs.

    genrec serve runs/hstu                       # http://127.0.0.1:8000, docs at /docs
    curl -s localhost:8000/recommend -H 'content-type: application/json' \\
         -d '{"history": [1193, 661, 914], "k": 10}'

Requests are validated before they reach the model: bad JSON, wrong types, unknown fields, k out of
range and histories or candidate lists over the limits get a 4xx with a message saying what to fix
(422 for a body that does not fit the schema, 413 for a body over ``max_body_bytes``); only a bug is a
5xx. Concurrent requests are micro-batched: one worker thread runs the model, and every request that
arrived while it was busy goes into the next forward pass (no added wait when the service is idle, so
a single request pays one batch-of-one forward pass). The event loop keeps parsing requests while the
model runs: PyTorch releases the GIL in its kernels.

The service binds to 127.0.0.1 unless ``--host`` says otherwise: it has no authentication.
Needs the optional extra: ``pip install 'genrec[serve]'`` (FastAPI, uvicorn).
"""

# no `from __future__ import annotations`: FastAPI reads the request model from the live annotation
import asyncio
import gc
import json
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Union

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the HTTP service needs FastAPI and uvicorn: pip install 'genrec[serve]'") from e

import torch

from genrec.infer.recommender import Recommendation, Recommender
from genrec.models import HSTU, kernels

ItemId = Union[StrictInt, StrictStr]


class BodyLimit:
    """ASGI middleware: a 413 for a declared body over ``max_body_bytes`` before anything reads it. A plain
    ASGI class: with Starlette's function middleware (``@app.middleware``), and the response model
    validating each answer again, a lone request took about 1.2 ms longer at the median (HSTU-large)."""

    def __init__(self, app, max_body_bytes: int, max_history: int):
        self.app, self.max_body_bytes, self.max_history = app, max_body_bytes, max_history

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = dict(scope["headers"]).get(b"content-length")
            if size is not None and (not size.isdigit() or int(size) > self.max_body_bytes):
                response = JSONResponse({"detail": f"request body over the limit of {self.max_body_bytes:,} bytes: "
                                                   f"send a shorter history (at most {self.max_history:,} items)"},
                                        status_code=413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Recommended(BaseModel):
    items: list[ItemId] = Field(description="raw item ids, best first")
    scores: list[float] = Field(description="model scores (popularity counts when fallback is true)")
    unknown: int = Field(description="history item ids not in the model's vocabulary (ignored)")
    unknown_candidates: int = Field(description="candidate ids not in the model's vocabulary (ignored)")
    fallback: bool = Field(description="true when the history had no known item: most popular items")


def request_model(max_history: int, max_k: int, max_candidates: int) -> type[BaseModel]:
    """The POST /recommend body, with this service's limits."""

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"history": [1193, 661, 914],
                                                                                   "k": 10}]})
        history: list[ItemId] = Field(max_length=max_history,
                                      description="raw item ids, oldest first (unknown ids are ignored)")
        timestamps: list[StrictInt] | None = Field(None, description="unix seconds of each history item "
                                                                     "(models with a time bias)")
        query_time: StrictInt | None = Field(None, description="unix time to recommend for (default: now)")
        k: StrictInt = Field(10, ge=1, le=max_k, description="number of items to return")
        exclude_seen: StrictBool = Field(True, description="leave out the items of the history")
        candidates: list[ItemId] | None = Field(None, min_length=1, max_length=max_candidates,
                                                description="rank only these raw item ids")

        @model_validator(mode="after")
        def _times_match(self):
            if self.timestamps is not None and len(self.timestamps) != len(self.history):
                raise ValueError(f"timestamps must give one time per history item: {len(self.timestamps)} "
                                 f"times for {len(self.history)} items")
            if self.query_time is not None and self.timestamps is None:
                raise ValueError("query_time needs timestamps for the history")
            return self

    return RecommendRequest


def model_executor(threads: int | None = None, workers: int = 1) -> ThreadPoolExecutor:
    """The ``workers`` threads that run the model, each with ``threads`` PyTorch threads (default: the
    caller's setting). Several workers run several batches at once (useful when a batch is too small to
    keep every core busy).

    Run every PyTorch computation of the process in it, loading included (``serve`` does): under OpenMP
    each thread that runs a parallel op gets its own team of spinning worker threads, and two teams on
    two cores took a one-user HSTU-large forward from 7 ms to 18 ms.
    """
    n = threads or torch.get_num_threads()
    return ThreadPoolExecutor(workers, thread_name_prefix="genrec-model", initializer=torch.set_num_threads,
                              initargs=(n,))


class MicroBatcher:
    """Queue of pending requests -> one ``Recommender.recommend`` call per batch, in the model thread(s)."""

    def __init__(self, recommender: Recommender, max_batch: int = 64, max_queue: int = 4096,
                 executor: ThreadPoolExecutor | None = None):
        self.recommender, self.max_batch = recommender, max_batch
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.pool = executor or model_executor()
        self.workers = self.pool._max_workers  # batches in flight at once: one per model thread
        self.batches = self.requests = 0
        self.model_seconds = 0.0  # time spent in the model calls (GET /healthz reports it)

    async def submit(self, request) -> Recommendation:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((request, future))  # asyncio.QueueFull when overloaded -> 503
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        free = asyncio.Semaphore(self.workers)
        while True:
            first = await self.queue.get()
            await free.acquire()  # every worker busy: requests pile up meanwhile and go in together
            batch = [first]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            batch = [(r, f) for r, f in batch if not f.cancelled()]  # client went away
            if not batch:
                free.release()
                continue
            loop.create_task(self._answer(loop, batch)).add_done_callback(lambda _: free.release())

    async def _answer(self, loop, batch: list) -> None:
        t = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.pool, self.score, [r for r, _ in batch])
        except Exception as e:  # a bug: every request of the batch gets a 500
            for _, f in batch:
                if not f.done():
                    f.set_exception(e)
            return
        self.batches += 1
        self.requests += len(batch)
        self.model_seconds += time.perf_counter() - t
        for (_, f), res in zip(batch, results):
            if not f.done():
                f.set_result(res)

    def score(self, requests: list) -> list[Recommendation]:
        """One model call for requests without timestamps, one for those with them."""
        out: list[Recommendation | None] = [None] * len(requests)
        now = int(time.time())
        for timed in (False, True):
            idx = [i for i, r in enumerate(requests) if (r.timestamps is not None) == timed]
            if not idx:
                continue
            rs = [requests[i] for i in idx]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the time-bias note: /metadata says whether timestamps matter
                recs = self.recommender.recommend(
                    [r.history for r in rs], k=max(r.k for r in rs), exclude_seen=[r.exclude_seen for r in rs],
                    candidates=[r.candidates for r in rs] if any(r.candidates for r in rs) else None,
                    timestamps=[r.timestamps for r in rs] if timed else None,
                    query_time=[now if r.query_time is None else r.query_time for r in rs] if timed else None,
                    batch_size=max(len(rs), 1))
            for i, r, rec in zip(idx, rs, recs):
                rec.items, rec.scores = rec.items[:r.k], rec.scores[:r.k]
                out[i] = rec
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def run_metadata(run_dir: str | Path, recommender: Recommender) -> dict:
    """What GET /metadata returns: the model, its data, the evaluation protocol and test metrics."""
    cfg = recommender.config
    meta = {"run_dir": str(run_dir), "model": cfg.get("model", {}).get("name"),
            "dataset": cfg.get("data", {}).get("path"), "items": len(recommender.vocab),
            "max_len": recommender.max_len, "uses_timestamps": recommender.uses_time, "model_config": cfg.get("model")}
    report = Path(run_dir) / "report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        meta.update(protocol=r.get("protocol"), best_epoch=r.get("best_epoch"), test_metrics=r.get("test"))
    return meta


def create_app(recommender: Recommender, metadata: dict | None = None, *, max_batch: int = 64,
               max_history: int = 10_000, max_k: int = 1000, max_candidates: int = 100_000,
               max_body_bytes: int = 4 << 20, max_queue: int = 4096,
               executor: ThreadPoolExecutor | None = None) -> FastAPI:
    """The FastAPI application around one loaded Recommender (``genrec serve`` runs it with uvicorn).

    ``executor``: the model thread (``model_executor``); by default a new one.
    """
    Body = request_model(max_history, min(max_k, len(recommender.vocab)), max_candidates)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = batcher = MicroBatcher(recommender, max_batch=max_batch, max_queue=max_queue,
                                                  executor=executor)
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.close()

    app = FastAPI(title="genrec", version="1", lifespan=lifespan,
                  description="Top-K recommendations for raw item histories from a trained genrec run.")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # where and what, without echoing the input back (it can be a 10,000-item history)
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes, max_history=max_history)

    @app.post("/recommend", response_model=Recommended,
              responses={413: {"description": "body too large"}, 503: {"description": "overloaded, retry"}})
    async def recommend(body: Body):  # type: ignore[valid-type]
        try:
            rec = await state["batcher"].submit(body)
        except asyncio.QueueFull:
            return JSONResponse({"detail": "too many pending requests: retry shortly"}, status_code=503)
        # the response model documents this body; writing it directly skips a second validation of 2 k values
        answer = {"items": rec.items, "scores": rec.scores, "unknown": rec.unknown,
                  "unknown_candidates": rec.unknown_candidates, "fallback": rec.fallback}
        return Response(json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(),
                        media_type="application/json")  # what JSONResponse writes

    @app.get("/healthz")
    async def healthz():
        b = state.get("batcher")
        return {"status": "ok", "pending": b.queue.qsize() if b else 0, "batches": b.batches if b else 0,
                "requests": b.requests if b else 0, "model_seconds": round(b.model_seconds, 3) if b else 0.0}

    meta = dict(metadata or {})
    meta.setdefault("limits", {"max_history": max_history, "max_k": min(max_k, len(recommender.vocab)),
                               "max_candidates": max_candidates, "max_body_bytes": max_body_bytes,
                               "max_batch": max_batch})

    @app.get("/metadata")
    async def metadata_():
        return meta

    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, checkpoint: str = "best.pt",
          threads: int | None = None, workers: int = 1, compile: bool = False, access_log: bool = False,
          **limits) -> None:
    """Load a run and serve it until interrupted (``genrec serve``).

    ``compile``: answer lone requests with the run's encoder compiled ahead of time
    (``genrec.infer.export.compiled_encoder``: built once per checkpoint, then loaded from the run).
    """
    import uvicorn

    pool = model_executor(threads, workers)
    rec = pool.submit(Recommender.load, run_dir, checkpoint=checkpoint).result()  # in the model thread too
    if isinstance(rec.model, HSTU):  # build or load the attention kernel now, not during the first request
        pool.submit(kernels.silu_attention).result()
    if compile and isinstance(rec.model, HSTU) and pool.submit(rec.model.compiled_inference).result():
        print("--compile: not needed, this HSTU already runs as one compiled kernel call per request (faster "
              "than the ahead-of-time encoder: 3.7 against 9.7 ms for 200 events of HSTU-large)", file=sys.stderr)
        compile = False
    if compile:
        from genrec.infer.export import compiled_encoder

        try:
            rec.single_encoder = pool.submit(compiled_encoder, run_dir, checkpoint).result()
        except ValueError:  # a model without an export path: say so, as `genrec export` does
            raise
        except Exception as e:  # no C++ compiler, an inductor failure: serve eagerly rather than not at all
            warnings.warn(f"--compile failed ({type(e).__name__}: {str(e)[:300]}); serving without it", stacklevel=2)
    app = create_app(rec, run_metadata(run_dir, rec), executor=pool, **limits)
    gc.collect()
    gc.freeze()  # the ~10^6 objects of torch, FastAPI and the model leave the collector's view: no 100 ms pauses
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info")
