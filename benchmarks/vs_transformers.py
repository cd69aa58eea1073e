"""Our Deformable DETR against Hugging Face transformers', same weights, same input, one process.

Builds transformers' ``DeformableDetrForObjectDetection`` (two-stage, iterative box refinement,
ResNet-50 from a ``ResNetConfig``, 6 + 6 layers, 300 queries, 91 classes, random weights: nothing is
downloaded), converts it with ``sparsedet convert --from hf-deformable-detr`` into our
``deformable_detr_r50_two_stage`` layout, checks both give the same detections, then times the two
eager forwards (no post-processing, ``inference_mode``) on one image, alternating transformers / ours
run by run so drifts of the machine hit both alike, and prints the medians and their ratio.

Ours runs as ``predict`` runs it (backbone channels_last). Also times, in the same alternation: ours
in bf16 (``precision="bf16"``: dense layers in bf16, sampling and box arithmetic in fp32) and ``focus_detr_r50`` (random weights)
in bf16, the token-sparse model against transformers' dense one (the bf16 rows are left out on a
CPU without native bf16, where it is emulated). Before timing it checks that our
fp32 outputs with the default deformable-attention backend equal the ``reference`` (grid_sample)
backend's within 1e-4 and prints the bf16 difference.

With ``--files``, both models are also exported for any input size (checked against PyTorch),
quantised to int8 with ``sparsedet.tools.quantize.DEFAULT_RECIPE`` (ranges from
``--calibration-images`` of the export's sample pictures at --size: the weights are random, so
only the speed means anything here; the AP cost of int8 is measured on trained models by
``int8_sensitivity.py`` and ``sparsedet export --int8``), and each file is timed in onnxruntime and,
when installed, OpenVINO (f32 inference precision): rows "<model> <precision> <runtime>".

    python benchmarks/vs_transformers.py --size 800x1333 --runs 5 [--files]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sparsedet import Detector  # noqa: E402
from sparsedet.data.batch import Batch  # noqa: E402
from sparsedet.engine.precision import cpu_has_native_bf16, inference_precision, resolve_precision  # noqa: E402
from sparsedet.ops import deform_attn  # noqa: E402
from sparsedet.tools.bench import environment, format_environment, parse_size  # noqa: E402
from sparsedet.tools.convert import convert  # noqa: E402
from sparsedet.tools.export import describe, export_onnx, prepare, sample_images  # noqa: E402
from sparsedet.tools.quantize import DEFAULT_RECIPE, quantize_file  # noqa: E402
from sparsedet.tools.runtimes import open_session  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def hf_deformable_detr(directory: str):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig
    backbone = ResNetConfig(depths=[3, 4, 6, 3], layer_type="bottleneck", hidden_sizes=[256, 512, 1024, 2048],
                            out_features=["stage2", "stage3", "stage4"])
    config = DeformableDetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                                  two_stage=True, with_box_refine=True, num_queries=300,
                                  two_stage_num_proposals=300, id2label={i: f"class{i}" for i in range(91)},
                                  label2id={f"class{i}": i for i in range(91)})
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(config).eval()
    with torch.no_grad():  # move sampling offsets off their structured init so the check below means something
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "sampling_offsets.bias" in name else 0.01))
    model.save_pretrained(directory)
    return model


def time_alternating(runs: dict, count: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each of ``runs`` (name: callable), run after run in turn so that drifts of the
    machine hit all alike; prints each round."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {name: [] for name in runs}
    for i in range(count):
        for name, fn in runs.items():
            start = time.perf_counter()
            with torch.inference_mode():
                fn()
            times[name].append(time.perf_counter() - start)
        print(f"run {i + 1}/{count}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    return times


def file_runs(name: str, model, folder: Path, feeds: dict, calibration_images: int, threads: int) -> dict:
    """Export ``model`` (any input size), quantise it to int8 (calibrated on the export's sample
    pictures at the size of ``feeds``), and return a timed run per file and runtime on ``feeds``,
    the input the eager rows time."""
    float_path, int8_path = folder / f"{name}.onnx", folder / f"{name}.int8.onnx"
    start = time.perf_counter()
    report = export_onnx(model, float_path)
    print(f"{name}: export + check {time.perf_counter() - start:.0f} s: {describe(report)}", flush=True)
    pictures = sample_images(feeds["images"].shape[-2:], calibration_images)
    start = time.perf_counter()
    quantised = quantize_file(float_path, int8_path, (prepare(model, [p]) for p in pictures), calibration_images,
                              DEFAULT_RECIPE)
    print(f"{name}: int8 ({DEFAULT_RECIPE.name} recipe) in {time.perf_counter() - start:.0f} s: {quantised}",
          flush=True)
    runs = {}
    for runtime in available_runtimes():
        for precision, path in (("fp32", float_path), ("int8", int8_path)):
            session = open_session(path, runtime, threads)
            print(f"{name} {precision} {runtime}: {session.label}", flush=True)
            runs[f"{name} {precision} {runtime}"] = lambda s=session: s.run(feeds)
    return runs


def available_runtimes() -> list[str]:
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("OpenVINO is not installed (pip install 'sparsedet[openvino]'): its rows are left out")
        return ["onnxruntime"]
    return ["onnxruntime", "openvino"]


def output_difference(out, logits, boxes) -> float:
    return max((out.logits - logits).abs().max().item(), (out.boxes - boxes).abs().max().item())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="800x1333", help="HEIGHTxWIDTH (default 800x1333)")
    p.add_argument("--runs", type=int, default=5, help="timed runs of each model (default 5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--files", action="store_true", help="also time the exported fp32 and int8 files")
    p.add_argument("--calibration-images", type=int, default=4, help="int8 calibration pictures (default 4)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    h, w = parse_size(args.size)

    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_deformable_detr(tmp)
        ours, config = convert("hf-deformable-detr", tmp)
    ours.eval()
    m = config.model
    print(f"ours: kind={m.kind} two_stage={m.two_stage} box_refine={m.box_refine} layers "
          f"{m.num_encoder_layers}+{m.num_decoder_layers} queries {m.num_queries} classes {m.num_classes}")

    images = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    batch = Batch(images, mask)
    pixel_values, pixel_mask = (images - MEAN) / STD, torch.ones(1, h, w, dtype=torch.long)

    def run_hf():
        return hf(pixel_values=pixel_values, pixel_mask=pixel_mask)

    def run_ours():
        return ours(batch)

    focus = Detector.from_preset("focus_detr_r50").eval()
    bf16 = resolve_precision("bf16", torch.device("cpu"))
    backend = deform_attn.default_backend("cpu")

    def in_precision(model, dtype):
        """The model as ``predict`` runs it: backbone channels_last, autocast to ``dtype``."""
        def run():
            with inference_precision(model, dtype), torch.inference_mode():
                return model(batch)
        return run

    runs = {"transformers fp32": run_hf, "sparsedet fp32": in_precision(ours, None)}
    if cpu_has_native_bf16():
        runs.update({"sparsedet bf16": in_precision(ours, bf16), "focus_detr_r50 bf16": in_precision(focus, bf16)})
    else:
        print("this CPU has no native bf16 (emulated, slower than fp32): the bf16 rows are left out")
    # Compared before the two-stage top-k: with random weights, proposals a rounding apart can swap
    # at its edge (the tests follow the reference's picks there, tests/ties.py); the encoder
    # memory, where the backends differ, is compared directly, then the final outputs are shown.
    memory = []
    ours.encoder.register_forward_hook(lambda module, args, out: memory.append(out.memory))
    with torch.inference_mode():
        expected, got = run_hf(), run_ours()
        diff = (memory[-1] - expected.encoder_last_hidden_state).abs().max().item()
        print(f"same weights, same input: encoder memory against transformers max |difference| = {diff:.2e}; "
              f"final logits and boxes {output_difference(got, expected.logits, expected.pred_boxes):.2e}")
        deform_attn.set_default_backend("reference")
        reference = run_ours()
        deform_attn.set_default_backend(None)
        diff = (memory[-2] - memory[-1]).abs().max().item()
        print(f"fp32, backend {backend} against reference: encoder memory max |difference| = {diff:.2e}; final "
              f"logits and boxes {output_difference(got, reference.logits, reference.boxes):.2e}")
        assert diff <= 1e-4, f"the {backend} backend differs from reference by {diff:.2e}"
    if args.files:
        with tempfile.TemporaryDirectory() as tmp:
            feeds = {"images": images.numpy(), "mask": mask.numpy(), "sizes": np.array([[h, w]], dtype=np.int64)}
            for name, model in (("sparsedet", ours), ("focus_detr_r50", focus)):
                runs.update(file_runs(name, model, Path(tmp), feeds, args.calibration_images, args.threads))
            times = time_alternating(runs, args.runs, args.warmup)
    else:
        times = time_alternating(runs, args.runs, args.warmup)

    import transformers
    print(format_environment({**environment(torch.device("cpu"), "fp32 and bf16 (per row)"),
                              "transformers": transformers.__version__}))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nbatch 1, {h}x{w}, eager, {args.runs} runs alternating, deformable attention backend {backend}\n")
    print("| model | precision | runtime | median s | min | max | transformers fp32 / this |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, values in times.items():
        model, precision, *runtime = name.split(" ")
        runtime = runtime[0] if runtime else "PyTorch eager"
        print(f"| {model} | {precision} | {runtime} | {med[name]:.2f} | {min(values):.2f} | {max(values):.2f} | "
              f"{med['transformers fp32'] / med[name]:.2f}x |")


if __name__ == "__main__":
    main()
