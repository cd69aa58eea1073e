"""The HTTP service (``sparsedet serve``): a FastAPI app around one loaded model.

``POST /v1/predict`` (an image; ``threshold``, ``max_detections``) answers the detections that
``sparsedet predict`` writes for the same file; ``POST /v1/tokens`` the tokens a sparse encoder
kept; ``GET /health``, ``GET /v1/model``, ``GET /metrics`` (Prometheus text) and ``GET /`` (the
web page, shipped in the package: it works without network). Concurrent predictions are batched
(``batcher.Batcher``); every refusal is ``{"detail": message}`` with its status.
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from ..engine.thresholds import PREDICT_DEFAULT, Threshold, keep_above
from ..stage_kinds import encoder_class
from ..version import __version__
from .batcher import Batcher, QueueFull
from .inputs import HttpError, Limits, decode_image, image_bytes

STATIC = Path(__file__).parent / "static"
# The page and its assets: cached, but checked again on each load (ETag), so that an upgraded
# package never pairs a new index.html with an old app.js.
REVALIDATE = {"Cache-Control": "no-cache"}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class ServeOptions:
    """How the service batches and what it accepts (the ``sparsedet serve`` options)."""

    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    workers: int = 1  # inference threads, each running its own batches
    limits: Limits = field(default_factory=Limits)
    precision: str = "fp32"
    retry_after_s: int = 1  # what a 503 tells the client to wait


class Revalidated(StaticFiles):
    async def get_response(self, path: str, scope):
        response = await super().get_response(path, scope)
        response.headers.update(REVALIDATE)
        return response


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (two apps in one process do not mix)."""

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sparsedet_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("sparsedet_request_seconds", "Time from request to answer, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("sparsedet_batch_size", "Images per model forward",
                                    buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.inference = Histogram("sparsedet_batch_seconds", "Seconds per batched model forward",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("sparsedet_queue_depth", "Requests waiting for the model", registry=r)
        self.in_flight = Gauge("sparsedet_requests_in_flight", "Requests being answered", registry=r)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)


class Counted:
    """ASGI middleware: every HTTP answer counted by route and status, timed, and the requests in
    flight (a plain ASGI wrapper: no task per request, as a BaseHTTPMiddleware would start)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_flight.dec()
            endpoint = getattr(scope.get("route"), "path", "other")  # the router puts the matched route here
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def detections_json(det: dict, classes: list[str], category_ids: list[int | None]) -> list[dict]:
    """One image's detections (as ``predict`` returns them) as the API's list: box xyxy in the
    image's pixels, score, label (the class column, as in ``Detector.predict``), its category id
    and name."""
    return [{"box": box, "score": score, "label": label, "category_id": category_ids[label], "name": classes[label]}
            for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())]


def model_facts(model, weights: str, options: ServeOptions) -> dict:
    """What ``GET /v1/model`` answers."""
    from ..tools.onnx_model import OnnxDetector
    c = model.config
    exported = isinstance(model, OnnxDetector)
    return {"weights": weights, "preset": model.run_config.preset or None,
            "kind": c.kind, "encoder": c.encoder.kind, "classes": model.classes,
            "category_ids": list(model.category_ids),
            "runtime": model.session.label if exported else f"pytorch {torch.__version__}",
            "precision": model.precision if exported else options.precision,
            "device": "cpu" if exported else str(next(model.parameters()).device),
            "input_size": {"short_side": c.eval_size, "long_side_max": c.eval_max_size,
                           "fixed": list(model.input_size) if exported and model.input_size else None},
            "top_k": c.top_k, "threshold": Threshold.of(None, c, PREDICT_DEFAULT).value,
            # A token-sparse encoder declares its scorer's loss; a dense or global one keeps every token.
            "token_overlay": not exported and encoder_class(c.encoder.kind).supervision is not None,
            "workers": options.workers, "threads_per_worker": torch.get_num_threads(), "max_batch": options.max_batch}


def create_app(model, weights: str, options: ServeOptions = ServeOptions()) -> FastAPI:
    """The service for ``model`` (a ``Detector`` or an ``OnnxDetector``, loaded from ``weights``)."""
    options.limits.check()
    metrics = Metrics(options.max_batch)
    facts = model_facts(model, weights, options)
    category_ids = list(model.category_ids)

    def run(images: list) -> list[dict]:
        # Threshold 0 and the model's top-k, as `sparsedet predict` runs it; each request filters its own.
        return model.predict(images, threshold=0.0, batch_size=len(images), precision=options.precision)

    batcher = Batcher(run, options.max_batch, options.max_wait_ms, options.max_queue, options.workers,
                      metrics.batch, metrics.queue_depth.set)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        # One forward before the first request: the first call pays for lazy set-up (weight layout,
        # runtime plans), which no client should wait for.
        await batcher.call(run, [Image.new("RGB", (model.config.eval_size,) * 2)])
        yield
        await batcher.stop()

    app = FastAPI(title="sparsedet", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.metrics = batcher, metrics

    app.add_middleware(Counted, metrics=metrics)

    @app.exception_handler(HttpError)
    async def refused(request: Request, err: HttpError):
        return JSONResponse({"detail": err.message}, err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or e['loc'][0]}: {e['msg']}" for e in err.errors())
        return JSONResponse({"detail": problems}, 422)

    async def image_of(request: Request):
        data = await image_bytes(request, options.limits)
        return await run_in_threadpool(decode_image, data, options.limits)

    @app.post("/v1/predict")
    async def predict(request: Request,
                      threshold: float | None = Query(None, ge=0.0, le=1.0, description="minimum score; default "
                                                      "the run's recorded one, else 0.5"),
                      max_detections: int | None = Query(None, ge=1, description="at most this many, best first")):
        start = time.perf_counter()
        image = await image_of(request)
        try:
            det = await batcher.submit(image)
        except QueueFull as err:
            raise HttpError(503, f"the server is busy ({err}); retry in {options.retry_after_s} s",
                            {"Retry-After": str(options.retry_after_s)}) from None
        used = Threshold.of(threshold, model.config, PREDICT_DEFAULT).value
        found = detections_json(keep_above(det, used), model.classes, category_ids)
        # A JSONResponse as it is: FastAPI's encoder would walk the detections once more.
        return JSONResponse({"detections": found[:max_detections] if max_detections else found,
                             "image_size": [image.height, image.width], "threshold": used,
                             "model": facts["weights"], "time_ms": round(1000 * (time.perf_counter() - start), 2)})

    @app.post("/v1/tokens")
    async def tokens(request: Request):
        if not facts["token_overlay"]:
            why = ("its encoder updates every token" if isinstance(model, torch.nn.Module)
                   else "an exported file computes detections only")
            raise HttpError(409, f"this model has no kept tokens to show: {why}. Serve a run folder of a token-sparse "
                            "model (sparse_detr_*, focus_detr_*, salience_detr_*)")
        from .tokens import kept_tokens
        image = await image_of(request)
        return await batcher.call(kept_tokens, model, image)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue_depth": batcher.depth}

    @app.get("/v1/model")
    async def about():
        return facts

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers=REVALIDATE)

    app.mount("/static", Revalidated(directory=STATIC), name="static")
    return app

