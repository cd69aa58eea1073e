"""The one-call GPU check (issue 31): the test suite's GPU tests and the speed and memory figures the
papers compare, measured on one GPU, written to one JSON file.

    bash benchmarks/gpu_check.sh [OUT.json]              # a GPU machine: at most 8 minutes on one H100
    bash benchmarks/gpu_check.sh OUT.json --smoke        # any machine: every section on the CPU at toy sizes

``--smoke`` proves the script, not the numbers: toy widths (an 8-channel ResNet-50, one layer each),
64x96 images, one run each, fp32 models (a CPU emulates bf16, slowly), two presets in ``predict``,
and two tests in ``pytest_gpu``. ``--skip SECTION`` leaves one out.

Needs torch (2.11 or later, with CUDA), and for its sections triton, transformers and pytest; nothing
is downloaded (random weights, no ImageNet backbone) and the package runs from ``src/``. Sections, in
order, each under its own time limit; a failure (an error, out of memory, the limit) is recorded in
its section, with whatever it measured before, and the next section runs:

- ``environment``: GPU, driver, torch, CUDA, cuDNN, triton, transformers and the other packages;
- ``deform_attn``: ``sparsedet::ms_deform_attn`` forward and forward+backward time and peak memory
  for every backend the op names that runs on the device, in the encoder case at 800x1333 (4 levels
  at strides 8 to 64: 22,223 queries; 8 heads, 4 points, 32 channels per head, batch 2) and the
  decoder cases (300 queries; 900 for DINO) over the same value, in fp32 and bf16, with each
  backend's largest difference from ``reference``;
- ``train_step``: one optimiser step (forward, losses, backward, clipping, AdamW) of ``dino_r50`` and
  ``focus_detr_r50`` in bf16, batch 2 at 800x1333: time and peak memory;
- ``predict``: every R50 preset's ``detect`` (forward and post-processing) in bf16 at batch 1 and 8,
  800x1333, and the host synchronisations of one forward (``torch.cuda.set_sync_debug_mode``);
- ``vs_transformers``: Deformable DETR (two-stage, box refinement) against transformers'
  ``DeformableDetrForObjectDetection`` with the same random weights (converted), eager, fp32 and bf16;
- ``pytest_gpu``: ``SPARSEDET_TEST_DEVICE=cuda pytest -m gpu``: counts, failures, skip reasons;
- ``targets``: the issue's targets as pass/fail fields computed from the measurements above (null
  where a measurement is missing, with the reason).

Times are CUDA-event medians after warm-up runs (CPU: ``perf_counter``); peak memory is
``torch.cuda.max_memory_allocated`` over the timed runs, above what was allocated before them.
The JSON is rewritten after every section, so a run cut short keeps what it finished.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network (transformers, its kernels)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
R50 = ("deformable_detr_r50", "deformable_detr_r50_two_stage", "dino_r50", "sparse_detr_r50", "focus_detr_r50",
       "salience_detr_r50", "conditional_detr_r50", "sam_detr_r50", "sam_detr_smca_r50", "conditional_detr_dc5_r50",
       "sam_detr_dc5_r50", "sam_detr_smca_dc5_r50", "decoupled_detr_r50")
# Token-sparse presets and their dense bases (the same decoder, queries and refinement), with the
# FPS gain their paper reports where the issue names one (Sparse DETR, rho = 0.1: +42 %).
SPARSE_BASES = {"sparse_detr_r50": ("deformable_detr_r50_two_stage", 1.42),
                "focus_detr_r50": ("dino_r50", None), "salience_detr_r50": ("dino_r50", None)}
PACKAGES = ("numpy", "scipy", "pillow", "safetensors", "tqdm", "faster-coco-eval", "pyyaml", "gdown", "triton",
            "transformers", "pytest", "pycocotools", "onnx", "onnxruntime", "onnxscript")


class Settings:
    """Sizes, repeats and time limits (seconds) of a full run, or of ``--smoke``'s CPU run."""

    def __init__(self, smoke: bool, device: torch.device):
        self.smoke, self.device = smoke, device
        self.image = (64, 96) if smoke else (800, 1333)
        self.op_batch, self.op_heads, self.op_dim = (1, 2, 4) if smoke else (2, 8, 32)
        self.op_queries = (5, 9) if smoke else (300, 900)
        self.warmup, self.runs = (0, 1) if smoke else (3, 10)
        self.model_warmup, self.model_runs = (0, 1) if smoke else (2, 5)
        self.big_batch_runs = 1 if smoke else 3  # predict at batch 8 (one warm-up)
        # bf16 on the GPU; the smoke run's CPU emulates bf16 (a toy model's backward took seconds), so fp32.
        self.precision = "fp32" if smoke else "bf16"
        self.train_presets = ("dino_r50", "focus_detr_r50")
        # The smoke run predicts with two presets (a dense one and its token-sparse variant, as the
        # targets compare them); the full run with every R50 preset.
        self.predict_presets = ("deformable_detr_r50_two_stage", "sparse_detr_r50") if smoke else R50
        self.predict_batches = (1, 2) if smoke else (1, 8)
        self.limits = ({"environment": 20, "deform_attn": 20, "train_step": 30, "predict": 60, "vs_transformers": 60,
                        "pytest_gpu": 60} if smoke else
                       {"environment": 10, "deform_attn": 45, "train_step": 45, "predict": 120, "vs_transformers": 60,
                        "pytest_gpu": 170})  # 450 s; gpu_check.sh stops everything at 470 s

    def model_overrides(self, preset: str) -> dict:
        """A full R50 preset, or for the smoke run the same kind at toy widths (an 8-channel ResNet-50,
        one layer each, 20 queries)."""
        if not self.smoke:
            return {}
        from sparsedet.presets import get_preset
        m = get_preset(preset).model
        small = {"backbone.width": 8, "hidden_dim": 32, "ffn_dim": 32, "num_heads": 4, "num_encoder_layers": 1,
                 "num_decoder_layers": 1, "num_queries": 20, "top_k": 20, "eval_size": 64, "eval_max_size": 96}
        if m.dn_queries:
            small["dn_queries"] = 6
        if m.encoder.kind in ("focus", "salience"):  # one keep ratio for the one layer, few object tokens
            small.update({"encoder.layer_ratios": [0.5], "encoder.object_tokens": 8})
        return small


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, warmup: int, runs: int) -> dict:
    """``fn()`` timed ``runs`` times after ``warmup`` untimed calls: median, min and max ms (CUDA
    events on a GPU, host clock otherwise), and the peak memory allocated during the timed runs above
    what was allocated when they started (GPU only)."""
    for _ in range(warmup):
        fn()
    sync(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(runs):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    result = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": runs,
              "warmup": warmup}
    if cuda:
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - start_bytes
        result["peak_total_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def release(device: torch.device, collect: bool = False) -> None:
    """Give cached GPU memory back (between measurements); ``collect``: also collect reference cycles
    (a model's), which takes a good part of a second."""
    if collect:
        import gc
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_text(err: BaseException) -> str:
    where = [f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_tb(err.__traceback__)][-3:]
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first} (at {', '.join(where)})"


@contextlib.contextmanager
def recorded(result: dict, key: str):
    """Run a block; an exception becomes ``result[key] = {"error": ...}`` (or, for a dict already
    there, its "error" field) instead of ending the section. The section's time limit passes through."""
    try:
        yield
    except SectionTimeout:
        raise
    except BaseException as err:  # noqa: BLE001 - out of memory, a CUDA error, a missing package
        if isinstance(err, KeyboardInterrupt):
            raise
        entry = result.setdefault(key, {})
        entry["error"] = error_text(err)


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise SectionTimeout in this (main) thread after ``seconds``."""
    def stop(signum, frame):
        raise SectionTimeout(f"over its {seconds:g} s limit")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- sections


def environment(s: Settings, out: dict) -> None:
    from sparsedet.ops import deform_attn
    from sparsedet.tools.bench import cpu_model
    from sparsedet.version import __version__
    out.update({"time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "smoke": s.smoke,
                "device": str(s.device), "python": platform.python_version(), "platform": platform.platform(),
                "cpu": cpu_model(), "cpus": os.cpu_count(), "sparsedet": __version__, "torch": torch.__version__,
                "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                "deform_attn_backends": list(deform_attn.BACKENDS),
                "deform_attn_default": deform_attn.default_backend(s.device)})
    if s.device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(s.device)
        out.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}", "cudnn": torch.backends.cudnn.version(),
                    "bf16_supported": torch.cuda.is_bf16_supported(), "driver": nvidia_driver()})
    out["packages"] = {}
    for name in PACKAGES:
        try:
            out["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out["packages"][name] = None
    out["triton"], out["transformers"] = out["packages"]["triton"], out["packages"]["transformers"]


def nvidia_driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        match = re.search(r"Kernel Module\s+(\S+)", Path("/proc/driver/nvidia/version").read_text())
        return match.group(1) if match else None
    except OSError:
        return None


def level_shapes(h: int, w: int) -> list[tuple[int, int]]:
    """The 4 levels at strides 8, 16, 32 and 64 of an h x w input (ceil, as the backbone pads)."""
    return [(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64)]


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def deform_attn_section(s: Settings, out: dict) -> None:
    """Every backend x case x dtype: forward (no grad) and forward+backward; peak memory against the
    op's own inputs and outputs (forward: value, locations, weights, output; forward+backward: those,
    the output gradient and the three input gradients)."""
    from sparsedet.ops import deform_attn
    device = s.device
    shapes = level_shapes(*s.image)
    S, L, P, M, D = sum(h * w for h, w in shapes), len(shapes), 4, s.op_heads, s.op_dim
    cases = {"encoder": S, f"decoder_{s.op_queries[0]}": s.op_queries[0], f"decoder_{s.op_queries[1]}": s.op_queries[1]}
    out.update({"shapes": shapes, "tokens": S, "batch": s.op_batch, "heads": M, "levels": L, "points": P,
                "channels_per_head": D, "cases": {}})
    out["left_out"] = left_out = {}
    for name in deform_attn.BACKENDS:
        if name == "cpu" and device.type != "cpu":
            left_out[name] = "runs on CPU tensors only"
        elif name == "triton":
            reason = getattr(getattr(deform_attn, "deform_attn_triton", None), "unusable_reason", lambda d: None)
            if reason(device):
                left_out[name] = reason(device)
    out["backends"] = backends = [b for b in deform_attn.BACKENDS if b not in left_out]
    g = torch.Generator(device="cpu").manual_seed(0)
    for case, Q in cases.items():
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            key = f"{case}_{dtype_name}"
            entry = out["cases"].setdefault(key, {"queries": Q, "dtype": dtype_name})
            with recorded(out["cases"], key):
                release(device)
                base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                value = torch.randn(s.op_batch, S, M, D, generator=g).to(device, dtype)
                loc = (torch.rand(s.op_batch, Q, M, L, P, 2, generator=g) * 1.2 - 0.1).to(device, dtype)
                weights = torch.rand(s.op_batch, Q, M, L, P, generator=g).view(s.op_batch, Q, M, -1).softmax(-1)
                weights = weights.view(s.op_batch, Q, M, L, P).to(device, dtype)
                grad = torch.randn(s.op_batch, Q, M * D, generator=g).to(device, dtype)
                held = torch.cuda.memory_allocated(device) - base if device.type == "cuda" else 0  # the inputs
                io_forward = nbytes(value, loc, weights) + nbytes(grad)  # the output has the gradient's size
                io_backward = io_forward + nbytes(grad) + nbytes(value, loc, weights)
                entry.update({"io_forward_bytes": io_forward, "io_forward_backward_bytes": io_backward})
                with torch.no_grad():
                    reference = deform_attn.ms_deform_attn(value, shapes, loc, weights, "reference").float()
                for backend in backends:
                    row = entry.setdefault(backend, {})
                    with recorded(entry, backend):
                        leaves = [t.detach().requires_grad_() for t in (value, loc, weights)]

                        def forward(backend=backend):
                            with torch.no_grad():
                                return deform_attn.ms_deform_attn(value, shapes, loc, weights, backend)

                        def forward_backward(backend=backend, leaves=leaves):
                            o = deform_attn.ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2], backend)
                            return torch.autograd.grad(o, leaves, grad)

                        row["max_abs_diff_vs_reference"] = (forward().float() - reference).abs().max().item()
                        row["forward"] = measure(forward, device, s.warmup, s.runs)
                        release(device)
                        row["forward_backward"] = measure(forward_backward, device, s.warmup, s.runs)
                        if device.type == "cuda":  # the whole footprint: the inputs + the call's own peak
                            for part, io in (("forward", io_forward), ("forward_backward", io_backward)):
                                total = held + row[part]["peak_bytes"]
                                row[part]["footprint_bytes"] = total
                                row[part]["footprint_over_io"] = total / io
                    release(device)
                del value, loc, weights, grad, reference
                release(device)


def random_targets(batch: int, num_classes: int, device: torch.device, g: torch.Generator) -> list[dict]:
    """Ten boxes per image (normalised cxcywh), random classes."""
    targets = []
    for _ in range(batch):
        centre = torch.rand(10, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(10, 2, generator=g) * 0.25 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (10,), generator=g).to(device),
                        "boxes": torch.cat([centre, size], -1).to(device)})
    return targets


def random_batch(batch: int, size: tuple[int, int], device: torch.device, g: torch.Generator):
    from sparsedet.data.batch import Batch
    images = torch.rand(batch, 3, *size, generator=g).to(device)
    return Batch(images, torch.zeros(batch, *size, dtype=torch.bool, device=device))


def train_step_section(s: Settings, out: dict) -> None:
    """One optimiser step as the trainer takes it (engine/trainer.py): autocast forward, losses in
    fp32, backward, clipping, fused AdamW; random weights, random images and ten boxes per image."""
    from sparsedet import Detector
    from sparsedet.engine.optim import make_optimizer
    from sparsedet.engine.precision import autocast, outputs_in_fp32, resolve_precision
    from sparsedet.losses.criterion import SetCriterion
    device = s.device
    out.update({"precision": s.precision, "batch": 2, "image": list(s.image)})
    for preset in s.train_presets:
        entry = out.setdefault(preset, {})
        with recorded(out, preset):
            release(device)
            torch.manual_seed(0)
            g = torch.Generator().manual_seed(0)
            model = Detector.from_preset(preset, **s.model_overrides(preset)).to(device).train()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no native bf16" on a smoke run's CPU
                dtype = resolve_precision(s.precision, device, training=True)
            t = model.run_config.train
            criterion = SetCriterion.for_model(model.config)
            optimizer = make_optimizer(model, t, device)
            batch = random_batch(2, s.image, device, g)
            targets = random_targets(2, model.num_classes, device, g)
            losses = []

            def step():
                with autocast(dtype, device):
                    result = model(batch, targets)
                loss = criterion.total(criterion(outputs_in_fp32(result), targets))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())

            entry.update({"parameters": sum(p.numel() for p in model.parameters()),
                          "autocast": str(dtype).removeprefix("torch.") if dtype else "fp32"})
            entry.update(measure(step, device, s.model_warmup, s.model_runs))
            entry["losses_finite"] = bool(torch.isfinite(torch.stack(losses)).all())
            del model, optimizer, criterion, batch, targets, losses
        release(device, collect=True)


def count_syncs(fn, device: torch.device) -> dict | None:
    """The host synchronisations of one call (CUDA's sync debug mode): how many, and where."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites: dict[str, int] = {}
    for w in seen:
        if "synchroniz" in str(w.message):
            path = w.filename.split("/sparsedet/")[-1] if "/sparsedet/" in w.filename else Path(w.filename).name
            site = f"{path}:{w.lineno}"
            sites[site] = sites.get(site, 0) + 1
    return {"count": sum(sites.values()), "sites": dict(sorted(sites.items(), key=lambda kv: -kv[1]))}


def predict_section(s: Settings, out: dict) -> None:
    """``Detector.detect`` (forward and post-processing at threshold 0, as predict runs it) of every
    R50 preset in bf16 on random images, at batch 1 and 8."""
    from sparsedet import Detector
    from sparsedet.engine.precision import inference_precision, resolve_precision
    device = s.device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dtype = resolve_precision(s.precision, device)
    out.update({"precision": s.precision, "image": list(s.image), "batches": list(s.predict_batches),
                "autocast": str(dtype).removeprefix("torch.") if dtype else "fp32", "presets": {},
                "left_out": [p for p in R50 if p not in s.predict_presets]})
    for preset in s.predict_presets:
        entry = out["presets"].setdefault(preset, {})
        with recorded(out["presets"], preset):
            release(device)
            torch.manual_seed(0)
            model = Detector.from_preset(preset, **s.model_overrides(preset)).to(device).eval()
            g = torch.Generator().manual_seed(0)
            for batch_size in s.predict_batches:
                key = f"batch_{batch_size}"
                with recorded(entry, key):
                    batch = random_batch(batch_size, s.image, device, g)
                    sizes = torch.tensor([list(s.image)] * batch_size, device=device)

                    def detect():
                        with inference_precision(model, dtype), torch.inference_mode():
                            return model.detect(batch, sizes, threshold=0.0)

                    big = batch_size > 1
                    row = measure(detect, device, min(1, s.model_warmup) if big else s.model_warmup,
                                  s.big_batch_runs if big else s.model_runs)
                    row["ms_per_image"] = row["median_ms"] / batch_size
                    row["images_per_second"] = 1000 * batch_size / row["median_ms"]
                    entry[key] = row
                    if batch_size == 1:
                        entry["host_syncs_batch_1"] = count_syncs(detect, device)
                    del batch, sizes
                release(device)
            del model
        release(device, collect=True)


def hf_deformable_detr(directory: str, smoke: bool):
    """transformers' Deformable DETR, two-stage with box refinement (ResNet from a ResNetConfig,
    nothing downloaded), random weights with sampling offsets moved off their init, saved there."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig
    depth = ("basic", [2, 2, 2, 2], [64, 128, 256, 512]) if smoke else ("bottleneck", [3, 4, 6, 3],
                                                                       [256, 512, 1024, 2048])
    backbone = ResNetConfig(layer_type=depth[0], depths=depth[1], hidden_sizes=depth[2],
                            out_features=["stage2", "stage3", "stage4"])
    layers, queries = (1, 20) if smoke else (6, 300)
    config = DeformableDetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                                  two_stage=True, with_box_refine=True, encoder_layers=layers, decoder_layers=layers,
                                  num_queries=queries, two_stage_num_proposals=queries, disable_custom_kernels=True,
                                  id2label={i: f"class{i}" for i in range(91)},
                                  label2id={f"class{i}": i for i in range(91)})
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "sampling_offsets.bias" in name else 0.01))
    model.save_pretrained(directory)
    return model


def vs_transformers_section(s: Settings, out: dict) -> None:
    """The same model and weights in both, batch 1 at 800x1333: transformers' eager forward against
    ours (forward, and detect = forward + post-processing), fp32 and bf16 (autocast in both)."""
    import transformers

    from sparsedet.engine.precision import inference_precision, resolve_precision
    from sparsedet.tools.convert import convert
    device = s.device
    out["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_deformable_detr(tmp, s.smoke)
        ours, config = convert("hf-deformable-detr", tmp)
    hf, ours = hf.to(device).eval(), ours.to(device).eval()
    m = config.model
    out["model"] = {"kind": m.kind, "two_stage": m.two_stage, "box_refine": m.box_refine,
                    "layers": [m.num_encoder_layers, m.num_decoder_layers], "queries": m.num_queries,
                    "image": list(s.image), "batch": 1}
    g = torch.Generator().manual_seed(0)
    batch = random_batch(1, s.image, device, g)
    sizes = torch.tensor([list(s.image)], device=device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    pixel_values = (batch.images - mean) / std
    pixel_mask = torch.ones(1, *s.image, dtype=torch.long, device=device)
    with torch.inference_mode():
        theirs, mine = hf(pixel_values=pixel_values, pixel_mask=pixel_mask), ours(batch)
        out["fp32_max_abs_diff"] = {"logits": (theirs.logits - mine.logits).abs().max().item(),
                                    "boxes": (theirs.pred_boxes - mine.boxes).abs().max().item()}
    for name in ("fp32", "bf16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dtype = resolve_precision(name, device)
        rows = out.setdefault(name, {"autocast": str(dtype).removeprefix("torch.") if dtype else "fp32"})

        def run_hf(dtype=dtype):
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                        enabled=dtype is not None):
                return hf(pixel_values=pixel_values, pixel_mask=pixel_mask)

        def run_ours(dtype=dtype):
            with inference_precision(ours, dtype), torch.inference_mode():
                return ours(batch)

        def run_ours_detect(dtype=dtype):
            with inference_precision(ours, dtype), torch.inference_mode():
                return ours.detect(batch, sizes, threshold=0.0)

        for key, fn in (("transformers_forward", run_hf), ("sparsedet_forward", run_ours),
                        ("sparsedet_detect", run_ours_detect)):
            with recorded(rows, key):
                rows[key] = measure(fn, device, s.model_warmup, s.model_runs)
                release(device)
        if "median_ms" in rows.get("sparsedet_detect", {}) and "median_ms" in rows.get("transformers_forward", {}):
            rows["speedup_detect_vs_transformers_forward"] = (rows["transformers_forward"]["median_ms"]
                                                              / rows["sparsedet_detect"]["median_ms"])


def pytest_section(s: Settings, out: dict, limit: float) -> None:
    """``pytest -m gpu`` in a child process on the device; counts from its JUnit XML (or, cut short
    by the limit, from its verbose log)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml, log = Path(tmp) / "junit.xml", Path(tmp) / "pytest.log"
        selection = ["tests/test_roi_align.py"] if s.smoke else ["tests"]
        cmd = [sys.executable, "-m", "pytest", *selection, "-m", "gpu", "-o", "addopts=", "-p", "no:cacheprovider",
               "-p", "no:xdist", "-v", "--junitxml", str(xml), "--durations=10"]
        env = {**os.environ, "SPARSEDET_TEST_DEVICE": str(s.device),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        env.pop("CI", None)
        out["command"] = f"SPARSEDET_TEST_DEVICE={s.device} " + " ".join(cmd[1:])
        start = time.perf_counter()
        with open(log, "w") as sink:
            child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
            try:
                out["returncode"] = child.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                out["error"] = f"pytest ran past its {limit:g} s limit; counts from its log so far"
        out["seconds"] = round(time.perf_counter() - start, 1)
        text = log.read_text(errors="replace")
        out.update(junit_summary(xml) if xml.is_file() else log_summary(text))
        out["log_tail"] = text[-3000:]


def junit_summary(path: Path) -> dict:
    root = ElementTree.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        failed, errored, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if failed is not None or errored is not None:
            counts["failed" if failed is not None else "errors"] += 1
            node = failed if failed is not None else errored
            failures.append({"test": name, "message": (node.get("message") or "")[:400]})
        elif skipped is not None:
            counts["skipped"] += 1
            reason = (skipped.get("message") or "").strip()[:200]
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skip_reasons": skips}


def log_summary(text: str) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for test, outcome in re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text, re.M):
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(outcome, "skipped")
        counts[key] += 1
        if key in ("failed", "errors"):
            failures.append({"test": test, "message": ""})
    return {**counts, "failures": failures, "skip_reasons": {}}


# --------------------------------------------------------------------------- targets


def targets(report: dict) -> dict:
    """The issue's targets, each {"target", "value", "pass"} (pass null, with "reason", where a
    measurement is missing)."""
    def get(*path):
        node = report
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    def judge(value, ok, target: str, definition: str, reason: str = "") -> dict:
        entry = {"target": target, "definition": definition, "value": value,
                 "pass": None if value is None else bool(ok(value))}
        if value is None:
            entry["reason"] = reason or "a measurement it needs is missing (see its section)"
        return entry

    result = {}
    encoder = get("deform_attn", "cases", "encoder_bf16") or {}
    triton_ms = get("deform_attn", "cases", "encoder_bf16", "triton", "forward_backward", "median_ms")
    gather_ms = get("deform_attn", "cases", "encoder_bf16", "gather", "forward_backward", "median_ms")
    no_triton = "" if "triton" in (get("deform_attn", "backends") or []) else (
        get("deform_attn", "left_out", "triton") or "the op has no triton backend here")
    result["triton_fwd_bwd_vs_gather_bf16_encoder"] = judge(
        gather_ms / triton_ms if triton_ms and gather_ms else None, lambda v: v >= 5, ">= 5",
        "gather's forward+backward median over triton's, encoder case, bf16", no_triton)
    footprint = get("deform_attn", "cases", "encoder_bf16", "triton", "forward_backward", "footprint_over_io")
    result["triton_peak_over_io_bf16_encoder"] = judge(
        footprint, lambda v: v <= 1.5, "<= 1.5",
        "triton's forward+backward footprint (inputs + the call's peak allocation) over the op's own inputs and "
        f"outputs ({encoder.get('io_forward_backward_bytes')} bytes: value, locations, weights, output, output "
        "gradient and the three input gradients), encoder case, bf16", no_triton)
    speedup = get("vs_transformers", "bf16", "speedup_detect_vs_transformers_forward")
    result["deformable_detr_predict_vs_transformers_bf16"] = judge(
        speedup, lambda v: v >= 2, ">= 2",
        "transformers' eager forward median over our detect (forward + post-processing) median, same weights, "
        "batch 1, bf16 autocast in both")
    for sparse, (base, gain) in SPARSE_BASES.items():
        for batch in (f"batch_{n}" for n in reversed(get("predict", "batches") or [])):
            mine = get("predict", "presets", sparse, batch, "median_ms")
            theirs = get("predict", "presets", base, batch, "median_ms")
            value = theirs / mine if mine and theirs else None
            key = f"{sparse}_fps_over_{base}_{batch}"
            definition = (f"{base}'s predict median over {sparse}'s, {get('predict', 'precision')}, "
                          f"{batch.replace('_', ' ')}")
            if gain is None:
                result[key] = {"target": None, "definition": definition, "value": value, "pass": None,
                               "reason": "no paper FPS gain recorded for this preset in the issue"}
            else:
                result[key] = judge(value, lambda v, gain=gain: v >= gain,
                                    f">= {gain} (the paper's +{round(100 * gain - 100)} % FPS)", definition)
    return result


# --------------------------------------------------------------------------- main


SECTIONS = ("environment", "deform_attn", "train_step", "predict", "vs_transformers", "pytest_gpu")


def write(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".part")
    temporary.write_text(json.dumps(report, indent=1, default=str))
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="gpu_check.json", help="the JSON to write (default gpu_check.json)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, one run each: proves the script")
    p.add_argument("--device", help="default: cuda (cpu with --smoke)")
    p.add_argument("--skip", action="append", default=[], choices=SECTIONS, help="leave a section out (repeatable)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    s = Settings(args.smoke, device)
    path = Path(args.out)
    report: dict = {"about": "benchmarks/gpu_check.py (issue 31): see its docstring for what each section measures",
                    "sections": {}}
    started = time.perf_counter()
    for name in SECTIONS:
        section: dict = {}
        report[name] = section
        if name in args.skip:
            section["skipped"] = "--skip"
            report["sections"][name] = "skipped"
            continue
        if device.type == "cuda" and not torch.cuda.is_available() and name != "environment":
            section["error"] = f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda})"
            report["sections"][name] = "error"
            write(report, path)
            continue
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} (limit {s.limits[name]} s) ...", flush=True)
        try:
            if name == "pytest_gpu":
                release(device)
                pytest_section(s, section, s.limits[name])
            else:
                fn = {"environment": environment, "deform_attn": deform_attn_section, "train_step": train_step_section,
                      "predict": predict_section, "vs_transformers": vs_transformers_section}[name]
                with time_limit(s.limits[name]):
                    fn(s, section)
            report["sections"][name] = "error" if "error" in section else "ok"
        except SectionTimeout as err:
            section["error"] = f"stopped: {err}; the entries above are what it finished"
            report["sections"][name] = "timeout"
        except Exception as err:  # noqa: BLE001 - recorded, and the next section runs
            section["error"] = error_text(err)
            report["sections"][name] = "error"
        section["section_seconds"] = round(time.perf_counter() - t0, 1)
        release(device)
        print(f"[gpu_check] {name}: {report['sections'][name]} in {section['section_seconds']} s", flush=True)
        write(report, path)
    report["targets"] = targets(report)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    write(report, path)
    print(f"[gpu_check] wrote {path} in {report['total_seconds']} s: " +
          ", ".join(f"{k} {v}" for k, v in report["sections"].items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
