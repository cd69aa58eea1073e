"""Load test of ``sparsedet serve`` on loopback: N concurrent clients for T seconds, against a run
folder and against its ONNX export.

For each target: start ``sparsedet serve --port 0`` (default batching: --max-batch 8,
--max-wait-ms 5), warm it up with the same load for --warmup seconds, read the server's resident
memory, then let --clients threads each send one image after another (keep-alive connections, raw
PNG bodies, the images in turn) for --seconds, and read the memory again. Reports per target:
answers (200), 503s (the documented refusal of a full queue), errors (any other status or a failed
connection), p50/p99 latency of the 200s, throughput (200s per second), the server's memory growth
after warm-up, and the batches the server formed (its /metrics). The sequential baseline is a
``predict`` loop, one image per call, in this process on all cores, on the same images for the
same time: what a user gets by calling the model in a loop. It runs before and after a target's
server rows, and the faster of the two counts (the machine's drift would otherwise flatter one
side). ``--serve-options`` (repeatable) gives one row per set of ``sparsedet serve`` options.

    python benchmarks/serve_load.py                          # dino_tiny (random weights) and its ONNX file
    python benchmarks/serve_load.py --clients 16 --seconds 60 --warmup 10 \
        --serve-options "" --serve-options "--max-batch 8" --serve-options "--workers 1 --max-batch 8"

Run it with nothing else on the machine: clients, server and baseline share the CPU.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from sparsedet import Detector
from sparsedet.api import load_detector
from sparsedet.data.synthetic import write_synthetic
from sparsedet.tools.bench import environment, format_environment


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Server:
    """``sparsedet serve`` in a subprocess, on a free loopback port."""

    def __init__(self, weights: str, options: list[str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sparsedet", "serve", "--weights", weights, "--port", "0", *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.process.stdout:
            if line.startswith("serving ") and " on http://" in line:
                host, port = line.split(" on http://", 1)[1].split()[0].split(":")
                self.host, self.port = host, int(port)
                break
        else:
            raise RuntimeError(f"the server did not start (exit {self.process.wait()})")
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # drain the rest

    def get(self, path: str) -> str:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        connection.request("GET", path)
        return connection.getresponse().read().decode()

    def metric(self, name: str) -> float:
        return next((float(line.split()[-1]) for line in self.get("/metrics").splitlines()
                     if line.startswith(name + " ")), 0.0)

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(120)


def load(server: Server, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """``clients`` threads sending for ``seconds``; statuses and latencies."""
    latencies, statuses, failures = [], [], []
    stop_at = time.perf_counter() + seconds
    start = threading.Barrier(clients)

    def client(k: int) -> None:
        connection = http.client.HTTPConnection(server.host, server.port, timeout=120)
        start.wait()
        i = k
        while time.perf_counter() < stop_at:
            body = bodies[i % len(bodies)]
            i += clients
            sent = time.perf_counter()
            try:
                connection.request("POST", "/v1/predict", body, {"Content-Type": "image/png"})
                answer = connection.getresponse()
                answer.read()
            except (OSError, http.client.HTTPException) as err:
                failures.append(repr(err))
                connection.close()
                connection = http.client.HTTPConnection(server.host, server.port, timeout=120)
                continue
            statuses.append(answer.status)
            if answer.status == 200:
                latencies.append(time.perf_counter() - sent)
        connection.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    latencies.sort()
    ok = statuses.count(200)
    return {"answers": ok, "refused_503": statuses.count(503),
            "errors": len(failures) + sum(s not in (200, 503) for s in statuses), "failures": failures[:3],
            "seconds": round(wall, 2), "throughput": round(ok / wall, 2),
            "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)
            if latencies else None}


def sequential(weights: str, paths: list[Path], seconds: float) -> dict:
    """A ``predict`` loop, one image per call, for ``seconds`` (after one warm-up call)."""
    model = load_detector(weights)
    model.predict(str(paths[0]))
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.predict(str(paths[done % len(paths)]))
        done += 1
    wall = time.perf_counter() - start
    return {"images": done, "seconds": round(wall, 2), "throughput": round(done / wall, 2)}


def measure(weights: str, label: str, paths: list[Path], options: str, args) -> dict:
    bodies = [p.read_bytes() for p in paths]
    print(f"{label}, serve {options or '(defaults)'}: {args.clients} clients for {args.warmup:g} s warm-up + "
          f"{args.seconds:g} s ...", flush=True)
    server = Server(weights, options.split())
    try:
        load(server, bodies, args.clients, args.warmup)
        before = resident_mib(server.process.pid)
        batches_before = (server.metric("sparsedet_batch_size_count"), server.metric("sparsedet_batch_size_sum"))
        result = load(server, bodies, args.clients, args.seconds)
        about = json.loads(server.get("/v1/model"))
        after = resident_mib(server.process.pid)
        batches = server.metric("sparsedet_batch_size_count") - batches_before[0]
        images = server.metric("sparsedet_batch_size_sum") - batches_before[1]
    finally:
        code = server.stop()
    result.update(target=label, weights=weights, options=options or "(defaults)",
                  rss_mib_after_warmup=round(before, 1), rss_mib_end=round(after, 1),
                  rss_growth_pct=round(100 * (after - before) / before, 2),
                  mean_batch=round(images / batches, 2) if batches else None, exit_code=code,
                  workers=about["workers"], threads_per_worker=about["threads_per_worker"],
                  max_batch=about["max_batch"])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", help="run folder (default: dino_tiny with random weights; the speed does not "
                   "depend on them)")
    p.add_argument("--onnx", help="its exported file (default: exported here)")
    p.add_argument("--run-only", action="store_true", help="leave out the ONNX file")
    p.add_argument("--images", help="folder of PNG images (default: 16 synthetic 256-px images)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--warmup", type=float, default=10)
    p.add_argument("--serve-options", action="append", help="options for `sparsedet serve`, e.g. \"--max-batch 2 "
                   "--workers 1\"; repeat for one row each (default: one row with its defaults)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    env = environment(torch.device("cpu"), "fp32")
    print(format_environment(env))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = args.weights
        if weights is None:
            torch.manual_seed(0)
            weights = str(tmp / "dino_tiny")
            Detector.from_preset("dino_tiny", num_classes=5).save_pretrained(weights)
        onnx = args.onnx
        if onnx is None and not args.run_only:
            onnx = str(tmp / "model.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                Detector.from_pretrained(weights).export_onnx(onnx)
        if args.images:
            paths = sorted(Path(args.images).glob("*.png"))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info = write_synthetic(tmp / "data", n_train=1, n_val=16, size=256, seed=0)
            paths = sorted((Path(info["root"]) / "images" / "val").glob("*.png"))
        rows = []
        targets = [(weights, "run folder (PyTorch fp32)"), (onnx, "ONNX file (onnxruntime fp32)")]
        for target, label in targets[:1] if args.run_only else targets:
            # The loop before and after the server rows; the faster of the two is the baseline (the
            # machine's drift during the run would otherwise flatter one side).
            print(f"{label}: sequential predict loop for {args.seconds:g} s ...", flush=True)
            before = sequential(target, paths, args.seconds)
            measured = [measure(target, label, paths, options, args) for options in args.serve_options or [""]]
            print(f"{label}: sequential predict loop again ...", flush=True)
            after = sequential(target, paths, args.seconds)
            for r in measured:
                r["sequential_throughput"] = max(before["throughput"], after["throughput"])
                r["sequential_runs"] = [before["throughput"], after["throughput"]]
                r["speedup"] = round(r["throughput"] / r["sequential_throughput"], 2)
            rows += measured
    print(f"\n{args.clients} clients, {args.seconds:g} s after {args.warmup:g} s warm-up; sequential loop on "
          f"{torch.get_num_threads()} threads")
    print("| target | serve options | workers x threads | answers/s | sequential predict/s | speed-up | p50 ms | p99 ms | mean batch | 503s | errors | "
          "memory growth |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['target']} | {r['options']} | {r['workers']} x {r['threads_per_worker']} | {r['throughput']} | {r['sequential_throughput']} | {r['speedup']}x | {r['p50_ms']} | "
              f"{r['p99_ms']} | {r['mean_batch']} | {r['refused_503']} | {r['errors']} | {r['rss_growth_pct']} % "
              f"({r['rss_mib_after_warmup']} -> {r['rss_mib_end']} MiB) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
