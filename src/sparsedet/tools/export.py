"""ONNX export: one file per model, post-processing inside, checked in onnxruntime.

The exported graph takes ``images`` [B, 3, H, W] (RGB float in [0, 1], padded), ``mask`` [B, H, W]
(True on padding) and ``sizes`` [B, 2] (each image's original (height, width), int64), at any H x W
(or the one fixed size asked for); normalisation happens inside. It returns ``boxes`` [B, k, 4] (xyxy
in original pixels, clipped), ``scores`` [B, k] and ``labels`` [B, k] (the run's category ids),
sorted by score: what ``predict`` returns before its threshold. ``prepare`` makes those inputs from
images. The class table, the input size and the pre-processing are in the file's metadata.

Deformable attention leaves the graph as ONNX ``GridSample`` per level (``ms_deform_attn_onnx``),
Salience DETR's proposal NMS as ``NonMaxSuppression`` (``cell_nms_onnx``), and the token-sparse
encoders' keep widths as values computed from the mask, so that every preset computes on any
padded batch what PyTorch computes.
Needs ``pip install 'sparsedet[export]'`` (onnx, onnxruntime, onnxscript), imported only here.
"""
from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..data.batch import Batch
from ..errors import SparsedetError
from ..filewrite import atomic_write
from ..version import __version__

INPUTS, OUTPUTS = ["images", "mask", "sizes"], ["boxes", "scores", "labels"]
# Agreement the export check asks of onnxruntime against PyTorch, per precision: (box px, score).
TOLERANCES = {"fp32": (0.5, 1e-3), "fp16": (2.0, 1e-2)}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


class ExportedDetector(nn.Module):
    """A detector with its fixed-shape post-processing: (images, mask, sizes) -> (boxes, scores,
    labels), see the module docstring."""

    def __init__(self, model: nn.Module, top_k: int):
        super().__init__()
        self.model, self.top_k = model, top_k
        self.register_buffer("category_ids", torch.tensor(model.category_ids, device=model.image_mean.device))

    def forward(self, images: Tensor, mask: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images stay fp32 in every precision: the model's own dtype starts inside the graph, and
        the post-processing is fp32."""
        out = self.model(Batch(images.to(self.model.image_mean.dtype), mask))
        xyxy, scores, labels = self.model.postprocess(out.logits, out.boxes, sizes, self.top_k)
        return xyxy, scores, self.category_ids[labels]


def sample_size(model) -> tuple[int, int]:
    """A square of the longest resized side: every aspect ratio fits."""
    side = -(-model.config.eval_max_size // 32) * 32
    return side, side


def prepare(model, images: list, size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Images (anything ``Detector.predict`` takes) -> the exported model's inputs: resized as
    ``predict`` resizes them (short side ``eval_size``, long side at most ``eval_max_size``), then
    padded to the largest of the batch, or to ``size`` (height, width) for a fixed-size export."""
    batch, sizes, _ = model.preprocess(images)
    return inputs(batch, sizes, size)


def inputs(batch: Batch, sizes: Tensor, size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """A padded batch and its images' original (height, width) [B, 2] -> the exported model's
    inputs, padded further to ``size`` where the export fixed it."""
    images, mask = batch.images, batch.mask
    if size is not None:
        h, w = images.shape[-2:]
        if h > size[0] or w > size[1]:
            raise SparsedetError(f"a resized image is {h}x{w}, larger than the exported input {size[0]}x{size[1]}; "
                                 f"export with --size {max(h, size[0])}x{max(w, size[1])} or without --size")
        pad = (0, size[1] - w, 0, size[0] - h)
        images, mask = nn.functional.pad(images, pad), nn.functional.pad(mask, pad, value=True)
    return {"images": images.float().numpy(), "mask": mask.numpy(), "sizes": sizes.numpy().astype(np.int64)}


def ms_deform_attn_onnx(value, shapes, locations, weights, backend):
    """``sparsedet::ms_deform_attn`` in ONNX ops (opset 16-19): one GridSample per level, as the
    ``reference`` backend computes it. ``shapes`` is the flat (H_0, W_0, H_1, ...) list: ints, or
    scalar int64 values where the input size is dynamic."""
    from onnxscript import opset18 as op

    def ints(*values):
        return op.Constant(value_ints=list(values))

    def dim(n):  # an int or a scalar value -> a 1-element int64 tensor
        return ints(n) if isinstance(n, int) else op.Reshape(n, ints(1))

    heads_dim = op.Shape(value, start=3, end=4)
    batch = op.Shape(value, start=0, end=1)
    per_head = op.Transpose(value, perm=[0, 2, 3, 1])  # [B, M, D, S]
    grids = op.Sub(op.Mul(locations, op.Constant(value_float=2.0)), op.Constant(value_float=1.0))
    grids = op.Transpose(grids, perm=[0, 2, 1, 3, 4, 5])  # [B, M, Q, L, P, 2]
    grids = op.Reshape(grids, op.Concat(ints(-1), op.Shape(grids, start=2), axis=0))  # [B*M, Q, L, P, 2]
    wts = op.Transpose(weights, perm=[0, 2, 1, 3, 4])  # [B, M, Q, L, P]
    wts = op.Reshape(wts, op.Concat(ints(-1, 1), op.Shape(wts, start=2), axis=0))  # [B*M, 1, Q, L, P]
    out, start = None, ints(0)
    for level in range(len(shapes) // 2):
        h, w = dim(shapes[2 * level]), dim(shapes[2 * level + 1])
        end = op.Add(start, op.Mul(h, w))
        v = op.Slice(per_head, start, end, ints(3))
        v = op.Reshape(v, op.Concat(ints(-1), heads_dim, h, w, axis=0))  # [B*M, D, h, w]
        start = end
        sampled = op.GridSample(v, op.Gather(grids, op.Constant(value_int=level), axis=2),
                                align_corners=0, mode="bilinear", padding_mode="zeros")  # [B*M, D, Q, P]
        part = op.ReduceSum(op.Mul(sampled, op.Gather(wts, op.Constant(value_int=level), axis=3)), ints(-1),
                            keepdims=0)  # [B*M, D, Q]
        out = part if out is None else op.Add(out, part)
    out = op.Reshape(out, op.Concat(batch, ints(-1), op.Shape(out, start=2), axis=0))  # [B, M*D, Q]
    return op.Transpose(out, perm=[0, 2, 1])


def stable_sort_onnx(x, stable=None, dim=-1, descending=False):
    """``aten.sort.stable`` (``ops.functional.top_k``'s sort) as ONNX TopK over the whole axis,
    whose ties go to the lower index: what a stable sort does."""
    from onnxscript import opset18 as op
    n = op.Shape(x, start=dim, end=dim + 1) if dim != -1 else op.Shape(x, start=-1)
    return op.TopK(x, n, axis=dim, largest=1 if descending else 0, sorted=1)


def cell_nms_onnx(level, x, y, iou_threshold):
    """``sparsedet::cell_nms`` as ONNX NonMaxSuppression over the boxes (x - 1, y - 1, x + 1, y + 1),
    shifted apart per level so that levels never overlap, scored by candidate rank (candidates come
    best first, so the greedy order is the same); the selected indices are scattered into a mask."""
    from onnx import TensorProto
    from onnxscript import opset18 as op

    def ints(*values):
        return op.Constant(value_ints=list(values))

    n = op.Shape(x, start=1, end=2)
    shift = op.Mul(op.Cast(level, to=TensorProto.FLOAT), op.Constant(value_float=1e5))
    xf, yf = op.Add(op.Cast(x, to=TensorProto.FLOAT), shift), op.Cast(y, to=TensorProto.FLOAT)
    one = op.Constant(value_float=1.0)
    corners = [op.Sub(yf, one), op.Sub(xf, one), op.Add(yf, one), op.Add(xf, one)]
    boxes = op.Concat(*[op.Unsqueeze(c, ints(-1)) for c in corners], axis=-1)  # [B, n, 4] as (y1, x1, y2, x2)
    rank = op.Cast(op.Range(op.Squeeze(n, ints(0)), op.Constant(value_int=0), op.Constant(value_int=-1)),
                   to=TensorProto.FLOAT)  # n, n - 1, ..., 1
    scores = op.Expand(op.Reshape(rank, ints(1, 1, -1)), op.Concat(op.Shape(x, start=0, end=1), ints(1), n, axis=0))
    selected = op.NonMaxSuppression(boxes, scores, n, op.Constant(value_floats=[iou_threshold]))  # [K, 3]
    where = op.Gather(selected, ints(0, 2), axis=1)  # (image, candidate)
    ones = op.Expand(op.Constant(value_int=1), op.Shape(selected, start=0, end=1))
    return op.Cast(op.ScatterND(op.Mul(x, op.Constant(value_int=0)), where, ones), to=TensorProto.BOOL)


def export_onnx(model, path: str | Path, size: tuple[int, int] | None = None, opset: int = 18,
                top_k: int | None = None, precision: str = "fp32") -> dict:
    """Write ``model`` (a ``Detector``) to ``path`` as ONNX for inputs of any size, or of ``size``
    (height, width) only, then run the file in onnxruntime on sample images and compare with
    PyTorch. ``precision`` "fp16" stores and computes the model in fp16 (inputs and outputs stay
    fp32; sampling and post-processing run in fp32 as in bf16) and checks it against PyTorch in
    fp16, within 2 px and 1e-2. Returns the comparison; when it fails, the file is kept as
    ``*.mismatch.onnx`` and SparsedetError says by how much."""
    try:
        import onnx
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise SparsedetError(f"export needs onnx, onnxruntime and onnxscript: pip install 'sparsedet[export]' ({e})")
    if not 16 <= opset <= 19:
        raise SparsedetError(f"--opset must be 16 to 19 (GridSample with mode 'bilinear'), got {opset}")
    if precision not in PRECISIONS:
        raise SparsedetError(f"--precision must be one of {', '.join(PRECISIONS)} for export, got {precision!r}")
    path = Path(path)
    run_config = model.run_config
    if precision != "fp32":
        model = copy.deepcopy(model)  # the caller's model stays as it was
    model = model.eval().to(PRECISIONS[precision])
    wrapper = ExportedDetector(model, top_k or model.config.top_k).eval()
    sample = prepare(model, sample_images(size or sample_size(model), 2), size)
    # Traced where the model is (a GPU too): the graph holds no device, the file runs anywhere.
    args = tuple(torch.from_numpy(sample[k]).to(model.image_mean.device) for k in INPUTS)
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic = {"images": {0: batch}, "mask": {0: batch}, "sizes": {0: batch}}
    if size is None:  # the coarsest (stride 64) map must be wider than one cell
        height, width = torch.export.Dim("height", min=65, max=8192), torch.export.Dim("width", min=65, max=8192)
        dynamic["images"].update({2: height, 3: width})
        dynamic["mask"].update({1: height, 2: width})
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" and other chatter of the exporter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
        try:
            program = torch.onnx.export(
                wrapper, args, dynamo=True, opset_version=opset, input_names=INPUTS, output_names=OUTPUTS,
                dynamic_shapes=dynamic,
                custom_translation_table={torch.ops.sparsedet.ms_deform_attn.default: ms_deform_attn_onnx,
                                          torch.ops.aten.sort.stable: stable_sort_onnx,
                                          torch.ops.sparsedet.cell_nms.default: cell_nms_onnx},
                optimize=False,  # the onnxscript optimiser dropped a node's input in our graphs
                report=False, verbose=False)
        except Exception as e:  # the exporter's errors are long; name the model and the first line
            cause = e
            while cause is not None and not isinstance(cause, SparsedetError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise cause from None
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SparsedetError(f"exporting {model.config.kind} with a {model.config.encoder.kind} encoder "
                                 f"failed: {reason}") from e
        finally:
            quiet.setLevel(level)
    proto = program.model_proto
    fixed = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[2:] if d.dim_value]
    if size is None and fixed:  # the exporter falls back to the sample's size when a dynamic one fails
        raise SparsedetError(f"exporting {model.config.kind} with a {model.config.encoder.kind} encoder for any "
                             f"input size failed (the graph fixed it at {fixed}); export with --size HxW")
    c = model.config
    meta = {"sparsedet": __version__, "config": json.dumps(run_config.to_dict()), "top_k": str(wrapper.top_k),
            "precision": precision,
            "classes": json.dumps(model.classes), "category_ids": json.dumps(model.category_ids),
            "input_size": f"{size[0]}x{size[1]}" if size else "any", "eval_size": str(c.eval_size),
            "eval_max_size": str(c.eval_max_size),
            "preprocessing": "RGB in [0, 1]; resize so the short side is eval_size and the long side at most "
                             "eval_max_size; pad right and bottom to the largest of the batch, or to input_size "
                             "when it is fixed (mask True there); normalisation is inside the graph"}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    # Inline: a model under onnx's 2 GB limit has no external-data files to clean up after a failure.
    atomic_write(path, lambda p: onnx.save(proto, p), "ONNX export", proto.ByteSize())
    report = compare(wrapper, path, sample, precision=precision)
    if not report["ok"]:
        bad = path.with_suffix(".mismatch.onnx")
        path.replace(bad)
        raise SparsedetError(f"onnxruntime disagrees with PyTorch: {describe(report)}; the file is kept as {bad}")
    return report


def sample_images(size: tuple[int, int], n: int) -> list[np.ndarray]:
    """Deterministic test pictures (smooth colour fields with rectangles, plus noise so that no two
    tokens see the same pixels: an exact tie between tokens is broken by the last bit of each
    engine's arithmetic) that fit ``size`` after resizing: one of its shape, one shorter along its
    shorter side."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        # The second is shorter along the shorter side, so it is padded and still fits after resizing.
        shorter = (size[0] * 3 // 4, size[1]) if size[0] <= size[1] else (size[0], size[1] * 3 // 4)
        h, w = size if i % 2 == 0 else shorter
        y, x = np.mgrid[0:h, 0:w]
        image = np.stack([(x / w), (y / h), 0.5 + 0.5 * np.sin((x + y) / 17.0)], -1) * 200
        for _ in range(4):
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            image[y0:y0 + rng.integers(8, h // 2), x0:x0 + rng.integers(8, w // 2)] = rng.integers(0, 255, 3)
        image = image * 0.8 + rng.uniform(0, 50, image.shape)
        images.append(image.astype(np.uint8))
    return images


def compare(wrapper: ExportedDetector, path: Path, inputs: dict[str, np.ndarray], top: int = 20,
            precision: str = "fp32") -> dict:
    """Run the file in onnxruntime and the wrapper in PyTorch on ``inputs``, and match the two
    (``match_detections``, PyTorch's detections expected)."""
    got = onnxruntime_session(path).run(OUTPUTS, inputs)
    device = wrapper.category_ids.device  # PyTorch computes where the model is
    with torch.no_grad():
        expected = [t.cpu().numpy() for t in wrapper(*(torch.from_numpy(inputs[k]).to(device) for k in INPUTS))]
    return match_detections(expected, got, top, precision)


def match_detections(expected: list[np.ndarray], got: list[np.ndarray], top: int = 20,
                     precision: str = "fp32") -> dict:
    """Two runs' (boxes, scores, labels) of one batch: each of ``expected``'s best ``top``
    detections per image must have a ``got`` detection with the same label, a score within 1e-3 and
    every box side within 0.5 px (fp16: 1e-2 and 2 px; matched, not position by position:
    detections a rounding apart in score may swap)."""
    box_tolerance, score_tolerance = TOLERANCES[precision]
    worst_box = worst_score = 0.0
    unmatched = 0
    for b in range(expected[0].shape[0]):
        for i in range(min(top, expected[1].shape[1])):
            same = got[2][b] == expected[2][b, i]
            box = np.abs(got[0][b] - expected[0][b, i]).max(-1)
            score = np.abs(got[1][b] - expected[1][b, i])
            fits = same & (box <= box_tolerance) & (score <= score_tolerance)
            if fits.any():
                j = int(np.argmin(np.where(fits, score, np.inf)))
                worst_box, worst_score = max(worst_box, float(box[j])), max(worst_score, float(score[j]))
            else:
                unmatched += 1
    return {"ok": unmatched == 0, "images": int(expected[0].shape[0]), "checked_per_image": min(top, expected[1].shape[1]),
            "unmatched": unmatched, "max_box_px": worst_box, "max_score": worst_score}


def onnxruntime_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for the file, on ``threads`` (default PyTorch's count), without
    the optimiser's notes about nodes it could not fuse."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def describe(report: dict) -> str:
    return (f"{report['images']} sample images, best {report['checked_per_image']} detections each: "
            f"{report['unmatched']} without a match, largest box difference {report['max_box_px']:.2e} px, "
            f"largest score difference {report['max_score']:.2e}")
