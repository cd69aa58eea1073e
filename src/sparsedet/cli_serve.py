"""``sparsedet serve``: the detection service (``serve/app.py``) on uvicorn; its grammar is in
``cli_parser.py``. SIGTERM or Ctrl-C stops it gracefully: no new connections, the requests in
flight are answered, then the process exits 0."""
from __future__ import annotations

import signal

from .errors import SparsedetError


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from .serve.app import ServeOptions, create_app
        from .serve.inputs import Limits, allow_pixels
    except ImportError as err:
        raise SparsedetError(f"serving needs FastAPI, uvicorn and prometheus_client ({err.name} is missing): "
                             "pip install 'sparsedet[serve]'") from None
    from .api import load_ref
    from .resolve import resolve_model
    from .tools.onnx_model import OnnxDetector
    _check(args)
    ref = resolve_model(args.weights, "serve")
    workers, threads, max_batch = _plan(args, ref.kind == "exported")
    options = ServeOptions(max_batch=max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                           workers=workers, limits=Limits(args.max_bytes, args.max_pixels), precision=args.precision)
    allow_pixels(options.limits)
    if threads:
        import torch
        torch.set_num_threads(threads)  # before an .onnx file's session takes torch's count
    model = load_ref(ref, device=args.device, runtime=args.runtime)
    if isinstance(model, OnnxDetector):
        model.check_precision(args.precision)
        print(f"{model.path} runs in {model.session.label}")
    app = create_app(model, args.weights, options)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=args.grace)
    announce = f"serving {args.weights} on http://{{address}} (web page at /, API at /v1/predict; Ctrl-C stops)"
    server = _server_class()(config, announce)
    # uvicorn answers SIGTERM/SIGINT with a graceful shutdown, then re-raises the signal to the
    # handlers it found; these ignore it, so that a clean stop exits 0 (a second Ctrl-C still forces).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    if server.started:
        print("stopped", flush=True)
        return 0
    raise SparsedetError(f"could not serve on {args.host}:{args.port} (see the log above); is the port in use? "
                         "pick another with --port")


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """Says where it listens once the socket is bound (with --port 0, the port it was given)."""

        def __init__(self, config, announce: str):
            super().__init__(config)
            self.announce = announce

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(self.announce.format(address=f"{host}:{port}"), flush=True)

    return Server


def _plan(args, onnx: bool) -> tuple[int, int | None, int]:
    """(workers, each one's CPU threads, images per batch at most), where not given. On a CPU: two
    workers with half the cores each, batches of up to 2 (benchmarks/serve_load.py: more images per
    second than one worker on every core, and than larger batches, which outgrow the CPU's caches);
    on a GPU, one worker and batches of up to 8; in a runtime that runs one batch at a time
    (OpenVINO: one infer request) one worker. None threads: torch's own count. ``onnx``: the model
    is an exported file."""
    import os

    from .engine.device import resolve_device
    from .tools.runtimes import runtime_class
    on_cpu = onnx or resolve_device(args.device or "auto", fix="--device cpu").type == "cpu"
    runtime = runtime_class(args.runtime)
    single = not on_cpu or (onnx and runtime.one_batch_at_a_time)
    if single and (args.workers or 1) > 1:
        raise SparsedetError(f"--workers {args.workers}: {runtime.title + ' runs' if on_cpu else 'a GPU runs'} one "
                             "batch at a time here; leave out --workers (batches grow with --max-batch instead)")
    cores = os.cpu_count() or 1
    workers = args.workers or (1 if single else min(2, cores))
    threads = args.threads or (max(1, cores // workers) if on_cpu else None)
    return workers, threads, args.max_batch or (2 if on_cpu else 8)


def _check(args) -> None:
    """The numbers make sense before the model loads."""
    for flag, value, low in (("--max-batch", args.max_batch or 1, 1), ("--max-queue", args.max_queue, 1),
                             ("--max-bytes", args.max_bytes, 1), ("--max-pixels", args.max_pixels, 1),
                             ("--max-wait-ms", args.max_wait_ms, 0), ("--grace", args.grace, 0),
                             ("--threads", args.threads or 1, 1), ("--workers", args.workers or 1, 1)):
        if value < low:
            raise SparsedetError(f"{flag} must be at least {low}, got {value}")
    if not 0 <= args.port <= 65535:
        raise SparsedetError(f"--port must be in 0..65535, got {args.port}")
