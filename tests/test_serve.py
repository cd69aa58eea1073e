"""``sparsedet serve`` against live servers on 127.0.0.1: its detections equal ``sparsedet predict``'s,
concurrent requests run as one batch and give what each gives alone, every bad input gets its
status and a message while the server keeps serving, a full queue answers 503, and SIGTERM
finishes the requests in flight and exits 0. The batcher's rules are also checked in-process."""
import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import require_module

require_module("fastapi", "serve")
from live_server import png, same_as_written, start_server  # noqa: E402
from sparsedet import Detector  # noqa: E402
from sparsedet.cli import main  # noqa: E402
from sparsedet.serve.batcher import Batcher, QueueFull  # noqa: E402


def together(calls: list) -> list:
    """Run the calls in threads started at once; their results in order."""
    start, results = threading.Barrier(len(calls)), [None] * len(calls)

    def work(i: int) -> None:
        start.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def close(found: list[dict], expected: list[dict]) -> bool:
    """The same detections, up to the float rounding of another batch shape (scores move by ~1e-8)."""
    return len(found) == len(expected) and all(
        a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-6
        and max(abs(x - y) for x, y in zip(a["box"], b["box"])) < 1e-3 for a, b in zip(found, expected))


@pytest.fixture(scope="module")
def images(synth) -> list[Path]:
    return sorted((Path(synth["root"]) / "images" / "val").glob("*.png"))


@pytest.fixture(scope="module")
def server(tiny_run):
    """Default batching; limits small enough to test: 200 kB bodies, 20,000-pixel images."""
    live = start_server(tiny_run, "--max-bytes", "200000", "--max-pixels", "20000")
    yield live
    assert live.stop() == 0, "".join(live.output)


def test_detections_equal_predict_and_do_not_depend_on_the_batch(server, tiny_run, images, tmp_path):
    assert main(["predict", "--weights", str(tiny_run), *map(str, images), "--out", str(tmp_path),
                 "--threshold", "0"]) == 0
    written = json.loads((tmp_path / "predictions.json").read_text())
    expected = [[e for e in written if e["file_name"] == str(path)] for path in images]
    assert all(expected)
    # Concurrent: the default batcher groups what arrives within 5 ms with other images.
    answers = together([lambda p=p: server.predict(p.read_bytes(), "threshold=0") for p in images])
    assert [a.status for a in answers] == [200] * len(images)
    assert all(same_as_written(a.json(), e) for a, e in zip(answers, expected))
    # One at a time, as a multipart form, as browsers and `curl -F` send it.
    boundary = "sparsedet-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + images[0].read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    form = server.predict(body, "threshold=0", f"multipart/form-data; boundary={boundary}")
    assert form.status == 200 and same_as_written(form.json(), expected[0])
    answer = form.json()
    height, width = Image.open(images[0]).size[::-1]
    assert answer["image_size"] == [height, width] and answer["threshold"] == 0 and answer["time_ms"] > 0
    top = server.predict(images[0].read_bytes(), "threshold=0&max_detections=3").json()["detections"]
    assert top == answer["detections"][:3]


def test_the_model_health_metrics_and_page(server, tiny_run):
    about = server.request("/v1/model").json()
    assert about["classes"][1] == "circle" and about["category_ids"] == list(range(8))
    assert about["preset"] == "dino_tiny" and about["runtime"].startswith("pytorch") and about["precision"] == "fp32"
    assert about["input_size"]["short_side"] == 64 and about["token_overlay"] is False
    assert server.request("/health").json()["status"] == "ok"
    page = server.request("/")
    assert page.status == 200 and b"/static/app.js" in page.body
    script = server.request("/static/app.js")
    assert script.status == 200 and page.headers["Cache-Control"] == script.headers["Cache-Control"] == "no-cache"
    assert server.request("/v1/tokens", png(64, 48), "image/png").status == 409  # a dense encoder keeps all
    metrics = server.request("/metrics")
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert server.metric("sparsedet_requests_total", 'endpoint="/health",status="200"') >= 1


def truncated_png() -> bytes:
    data = png(60, 40, seed=1)
    return data[:len(data) // 2]


@pytest.mark.parametrize("body, content_type, query, status, says", [
    (b"GIF? no: plain words", "image/png", "", 400, "not an image"),
    (truncated_png(), "image/png", "", 400, "could not be decoded"),
    (b"", "image/png", "", 400, "empty"),
    (png(60, 40), "text/plain", "", 415, "not an image"),
    (png(60, 40), None, "", 415, "not an image"),
    (b"--x\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nhi\r\n--x--\r\n", "multipart/form-data; boundary=x",
     "", 400, "'file'"),
    (bytes(250_000), "image/png", "", 413, "--max-bytes"),
    (png(200, 150), "image/png", "", 413, "--max-pixels"),
    (png(60, 40), "image/png", "threshold=1.5", 422, "threshold"),
    (png(60, 40), "image/png", "threshold=-0.1", 422, "threshold"),
    (png(60, 40), "image/png", "threshold=high", 422, "threshold"),
    (png(60, 40), "image/png", "max_detections=0", 422, "max_detections"),
])
def test_bad_input_is_refused_with_a_message_and_the_server_keeps_serving(server, body, content_type, query,
                                                                         status, says):
    answer = server.request("/v1/predict" + (f"?{query}" if query else ""), body, content_type, method="POST")
    assert answer.status == status, answer.body
    assert says in answer.json()["detail"]
    assert server.predict(png(60, 40)).status == 200


def test_concurrent_requests_form_one_batch_and_sigterm_answers_those_in_flight(tiny_run, server):
    pictures = [png(64 + 8 * i, 48, seed=i) for i in range(4)]
    alone = [server.predict(p, "threshold=0").json()["detections"] for p in pictures]
    # A long wait: the four requests (sent at once) surely meet in one batch.
    live = start_server(tiny_run, "--max-batch", "4", "--max-wait-ms", "2000", "--workers", "1")
    try:
        answers = together([lambda p=p: live.predict(p, "threshold=0") for p in pictures])
        assert all(close(a.json()["detections"], expected) for a, expected in zip(answers, alone))
        assert live.metric("sparsedet_batch_size_count") == 1 and live.metric("sparsedet_batch_size_sum") == 4
        # Three requests wait in the batcher for a fourth (2 s); SIGTERM comes while they are in flight.
        pending = []
        senders = [threading.Thread(target=lambda p=p: pending.append(live.predict(p, "threshold=0")))
                   for p in pictures[:3]]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 60  # a bound, not a wait: each poll is one /metrics request
        while live.metric("sparsedet_requests_in_flight") < 4:  # the three, and this /metrics request
            assert time.monotonic() < deadline, "the three requests never were in flight together"
        code = live.stop()
        for sender in senders:
            sender.join(60)
    finally:
        live.process.kill()
    assert code == 0, "".join(live.output)
    assert sorted(a.status for a in pending) == [200] * 3
    assert all(any(close(a.json()["detections"], expected) for a in pending) for expected in alone[:3])
    assert "stopped" in "".join(live.output)


def test_a_full_queue_answers_503_with_retry_after(tmp_path):
    # One image per forward (a slow one: 384 px), one waiting: of 12 requests sent at once, most find
    # the queue full.
    torch.manual_seed(0)
    Detector.from_preset("dino_tiny", num_classes=2, hidden_dim=64, ffn_dim=64, num_encoder_layers=1,
                         num_decoder_layers=1, eval_size=384, eval_max_size=512).save_pretrained(tmp_path / "run")
    live = start_server(tmp_path / "run", "--max-batch", "1", "--max-queue", "1")
    try:
        answers = together([lambda i=i: live.predict(png(96, 64, seed=i)) for i in range(12)])
        assert live.request("/health").status == 200
    finally:
        assert live.stop() == 0
    statuses = sorted(a.status for a in answers)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 1, statuses
    refused = next(a for a in answers if a.status == 503)
    assert refused.headers["Retry-After"] == "1" and "busy" in json.loads(refused.body)["detail"]


def test_the_batcher_groups_what_waits_and_refuses_beyond_its_queue():
    release, calls = threading.Event(), []

    def run(items: list) -> list:
        calls.append(list(items))
        release.wait(30)
        return [item * 10 for item in items]

    async def scenario():
        batcher = Batcher(run, max_batch=2, max_wait_ms=0, max_queue=2)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(1))
        for _ in range(100_000):  # until the worker took item 1 and runs it (blocked on `release`)
            if calls:
                break
            await asyncio.sleep(0)
        queued = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0)
        assert batcher.depth == 2
        with pytest.raises(QueueFull):
            await batcher.submit(4)
        release.set()
        results = [await first] + [await q for q in queued]
        await batcher.stop()
        return results

    assert asyncio.run(scenario()) == [10, 20, 30]
    assert calls == [[1], [2, 3]]
