"""What a model costs as it runs (``sparsedet bench``): parameters, multiply-adds and latency per
stage, peak memory, the encoder tokens each layer updates, and the environment the numbers came from.

Latency protocol: ``warmup`` untimed runs, then ``runs`` timed runs of the whole model
(forward + post-processing, no hooks) and ``runs`` more with the device synchronised at every stage
boundary for the per-stage split; median, min and max of each. A stage's time excludes stages
nested in it (box heads called by the decoder count as ``heads``); ``other`` is the rest of the run
(input normalisation, post-processing). Peak memory covers the warm-up and timed runs of this model
alone: on a GPU the peak allocated (weights included), on a CPU the peak RSS increase over the RSS
before the runs (weights and inputs already loaded; see ``PeakRss``).
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import statistics
import sys
import threading
from collections import defaultdict
from pathlib import Path
from time import perf_counter

import torch
from torch import nn

from ..data.batch import Batch
from ..engine.device import resolve_device
from ..engine.precision import NAMES, inference_precision, resolve_precision
from ..errors import SparsedetError
from ..ops import deform_attn
from ..ops.flops import OTHER, count_macs, hook_stages
from ..version import __version__

STAGES = ("backbone", "neck", "encoder", "queries", "decoder", "heads", OTHER)
CONVENTION = ("GFLOPs per image = 1e9 multiply-adds (one fused multiply-add = 1 FLOP, as fvcore and the DETR "
              "papers); deformable attention counted analytically (5 per sampled channel), token sparsity as run")
# Timings count as noisy (the machine may be busy) when a judged row's slowest run took over
# NOISY_RATIO times its fastest, or when the stage medians add up to more than SUM_TOLERANCE (a
# fraction) away from the whole model's median. Stages under MIN_SHARE of the total are not judged:
# a fraction of a millisecond varies by that much with no other work on the machine.
NOISY_RATIO = 2.0
SUM_TOLERANCE = 0.25
MIN_SHARE = 0.1
# Short names for sweep keys users reach for most.
SWEEP_ALIASES = {"keep_ratio": "encoder.keep_ratio"}


def load_model(target: str, overrides: dict | None = None, runtime: str = "onnxruntime"):
    """What ``bench`` measures (``resolve.resolve_model``): a run folder or zoo name (its weights), a
    preset name (random weights: cost does not depend on them) or an exported .onnx file (an
    ``OnnxDetector`` in ``runtime``, which only a file takes), on the CPU."""
    from ..api import load_ref
    from ..resolve import resolve_model
    return load_ref(resolve_model(target, "bench"), device="cpu", runtime=runtime, overrides=overrides)


def default_size(config) -> tuple[int, int]:
    """The model's own typical input: a 4:3 image resized as evaluation resizes it, short side
    ``eval_size`` and long side 4/3 of it, at most ``eval_max_size`` (800x1067 for the R50 presets:
    the mean resized COCO val2017 image, which the papers' GFLOPs correspond to)."""
    return config.eval_size, min(round(config.eval_size * 4 / 3), config.eval_max_size)


def stage_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    # Every head module, since the decoder calls the per-layer box heads directly.
    return {"backbone": [model.backbone], "neck": [model.neck], "encoder": [model.encoder],
            "queries": [model.queries], "decoder": [model.decoder], "heads": list(model.heads.modules())}


def parse_size(text: str) -> tuple[int, int]:
    """'800x1067' -> (800, 1067) as (height, width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SparsedetError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 800x1067") from None
    if h < 32 or w < 32:
        raise SparsedetError(f"size {text!r} is too small: both sides must be at least 32 pixels")
    return h, w


def parse_sweep(text: str) -> tuple[str, list]:
    """'keep_ratio=0.1,0.2' -> ('encoder.keep_ratio', [0.1, 0.2])."""
    from ..config import parse_value
    if "=" not in text:
        raise SparsedetError(f"sweep {text!r} is not KEY=V1,V2,..., e.g. keep_ratio=0.1,0.2,0.3")
    key, values = text.split("=", 1)
    key = SWEEP_ALIASES.get(key.strip(), key.strip())
    parsed = [parse_value(v.strip()) for v in values.split(",") if v.strip()]
    if not parsed:
        raise SparsedetError(f"sweep {text!r} lists no values")
    return key, parsed


def environment(device: torch.device, precision: str) -> dict:
    """The facts a latency number needs next to it."""
    env = {"sparsedet": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "device": str(device), "cpu": cpu_model(),
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "deform_attn_backend": deform_attn.default_backend(device), "precision": precision}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class StageTimer:
    """Wall time per stage in one run, exclusive of nested stages, synchronised at boundaries."""

    def __init__(self, stages: dict[str, list[nn.Module]], sync):
        self.sync, self.seconds, self._stack = sync, defaultdict(float), []
        self._hooks = hook_stages(stages, self._enter, self._leave)

    def _enter(self, name: str) -> None:
        self.sync()
        self._stack.append([name, perf_counter(), 0.0])

    def _leave(self) -> None:
        self.sync()
        name, start, nested = self._stack.pop()
        elapsed = perf_counter() - start
        self.seconds[name] += elapsed - nested
        if self._stack:
            self._stack[-1][2] += elapsed

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": 1e3 * statistics.median(values), "min": 1e3 * min(values), "max": 1e3 * max(values)}


def noise_warnings(latency_ms: dict[str, dict[str, float]]) -> list[str]:
    """Why the timings ``latency_ms`` (per stage and "total": median, min and max in ms, as
    ``bench_model`` gives them) are noisy (see NOISY_RATIO); empty when they are not."""
    total = latency_ms["total"]["median"]
    found = []
    for name, t in latency_ms.items():
        judged = name == "total" or t["median"] >= MIN_SHARE * total
        if judged and t["min"] > 0 and t["max"] > NOISY_RATIO * t["min"]:
            found.append(f"{name}: slowest run {t['max'] / t['min']:.1f}x the fastest")
    stages = sum(t["median"] for name, t in latency_ms.items() if name != "total")
    if len(latency_ms) > 1 and abs(stages - total) > SUM_TOLERANCE * total:
        found.append(f"stage medians add up to {stages:.1f} ms, {abs(stages - total) / total:.0%} off the total "
                     f"{total:.1f} ms (tolerance {SUM_TOLERANCE:.0%})")
    return found


def _noise_line(r: dict) -> list[str]:
    if not r.get("noisy"):
        return []
    return [f"  noisy timings ({'; '.join(r['noisy'])}): the machine may be busy; close other work or raise --runs"]


def _rss_bytes() -> int | None:
    """This process's resident set size now (Linux /proc/self/statm), None without /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS mark of this process to its current RSS (Linux >= 4.0; some
    sandboxes refuse it). The lifetime ``ru_maxrss`` of ``getrusage`` goes with it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, ValueError, StopIteration):
        return None


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that an earlier model's freed
    memory is not reused unseen by the next one's runs."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRss:
    """The peak resident set size of this process while the ``with`` block runs, less the RSS at its
    start: what the block added at most (CPU tensors have no allocator statistics). Read from the
    kernel's high-water mark, reset at the start, where Linux allows that; else from samples of
    /proc/self/statm every ``interval`` seconds in a background thread (a shorter peak can slip
    between two; the thread takes the GIL briefly at every sample). Without /proc (macOS,
    Windows) only the lifetime peak exists: ``increase`` stays None. Memory freed before the block
    and kept by the allocator would be reused unseen, so the heap is trimmed first."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.method = interval, "unavailable"
        self.before = self.peak = self.increase = None

    def __enter__(self) -> "PeakRss":
        _release_free_heap()
        self.before = _rss_bytes()
        if self.before is None:
            return self
        self.peak, self._thread = self.before, None
        if _reset_high_water_mark() and _high_water_mark() is not None:
            self.method = "kernel high-water mark"
        else:
            self.method = f"RSS sampled every {self.interval * 1e3:g} ms"
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm", "rb", buffering=0) as f:  # kept open: a sample costs one read
            while not self._done.wait(self.interval):
                f.seek(0)
                self.peak = max(self.peak, int(f.read().split()[1]) * page)

    def __exit__(self, *exc) -> None:
        if self.before is None:
            return
        if self._thread is not None:
            self._done.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes() or 0)
        else:
            self.peak = max(self.peak, _high_water_mark() or 0)
        self.increase = self.peak - self.before


def _peak_memory(device: torch.device, rss: PeakRss) -> dict:
    if device.type == "cuda":
        return {"kind": "torch.cuda.max_memory_allocated during the runs (weights included)",
                "mib": torch.cuda.max_memory_allocated(device) / 2**20}
    if rss.increase is None:  # no /proc: only the process's lifetime peak, which earlier work shares
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        return {"kind": "process lifetime peak RSS (includes everything run before)",
                "mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20}
    return {"kind": "peak RSS increase during the runs", "method": rss.method, "mib": rss.increase / 2**20,
            "rss_before_mib": rss.before / 2**20}


def timing_inputs(size: tuple[int, int], batch: int, device: torch.device) -> tuple[Batch, torch.Tensor]:
    """The timed runs' input: ``batch`` unpadded random images of ``size`` (seeded), and their sizes."""
    h, w = size
    g = torch.Generator().manual_seed(0)
    images = Batch(torch.rand(batch, 3, h, w, generator=g), torch.zeros(batch, h, w, dtype=torch.bool))
    return images.to(device), torch.tensor([[h, w]] * batch, device=device)


def bench_model(model: nn.Module, size: tuple[int, int], batch: int = 1, device: str | torch.device = "cpu",
                precision: str = "fp32", runs: int = 10, warmup: int = 3, progress: bool = False) -> dict:
    """Parameters, GFLOPs per stage and (``runs`` > 0) latency per stage of ``model`` on a
    ``batch`` of ``size`` (height, width) images, timed in ``precision`` ("fp32", "bf16" or "fp16"
    on CUDA; the result's "precision" says what ran)."""
    from tqdm import tqdm
    if not isinstance(model, nn.Module):
        return bench_exported(model, size, batch, precision, runs, warmup)
    device = resolve_device(device, fix="--device cpu")
    dtype = resolve_precision(precision, device)  # before the cost count: a wrong word fails at once
    model = model.to(device).eval()
    h, w = size
    inputs, sizes = timing_inputs(size, batch, device)
    stages = stage_modules(model)

    # Cost: one forward in fp32 (the count does not depend on precision), with the encoder's input shapes.
    seen = {}

    def keep_shapes(module, args, levels) -> None:
        seen["shapes"] = levels.shapes

    def forward() -> None:
        seen["out"] = model(inputs)

    hook = model.neck.register_forward_hook(keep_shapes)
    try:
        macs = count_macs(forward, stages)
    finally:
        hook.remove()
    gflops = {name: macs.get(name, 0.0) / batch / 1e9 for name in STAGES}
    gflops["total"] = macs["total"] / batch / 1e9
    tokens = sum(a * b for a, b in seen["shapes"])
    selection = seen["out"].selection
    if selection is not None:
        per_layer = [float(layer.counts.float().mean()) for layer in selection.layers]
    else:
        per_layer = [float(tokens)] * model.config.num_encoder_layers
    result = {"params": sum(p.numel() for p in model.parameters()), "size": [h, w], "batch": batch,
              "gflops": gflops, "encoder_tokens": tokens, "encoder_tokens_per_layer": per_layer}
    if runs <= 0:
        return result

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run() -> float:
        sync()
        start = perf_counter()
        model.detect(inputs, sizes)
        sync()
        return perf_counter() - start

    bar = tqdm(total=warmup + 2 * runs, desc="timing", disable=not progress, leave=False)
    totals, per_stage = [], defaultdict(list)
    # The precision's weight layout is in place before the peak-memory counters start.
    with inference_precision(model, dtype):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with PeakRss() as rss, torch.inference_mode():
            for _ in range(warmup):
                run()
                bar.update()
            for _ in range(runs):
                totals.append(run())
                bar.update()
            for _ in range(runs):
                timer = StageTimer(stages, sync)
                try:
                    elapsed = run()
                finally:
                    timer.remove()
                for name in STAGES[:-1]:
                    per_stage[name].append(timer.seconds.get(name, 0.0))
                per_stage[OTHER].append(elapsed - sum(timer.seconds.values()))
                bar.update()
    bar.close()
    result["precision"] = NAMES[dtype]
    result["latency_ms"] = {"total": _summary(totals), **{name: _summary(per_stage[name]) for name in STAGES}}
    result["noisy"] = noise_warnings(result["latency_ms"])
    result["runs"], result["warmup"] = runs, warmup
    result["memory_peak"] = _peak_memory(device, rss)
    return result


def bench_exported(model, size: tuple[int, int], batch: int = 1, precision: str = "fp32", runs: int = 10,
                   warmup: int = 3) -> dict:
    """Latency of an exported file (an ``OnnxDetector``) by the same protocol and inputs as
    ``bench_model``: ``warmup`` untimed runs, then ``runs`` timed runs of the whole file (forward and
    post-processing) in its runtime on the CPU, which "runtime" names with its version, inference
    precision and threads. No per-stage split or GFLOPs: the graph has no stage boundaries to time
    or count (bench the run folder for those)."""
    model.check_precision(precision)
    h, w = size
    inputs, sizes = timing_inputs(size, batch, torch.device("cpu"))
    result = {"weights": model.num_weights, "size": [h, w], "batch": batch, "precision": model.precision,
              "runtime": model.session.label}
    if runs <= 0:
        return result
    totals = []
    with PeakRss() as rss:
        for i in range(warmup + runs):
            start = perf_counter()
            model.detect(inputs, sizes)
            if i >= warmup:
                totals.append(perf_counter() - start)
    result["latency_ms"] = {"total": _summary(totals)}
    result["noisy"] = noise_warnings(result["latency_ms"])
    result["runs"], result["warmup"] = runs, warmup
    result["memory_peak"] = _peak_memory(torch.device("cpu"), rss)
    return result


def format_result(name: str, r: dict) -> str:
    """One model's table: GFLOPs and latency per stage (an exported file: its total latency)."""
    if "runtime" in r:
        return _format_exported(name, r)
    h, w = r["size"]
    timed = "latency_ms" in r
    ran = f"  {r['precision']}" if timed else ""  # the precision the timed runs ran in
    lines = [f"{name}  {h}x{w}  batch {r['batch']}{ran}  params {r['params'] / 1e6:.1f} M"]
    header = f"  {'stage':9s} {'GFLOPs':>8s}"
    if timed:
        header += f" {'median ms':>10s} {'min ms':>8s} {'max ms':>8s}"
    lines.append(header)
    for stage in STAGES + ("total",):
        line = f"  {stage:9s} {r['gflops'][stage]:8.2f}"
        if timed:
            t = r["latency_ms"][stage]
            line += f" {t['median']:10.1f} {t['min']:8.1f} {t['max']:8.1f}"
        lines.append(line)
    per_layer = ", ".join(f"{n:.0f}" for n in r["encoder_tokens_per_layer"])
    lines.append(f"  encoder tokens updated per layer: {per_layer} (of {r['encoder_tokens']})")
    if timed:
        mem = r["memory_peak"]
        detail = f", over {mem['rss_before_mib']:.0f} MiB before them; {mem['method']}" if "method" in mem else ""
        lines.append(f"  peak memory: {mem['mib']:.0f} MiB ({mem['kind']}{detail}); {r['runs']} timed runs after "
                     f"{r['warmup']} warm-up")
    return "\n".join(lines + _noise_line(r))


def _format_exported(name: str, r: dict) -> str:
    h, w = r["size"]
    lines = [f"{name}  {h}x{w}  batch {r['batch']}  {r['precision']}  {r['runtime']}  weights "
             f"{r['weights'] / 1e6:.1f} M values"]
    if "latency_ms" in r:
        t = r["latency_ms"]["total"]
        lines.append(f"  {'total':9s} median {t['median']:.1f} ms, min {t['min']:.1f}, max {t['max']:.1f}")
        lines.append(f"  peak memory: {r['memory_peak']['mib']:.0f} MiB ({r['memory_peak']['kind']}); {r['runs']} "
                     f"timed runs after {r['warmup']} warm-up")
    return "\n".join(lines + _noise_line(r))


def format_sweep(key: str, values: list, results: list[dict]) -> str:
    """A sweep's cost curve, one row per value."""
    timed = "latency_ms" in results[0]
    lines = [f"  {key:>20s} {'GFLOPs':>8s} {'encoder':>8s} {'tokens/layer':>12s}"
             + (" median ms precision" if timed else "")]
    for value, r in zip(values, results):
        mean_tokens = sum(r["encoder_tokens_per_layer"]) / len(r["encoder_tokens_per_layer"])
        line = f"  {value!s:>20s} {r['gflops']['total']:8.2f} {r['gflops']['encoder']:8.2f} {mean_tokens:12.0f}"
        if timed:
            line += f" {r['latency_ms']['total']['median']:9.1f} {r['precision']:>9s}"
        lines.append(line)
    noisy = [str(value) for value, r in zip(values, results) if r.get("noisy")]
    if noisy:
        lines.append(f"  noisy timings at {key}={', '.join(noisy)} (--json has why): the machine may be busy; "
                     "close other work or raise --runs")
    return "\n".join(lines)


def format_environment(env: dict) -> str:
    return "environment: " + ", ".join(f"{k} {v}" for k, v in env.items())


def plot_ap_vs_gflops(points: list[tuple[str, float, float, dict | None]], out: str | Path) -> None:
    """AP against GFLOPs, one labelled point per (label, gflops, ap, corr) (the papers' accuracy-cost
    figure). ``corr`` is a run's ``metrics.json`` "corr" ({"mean", "per_layer"}) or None: where any run
    has one, the labels carry its mean and a second panel draws Corr per encoder layer."""
    from .plots import pyplot, save_figure
    with_corr = [(label, corr) for label, _, _, corr in points if corr and corr.get("mean") is not None]
    fig, axes = pyplot().subplots(1, 1 + bool(with_corr), figsize=(5 + 4 * bool(with_corr), 4), dpi=120,
                                  squeeze=False)
    ax = axes[0, 0]
    for label, gflops, ap, corr in points:
        text = label if (label, corr) not in with_corr else f"{label} (Corr {corr['mean']:.2f})"
        ax.scatter([gflops], [100 * ap], s=30)
        ax.annotate(text, (gflops, 100 * ap), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("GFLOPs")
    ax.set_ylabel("AP")
    ax.grid(alpha=0.3)
    if with_corr:
        ax = axes[0, 1]
        for label, corr in with_corr:
            ax.plot(range(len(corr["per_layer"])), corr["per_layer"], marker="o", label=label)
        ax.set_xticks(range(max(len(corr["per_layer"]) for _, corr in with_corr)))
        ax.set_xlabel("encoder layer")
        ax.set_ylabel("Corr (decoder attention on kept tokens)")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    save_figure(fig, out)
