"""A live ``sparsedet serve`` process on 127.0.0.1 for the service's tests: started on a free port
(the server says which once it listens), stopped with SIGTERM, its exit code and output kept."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

START_TIMEOUT_S = 120  # loading and warming up a model on a loaded 2-core machine


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG file of random pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def same_as_written(answer: dict, written: list[dict]) -> bool:
    """An API answer holds the detections predictions.json states (category, xywh box to 1/1000 px,
    score to 5 digits), one to one, up to the float rounding of another batch shape (~1e-7 here,
    which also lets two near-equal scores trade places)."""
    found = [d for d in answer["detections"] if d["category_id"] is not None]
    unmatched = list(written)
    for d in found:
        x1, y1, x2, y2 = d["box"]
        match = next((e for e in unmatched if e["category_id"] == d["category_id"]
                      and abs(d["score"] - e["score"]) <= 5e-6 + 1e-6
                      and max(abs(a - b) for a, b in zip((x1, y1, x2 - x1, y2 - y1), e["bbox"])) <= 5e-4 + 1e-3),
                     None)
        if match is None:
            return False
        unmatched.remove(match)
    return not unmatched


@dataclass
class Answer:
    status: int
    headers: Any  # case-insensitive: headers["content-type"] or ["Content-Type"]
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class LiveServer:
    process: subprocess.Popen
    url: str = ""
    output: list[str] = field(default_factory=list)

    def request(self, path: str, data: bytes | None = None, content_type: str | None = None,
                method: str | None = None, headers: dict | None = None) -> Answer:
        """One HTTP request (urllib, a connection of its own); any status is returned, not raised."""
        headers = dict(headers or {})
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return Answer(r.status, r.headers, r.read())
        except urllib.error.HTTPError as e:
            return Answer(e.code, e.headers, e.read())

    def predict(self, image: bytes, query: str = "", content_type: str = "image/png") -> Answer:
        return self.request("/v1/predict" + (f"?{query}" if query else ""), image, content_type)

    def metric(self, name: str, labels: str = "") -> float:
        """A sample of /metrics (``name{labels}``), 0 when absent."""
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in self.request("/metrics").body.decode().splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_server(weights, *options: str) -> LiveServer:
    """``sparsedet serve --weights WEIGHTS --port 0 OPTIONS...``, returned once it listens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "sparsedet", "serve", "--weights", str(weights), "--port", "0",
                                "--threads", "1", *options],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    server = LiveServer(process)
    ready = threading.Event()

    def read() -> None:  # the output, line by line, until the process ends
        for line in process.stdout:
            server.output.append(line)
            if line.startswith("serving ") and " on http://" in line:
                server.url = line.split(" on ", 1)[1].split()[0]
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(START_TIMEOUT_S) or not server.url:
        process.kill()
        raise AssertionError("the server did not start:\n" + "".join(server.output))
    return server
