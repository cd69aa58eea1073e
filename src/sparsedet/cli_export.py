"""``sparsedet export``: a run, preset or zoo name to an ONNX file (fp32 or fp16), or to an int8 file
with its AP measured on the way (from those, or from an fp32 .onnx file); its grammar is in
``cli_parser.py``, what it takes in ``resolve.VERBS``."""
from __future__ import annotations

import warnings

from .errors import SparsedetError


def cmd_export(args) -> int:
    from .api import load_ref
    from .resolve import resolve_model
    from .tools import bench
    from .tools.export import describe
    _check_int8_options(args)
    ref = resolve_model(args.target, "export --int8" if args.int8 else "export")
    if ref.kind == "exported":
        return _quantize_onnx_file(args)
    model = load_ref(ref, device=args.device or "cpu")
    if ref.kind == "preset":
        warnings.warn(f"{args.target} is a preset with random weights: the file computes an untrained model")
    size = bench.parse_size(args.size) if args.size else None
    if args.int8:
        from .tools.quantize import Int8Data, Recipe, describe_int8, export_int8
        recipe = Recipe.parse(args.keep_float)
        data = Int8Data.open(model, args.calibration, args.val, args.images, args.calibration_images,
                             args.max_ap_drop)
        report = export_int8(model, args.out, data, size=size, opset=args.opset, top_k=args.top_k, recipe=recipe)
        print(f"wrote {args.out}; the float file in onnxruntime against PyTorch: {describe(report)}\n"
              f"{describe_int8(report['int8'])}")
    else:
        report = model.export_onnx(args.out, size=size, opset=args.opset, top_k=args.top_k, precision=args.precision)
        print(f"wrote {args.out}; onnxruntime against PyTorch: {describe(report)}")
    return 0


def _quantize_onnx_file(args) -> int:
    """``export FILE.onnx --int8``: quantise an existing fp32 export (no PyTorch, no new trace)."""
    from .tools.onnx_model import OnnxDetector
    from .tools.quantize import Int8Data, Recipe, describe_int8, quantize_checked
    recipe = Recipe.parse(args.keep_float)
    fixed = [flag for flag, used in (("--size", args.size), ("--opset", args.opset != 18), ("--top-k", args.top_k))
             if used]
    if fixed:
        raise SparsedetError(f"{fixed[0]} was fixed when {args.target} was exported; leave it out")
    if args.device not in (None, "cpu"):
        raise SparsedetError(f"an .onnx file is quantised on the CPU (onnxruntime); leave out --device {args.device}")
    source = OnnxDetector(args.target)
    data = Int8Data.open(source, args.calibration, args.val, args.images, args.calibration_images, args.max_ap_drop)
    print(f"wrote {args.out}\n{describe_int8(quantize_checked(args.target, args.out, data, recipe))}")
    return 0


def _check_int8_options(args) -> None:
    """The int8 options make sense together only; say which is missing before any work."""
    given = [flag for flag, used in (("--calibration", args.calibration), ("--val", args.val),
                                     ("--images", args.images), ("--calibration-images", args.calibration_images != 64),
                                     ("--keep-float", args.keep_float),
                                     ("--max-ap-drop", args.max_ap_drop != 0.01)) if used]
    if not args.int8:
        if given:
            raise SparsedetError(f"{given[0]} belongs to an int8 export; add --int8 or leave it out")
        return
    if not args.calibration:
        raise SparsedetError("--int8 needs --calibration DATA (COCO json or YOLO data.yaml): the images whose "
                             "activations set the int8 ranges, ideally the model's own training or val images")
    if args.precision != "fp32":
        raise SparsedetError(f"--int8 quantises the fp32 export; leave out --precision {args.precision}")
