"""Post-training static int8 quantisation of an exported file, with its accuracy measured on the
way (``sparsedet export RUN --int8 --calibration DATA``).

``quantize_file`` turns a float export into an int8 one with onnxruntime's own tools:

1. its graph optimiser (``quant_pre_process``; symbolic shape inference skipped, our input sizes
   are symbolic) folds BatchNorm into Conv and constant weight transposes into initializers: the
   quantiser quantises only weights it finds as initializers;
2. ``quantize_static`` in QDQ format: per-channel int8 weights in 7 bits (``reduce_range``: on CPUs
   without VNNI the u8 x s8 multiply-add of AVX2 saturates in 16 bits, and the detections would
   depend on the CPU), uint8 activations whose ranges are the min and max seen on the calibration
   images; Conv, MatMul and Gemm only, less the layers the recipe keeps in float.

A recipe names layers by the PyTorch module that made each graph node (the exporter's name
scopes), grouped as in ``GROUPS``; ``benchmarks/int8_sensitivity.py`` measures what each group
costs in AP. ``export_int8`` runs the whole export: float file (checked against PyTorch as every
export is), quantisation, then COCO AP of both files on the val data; a drop over ``max_ap_drop``
keeps the file as ``*.rejected.onnx`` and refuses.
"""
from __future__ import annotations

import ast
import contextlib
import json
import logging
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SparsedetError
from ..filewrite import atomic_write

# Module-path patterns (paths as ``model.named_modules()`` gives them) of the layer groups a recipe
# keeps in float or quantises; a layer no pattern names belongs to "other".
GROUPS = {
    "backbone": r"backbone\.",
    "neck": r"(neck|encoder\.fusion)\.",
    "encoder-sampling": r"encoder\.layers\.\d+\.self_attn\.(sampling_offsets|attention_weights)$",
    "encoder-attention": r"encoder\.layers\.\d+\.(self_attn\.(value_proj|output_proj)|pre_attn)",
    "encoder-ffn": r"encoder\.layers\.\d+\.linear[12]$",
    "token-scoring": r"encoder\.(scorer|aux_heads)\.",
    "query-selection": r"queries\.",
    "decoder-sampling": r"decoder\.layers\.\d+\.cross_attn\.(sampling_offsets|attention_weights)$",
    "decoder-attention": r"decoder\.layers\.\d+\.(cross_attn\.(value_proj|output_proj)|self_attn)",
    "decoder-ffn": r"decoder\.(layers\.\d+\.linear[12]$|ref_point_head)",
    "heads": r"heads\.",
}
QUANTISED_OPS = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class Recipe:
    """The layer groups that stay in float; every other Conv, MatMul and Gemm is quantised."""
    keep_float: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = [g for g in self.keep_float if g not in GROUPS and g != "other"]
        if unknown:
            raise SparsedetError(f"unknown layer group {unknown[0]!r} in --keep-float; the groups are "
                                 f"{', '.join(GROUPS)} and other")

    @classmethod
    def parse(cls, text: str | None) -> Recipe:
        """--keep-float's "heads,query-selection" (None: the default recipe; "none": all int8)."""
        if text is None:
            return DEFAULT_RECIPE
        return cls(tuple(g.strip() for g in text.split(",") if g.strip() and g.strip() != "none"))

    @property
    def name(self) -> str:
        return "float: " + ", ".join(self.keep_float) if self.keep_float else "all int8"


# Chosen by benchmarks/int8_sensitivity.py (docs/export.md, "INT8").
DEFAULT_RECIPE = Recipe(("query-selection", "decoder-sampling", "heads"))
EVERYTHING = Recipe()


def group_of(module: str) -> str:
    """The group of a module path (``model.`` prefix of the exported wrapper dropped)."""
    module = module.removeprefix("model.")
    return next((name for name, pattern in GROUPS.items() if re.match(pattern, module)), "other")


def node_modules(proto) -> dict[str, str]:
    """Node name -> the PyTorch module that made it, for the float export's Conv, MatMul and Gemm
    nodes (the exporter's ``pkg.torch.onnx.name_scopes``: the innermost is the node's own)."""
    modules = {}
    for node in proto.graph.node:
        if node.op_type not in QUANTISED_OPS:
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "[]")
        scopes = ast.literal_eval(scopes)
        modules[node.name] = scopes[-2] if len(scopes) >= 2 else ""
    return modules


@contextlib.contextmanager
def _quiet_quantiser():
    """The quantiser logs a warning per bias it leaves in float, the optimiser one per node it
    cannot fold: noise to a user."""
    import onnxruntime
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.setLevel(level)
        onnxruntime.set_default_logger_severity(2)


class _Feeds:
    """onnxruntime's CalibrationDataReader over ``count`` input dicts, handed out one range at a
    time (``CalibStridedMinMax``: the calibrator reduces each range to min and max before the
    next, so memory holds one image's activations, not all of them: 2-3 GB each for an R50 at
    800x1333)."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]], count: int):
        self._feeds, self._count, self._left = iter(feeds), count, 0

    def __len__(self) -> int:
        return self._count

    def set_range(self, start_index: int, end_index: int) -> None:
        self._left = end_index - start_index

    def get_next(self):
        if self._left <= 0:
            return None
        self._left -= 1
        return next(self._feeds, None)


def quantize_file(float_path: str | Path, out_path: str | Path, feeds: Iterable[dict[str, np.ndarray]],
                  count: int, recipe: Recipe = DEFAULT_RECIPE, ranges: str | Path | None = None) -> dict:
    """Write the int8 version of the float export ``float_path`` to ``out_path``, its activation
    ranges from the ``count`` input dicts of ``feeds`` (the export's inputs, one image each); its
    metadata is the float file's, with ``precision`` "int8" and the layers kept in float. Returns what was quantised:
    ``{"quantised": n, "float": n, "float_groups": {group: n}}`` (Conv/MatMul/Gemm nodes).
    ``ranges``: a file that keeps the calibrated ranges; when it exists, ``feeds`` are not run (the
    ranges cover every layer, so recipes of one file can share them)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_proto = onnx.load(str(float_path), load_external_data=False)
    modules = node_modules(float_proto)
    groups = {name: group_of(module) for name, module in modules.items()}
    excluded = sorted(name for name, group in groups.items() if group in recipe.keep_float)
    out_path = Path(out_path)
    optimised = out_path.with_name(out_path.stem + ".optimised.onnx")
    with _quiet_quantiser():
        try:
            quant_pre_process(str(float_path), str(optimised), skip_symbolic_shape=True)
            quantize_static(str(optimised), str(out_path), _Feeds(feeds, count), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANTISED_OPS), per_channel=True, reduce_range=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"CalibStridedMinMax": 1},
                            calibration_cache_path=None if ranges is None else str(ranges))
        finally:
            optimised.unlink(missing_ok=True)
    proto = onnx.load(str(out_path))
    set_metadata(proto, {**{p.key: p.value for p in float_proto.metadata_props},
                         "precision": "int8", "int8_keep_float": json.dumps(list(recipe.keep_float))})
    onnx.save(proto, str(out_path))
    kept: dict[str, int] = {}
    for name in excluded:
        kept[groups[name]] = kept.get(groups[name], 0) + 1
    return {"quantised": len(groups) - len(excluded), "float": len(excluded), "float_groups": kept}


def set_metadata(proto, entries: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)


def check_classes(model_config, dataset, what: str) -> None:
    """Refuse data whose categories are not the model's: the same category ids (less the model's
    unused columns), with the same names where the model names them (evaluation scores every
    column the model predicts)."""
    from ..data.categories import column_categories
    ids = list(model_config.category_ids or range(model_config.num_classes))
    used = [cid for cid in column_categories(model_config.classes, ids) if cid is not None] if model_config.classes \
        else ids
    names = dict(zip(ids, model_config.classes)) if model_config.classes else {}
    theirs = dict(zip(dataset.category_ids, dataset.classes))
    if set(used) != set(theirs) or any(theirs[cid] != names[cid] for cid in used if cid in theirs and cid in names):
        def table(pairs):
            shown = [f"{cid} ({name})" if name is not None else str(cid) for cid, name in pairs[:6]]
            return ", ".join(shown) + (f" ... ({len(pairs)} in all)" if len(pairs) > 6 else "")
        mine = table([(i, names.get(i)) for i in used])
        raise SparsedetError(f"{what} {dataset.source} does not fit the model's classes: its categories are "
                             f"{table(list(theirs.items()))}; the model's are {mine}. Use data with the model's "
                             "class table (its training data's)")


def calibration_feeds(dataset, count: int, input_size: tuple[int, int] | None) -> Iterator[dict]:
    """The exported model's inputs for the first ``count`` readable images of ``dataset`` (a
    CocoDetection with evaluation transforms), one image each, padded to ``input_size`` where the
    export fixed it; prints progress every 8 images."""
    import torch

    from ..data.batch import collate
    from .export import inputs
    given = 0
    for i in range(len(dataset)):
        sample = dataset[i]
        if sample is None:
            continue  # an unreadable image (the dataset warned): the next one takes its place
        given += 1
        if given % 8 == 0 or given == count:
            print(f"calibration: {given}/{count} images", flush=True)
        batch, targets, _ = collate([sample])
        yield inputs(batch, torch.stack([t["orig_size"] for t in targets]), input_size)
        if given == count:
            return


def open_split(data: str | Path, split: str, images_root, model):
    """``data`` (COCO json, or YOLO yaml and ``split``) with the model's evaluation resizing."""
    from ..data.coco import open_detection_dataset
    from ..data.transforms import build_transforms
    c = model.config
    return open_detection_dataset(data, split, images_root, build_transforms(False, [c.eval_size], c.eval_max_size))


def file_ap(path: Path, dataset, batch_size: int = 4) -> float:
    """COCO AP of an exported file on ``dataset`` in onnxruntime, as ``sparsedet eval`` computes it."""
    from ..engine.evaluator import evaluate
    from .onnx_model import OnnxDetector
    metrics, _ = evaluate(OnnxDetector(path), dataset, batch_size, progress=True)
    return float(metrics["AP"])


@dataclass
class Int8Data:
    """The calibration and val datasets of an int8 export, opened with the model's resizing and
    checked against its classes."""
    calibration: object
    val: object
    calibration_images: int
    max_ap_drop: float

    @classmethod
    def open(cls, model, calibration: str | Path, val: str | Path | None = None,
             images_root: str | Path | None = None, calibration_images: int = 64,
             max_ap_drop: float = 0.01) -> Int8Data:
        """``calibration``: COCO json, or YOLO yaml (its train split); ``val``: default the
        calibration json, or the YOLO yaml's val split. ``model``: a Detector or OnnxDetector."""
        if calibration_images < 1:
            raise SparsedetError(f"--calibration-images must be at least 1, got {calibration_images}")
        if not 0 <= max_ap_drop <= 1:
            raise SparsedetError(f"--max-ap-drop must be within [0, 1], got {max_ap_drop}")
        calibration_set = open_split(calibration, "train", images_root, model)
        check_classes(model.config, calibration_set, "the calibration data")
        val_set = open_split(val if val is not None else calibration, "val", images_root, model)
        check_classes(model.config, val_set, "the val data")
        return cls(calibration_set, val_set, min(calibration_images, len(calibration_set)), max_ap_drop)


def export_int8(model, path: str | Path, data: Int8Data, size: tuple[int, int] | None = None, opset: int = 18,
                top_k: int | None = None, recipe: Recipe = DEFAULT_RECIPE) -> dict:
    """Export ``model`` (a ``Detector``) to ``path`` as an int8 file: the float export, checked
    against PyTorch as every export is, then ``quantize_checked``. Returns the float export's
    parity report with ``"int8"`` (``quantize_checked``'s result) added."""
    from .export import export_onnx
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}-float-") as tmp:
        float_path = Path(tmp) / "float.onnx"
        report = export_onnx(model, float_path, size=size, opset=opset, top_k=top_k)
        return {**report, "int8": quantize_checked(float_path, path, data, recipe)}


def quantize_checked(float_path: str | Path, path: str | Path, data: Int8Data,
                     recipe: Recipe = DEFAULT_RECIPE) -> dict:
    """Quantise the float export ``float_path`` into ``path`` with ranges from ``data``'s
    calibration images, then score both files (COCO AP, onnxruntime) on its val data. Both APs,
    the recipe and the calibration go into the file's metadata. When int8 loses more than
    ``data.max_ap_drop`` AP, the file is kept as ``*.rejected.onnx``, nothing is written at
    ``path`` and SparsedetError says by how much. Returns what was quantised, both APs and the drop."""
    import onnx
    float_path, path = Path(float_path), Path(path)
    float_metadata = onnx.load(str(float_path), load_external_data=False).metadata_props
    precision = next((p.value for p in float_metadata if p.key == "precision"), "fp32")
    if precision != "fp32":
        raise SparsedetError(f"{float_path} is already {precision}; int8 quantises an fp32 export")
    fixed = next((p.value for p in float_metadata if p.key == "input_size"), "any")
    size = None if fixed == "any" else tuple(int(v) for v in fixed.split("x"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}-int8-") as tmp:
        int8_path = Path(tmp) / "int8.onnx"
        print(f"quantising with {data.calibration_images} images of {data.calibration.source} "
              f"({recipe.name})", flush=True)
        quantised = quantize_file(float_path, int8_path,
                                  calibration_feeds(data.calibration, data.calibration_images, size),
                                  data.calibration_images, recipe)
        print(f"COCO AP on {data.val.source} ({len(data.val)} images): float file, then int8 file", flush=True)
        ap_float, ap_int8 = file_ap(float_path, data.val), file_ap(int8_path, data.val)
        int8 = {**quantised, "recipe": recipe.name, "ap_float": ap_float, "ap_int8": ap_int8,
                "ap_drop": ap_float - ap_int8, "val": data.val.source, "calibration": data.calibration.source,
                "calibration_images": data.calibration_images}
        proto = onnx.load(str(int8_path))
        stamp(proto, int8)
        accepted = int8["ap_drop"] <= data.max_ap_drop
        target = path if accepted else path.with_suffix(".rejected.onnx")
        atomic_write(target, lambda p: onnx.save(proto, p), "int8 ONNX export", proto.ByteSize())
    if not accepted:
        raise SparsedetError(f"int8 loses {int8['ap_drop']:.3f} AP on {data.val.source} (float {ap_float:.3f}, int8 "
                             f"{ap_int8:.3f}), more than --max-ap-drop {data.max_ap_drop:g}; the file is kept as "
                             f"{target} for inspection and nothing was written at {path}. Calibrate on more images "
                             "(--calibration-images) or on images like those the model will see, or keep more "
                             "layers in float (--keep-float; benchmarks/int8_sensitivity.py measures which)")
    return int8


def stamp(proto, int8: dict) -> None:
    """The accuracy facts into the int8 file's metadata, beside what ``quantize_file`` wrote."""
    set_metadata(proto, {**{p.key: p.value for p in proto.metadata_props},
                         "int8_ap_float": f"{int8['ap_float']:.4f}", "int8_ap_int8": f"{int8['ap_int8']:.4f}",
                         "int8_val": int8["val"],
                         "int8_calibration": f"{int8['calibration_images']} images of {int8['calibration']}"})


def describe_int8(int8: dict) -> str:
    kept = ", ".join(f"{g} ({n})" for g, n in int8["float_groups"].items()) or "none"
    return (f"int8: {int8['quantised']} layers quantised, {int8['float']} kept in float ({kept}); COCO AP on "
            f"{int8['val']}: float {int8['ap_float']:.3f}, int8 {int8['ap_int8']:.3f} (drop {int8['ap_drop']:.3f})")
