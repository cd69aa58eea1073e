"""ONNX export: one file per model, post-processing inside, checked in onnxruntime.

The exported graph takes ``images`` [B, 3, H, W] (RGB float in [0, 1], padded), ``mask`` [B, H, W]
(True on padding) and ``sizes`` [B, 2] (each image's original (height, width), int64), at the
fixed H x W it was exported for; normalisation happens inside. It returns ``boxes`` [B, k, 4] (xyxy
in original pixels, clipped), ``scores`` [B, k] and ``labels`` [B, k] (the run's category ids),
sorted by score: what ``predict`` returns before its threshold. ``prepare`` makes those inputs from
images. The class table, the input size and the pre-processing are in the file's metadata.

Deformable attention leaves the graph as ONNX ``GridSample`` per level (``ms_deform_attn_onnx``).
Needs ``pip install 'sparsedet[export]'`` (onnx, onnxruntime, onnxscript), imported only here.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from ..data.batch import Batch
from ..errors import SparsedetError
from ..models.heads import top_detections

INPUTS, OUTPUTS = ["images", "mask", "sizes"], ["boxes", "scores", "labels"]
# Encoders whose result on a padded batch depends on how a top-k orders tied padding tokens, or on
# the batch's keep width, which the graph fixes at the unpadded count (measured: scores off by 4e-3).
UNEXPORTABLE = {  # encoder kind: (method, why)
    "sparse": ("Sparse DETR", "its efficient query init reads the memory of whichever tied padding tokens the "
                              "top-k returns"),
    "focus": ("Focus-DETR", "its dual attention takes object tokens from the batch-wide selection, padding "
                            "entries included"),
    "salience": ("Salience DETR", "its dual attention as Focus-DETR's, and its proposal NMS keeps candidates one "
                                  "by one on the host")}
BOX_TOLERANCE_PX, SCORE_TOLERANCE = 0.5, 1e-3


class ExportedDetector(nn.Module):
    """A detector with its fixed-shape post-processing: (images, mask, sizes) -> (boxes, scores,
    labels), see the module docstring."""

    def __init__(self, model: nn.Module, top_k: int):
        super().__init__()
        self.model, self.top_k = model, top_k
        c = model.config
        self.register_buffer("category_ids", torch.tensor(c.category_ids or list(range(c.num_classes))))

    def forward(self, images: Tensor, mask: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, boxes = self.model.final_outputs(Batch(images, mask))
        xyxy, scores, labels = top_detections(logits, boxes, sizes, self.top_k)
        return xyxy, scores, self.category_ids[labels]


def default_size(model) -> tuple[int, int]:
    """A square of the longest resized side: every aspect ratio fits."""
    side = -(-model.config.eval_max_size // 32) * 32
    return side, side


def prepare(model, images: list, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Images (anything ``Detector.predict`` takes) -> the exported model's inputs: resized as
    ``predict`` resizes them (short side ``eval_size``, long side at most ``eval_max_size``), then
    padded to ``size`` (height, width)."""
    batch, sizes, _ = model.preprocess(images)
    h, w = batch.images.shape[-2:]
    if h > size[0] or w > size[1]:
        raise SparsedetError(f"a resized image is {h}x{w}, larger than the exported input {size[0]}x{size[1]}; "
                             f"export with --size {max(h, size[0])}x{max(w, size[1])}")
    pad = (0, size[1] - w, 0, size[0] - h)
    images_t = nn.functional.pad(batch.images, pad)
    mask = nn.functional.pad(batch.mask, pad, value=True)
    return {"images": images_t.numpy(), "mask": mask.numpy(), "sizes": sizes.numpy().astype(np.int64)}


def ms_deform_attn_onnx(value, shapes, locations, weights, backend):
    """``sparsedet::ms_deform_attn`` in ONNX ops (opset 16-19): one GridSample per level, as the
    ``reference`` backend computes it. ``shapes`` is the flat (H_0, W_0, H_1, ...) list of ints."""
    from onnxscript import opset18 as op

    def ints(*values):
        return op.Constant(value_ints=list(values))

    heads_dim = op.Shape(value, start=3, end=4)
    batch = op.Shape(value, start=0, end=1)
    per_head = op.Transpose(value, perm=[0, 2, 3, 1])  # [B, M, D, S]
    grids = op.Sub(op.Mul(locations, op.Constant(value_float=2.0)), op.Constant(value_float=1.0))
    grids = op.Transpose(grids, perm=[0, 2, 1, 3, 4, 5])  # [B, M, Q, L, P, 2]
    grids = op.Reshape(grids, op.Concat(ints(-1), op.Shape(grids, start=2), axis=0))  # [B*M, Q, L, P, 2]
    wts = op.Transpose(weights, perm=[0, 2, 1, 3, 4])  # [B, M, Q, L, P]
    wts = op.Reshape(wts, op.Concat(ints(-1, 1), op.Shape(wts, start=2), axis=0))  # [B*M, 1, Q, L, P]
    out, start = None, 0
    for level in range(len(shapes) // 2):
        h, w = shapes[2 * level], shapes[2 * level + 1]
        v = op.Slice(per_head, ints(start), ints(start + h * w), ints(3))
        v = op.Reshape(v, op.Concat(ints(-1), heads_dim, ints(h, w), axis=0))  # [B*M, D, h, w]
        start += h * w
        sampled = op.GridSample(v, op.Gather(grids, op.Constant(value_int=level), axis=2),
                                align_corners=0, mode="bilinear", padding_mode="zeros")  # [B*M, D, Q, P]
        part = op.ReduceSum(op.Mul(sampled, op.Gather(wts, op.Constant(value_int=level), axis=3)), ints(-1),
                            keepdims=0)  # [B*M, D, Q]
        out = part if out is None else op.Add(out, part)
    out = op.Reshape(out, op.Concat(batch, ints(-1), op.Shape(out, start=2), axis=0))  # [B, M*D, Q]
    return op.Transpose(out, perm=[0, 2, 1])


def export_onnx(model, path: str | Path, size: tuple[int, int] | None = None, opset: int = 18,
                top_k: int | None = None) -> dict:
    """Write ``model`` (a ``Detector``) to ``path`` as ONNX for inputs of ``size`` (height, width),
    then run the file in onnxruntime on sample images and compare with PyTorch. Returns the
    comparison; when it fails, the file is kept as ``*.mismatch.onnx`` and SparsedetError says by
    how much."""
    try:
        import onnx
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise SparsedetError(f"export needs onnx, onnxruntime and onnxscript: pip install 'sparsedet[export]' ({e})")
    if not 16 <= opset <= 19:
        raise SparsedetError(f"--opset must be 16 to 19 (GridSample with mode 'bilinear'), got {opset}")
    if model.config.encoder.kind in UNEXPORTABLE:
        method, why = UNEXPORTABLE[model.config.encoder.kind]
        raise SparsedetError(f"{method} cannot be exported yet: on a padded batch onnxruntime would not compute "
                             f"what PyTorch computes ({why})")
    path = Path(path)
    size = size or default_size(model)
    model = model.eval().float()
    wrapper = ExportedDetector(model, top_k or model.config.top_k).eval()
    sample = prepare(model, sample_images(size, 2), size)
    args = tuple(torch.from_numpy(sample[k]) for k in INPUTS)
    batch = torch.export.Dim("batch", min=1, max=64)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" and other chatter of the exporter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
        try:
            program = torch.onnx.export(
                wrapper, args, dynamo=True, opset_version=opset, input_names=INPUTS, output_names=OUTPUTS,
                dynamic_shapes={"images": {0: batch}, "mask": {0: batch}, "sizes": {0: batch}},
                custom_translation_table={torch.ops.sparsedet.ms_deform_attn.default: ms_deform_attn_onnx},
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
    c = model.config
    meta = {"sparsedet": __version__, "classes": json.dumps(c.classes or [str(i) for i in range(c.num_classes)]),
            "category_ids": json.dumps(c.category_ids or list(range(c.num_classes))),
            "input_size": f"{size[0]}x{size[1]}", "eval_size": str(c.eval_size), "eval_max_size": str(c.eval_max_size),
            "preprocessing": "RGB in [0, 1]; resize so the short side is eval_size and the long side at most "
                             "eval_max_size; pad right and bottom to input_size (mask True there); "
                             "normalisation is inside the graph"}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    report = compare(wrapper, path, sample)
    if not report["ok"]:
        bad = path.with_suffix(".mismatch.onnx")
        path.replace(bad)
        raise SparsedetError(f"onnxruntime disagrees with PyTorch: {describe(report)}; the file is kept as {bad}")
    return report


def sample_images(size: tuple[int, int], n: int) -> list[np.ndarray]:
    """Deterministic test pictures (smooth colour fields with rectangles) that fit ``size`` after
    resizing: one of its shape, one shorter along its shorter side."""
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
        images.append(image.astype(np.uint8))
    return images


def compare(wrapper: ExportedDetector, path: Path, inputs: dict[str, np.ndarray], top: int = 20) -> dict:
    """Run the file in onnxruntime and the wrapper in PyTorch on ``inputs``; each of PyTorch's best
    ``top`` detections per image must have an onnxruntime detection with the same label, a score
    within 1e-3 and every box side within 0.5 px (matched, not position by position: detections a
    rounding apart in score may swap)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(OUTPUTS, inputs)
    with torch.no_grad():
        expected = [t.numpy() for t in wrapper(*(torch.from_numpy(inputs[k]) for k in INPUTS))]
    worst_box = worst_score = 0.0
    unmatched = 0
    for b in range(expected[0].shape[0]):
        for i in range(min(top, expected[1].shape[1])):
            same = got[2][b] == expected[2][b, i]
            box = np.abs(got[0][b] - expected[0][b, i]).max(-1)
            score = np.abs(got[1][b] - expected[1][b, i])
            fits = same & (box <= BOX_TOLERANCE_PX) & (score <= SCORE_TOLERANCE)
            if fits.any():
                j = int(np.argmin(np.where(fits, score, np.inf)))
                worst_box, worst_score = max(worst_box, float(box[j])), max(worst_score, float(score[j]))
            else:
                unmatched += 1
    return {"ok": unmatched == 0, "images": int(expected[0].shape[0]), "checked_per_image": min(top, expected[1].shape[1]),
            "unmatched": unmatched, "max_box_px": worst_box, "max_score": worst_score}


def describe(report: dict) -> str:
    return (f"{report['images']} sample images, best {report['checked_per_image']} detections each: "
            f"{report['unmatched']} without a match, largest box difference {report['max_box_px']:.2e} px, "
            f"largest score difference {report['max_score']:.2e}")
