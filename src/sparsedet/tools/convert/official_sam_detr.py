"""Convert an official SAM-DETR checkpoint (ZhangGongjie/SAM-DETR, e.g. ``checkpoint.pth`` of the
R50 or R50 + SMCA runs, C5 or DC5) to our layout.

The file is a training checkpoint ``{"model": state_dict, "args": Namespace, ...}`` read with
``weights_only=True``. The box heads are saved twice (``bbox_embed.*`` and
``transformer.decoder.bbox_embed.*``); the copies are checked equal and folded. Our decoder layer
keeps the official parameter names, so layers convert by prefix. SMCA is recognised from the
point predictor's width (4 numbers per head instead of 2), the 12-epoch runs' GroupNorm from
``input_proj.0.1.weight``, DC5 from the pickled ``args.dilation`` (the keys are a C5 file's).
"""
from __future__ import annotations

from pathlib import Path

from ...errors import SparsedetError
from .common import (WB, Renamed, Rule, dilation_from_args, fold_aliases, layer_count, read_checkpoint, rename_keys,
                     sizes_from_state)

HINT = ("Expected an official SAM-DETR checkpoint (ZhangGongjie/SAM-DETR, single-scale R50 or R50-DC5, with or "
        "without SMCA).")
RULES = [
    Rule(r"backbone\.0\.body\.(.+)", r"backbone.\1"),
    Rule(r"input_proj\.0\.([01])\." + WB, r"neck.input_proj.0.\1.\2"),
    Rule(r"query_embed\.weight", "queries.query_embed.weight"),
    Rule(r"transformer\.(encoder|decoder)\.layers\.(.+)", r"\1.layers.\2"),
    Rule(r"class_embed\.(\d+)\." + WB, r"heads.class_embed.\1.\2"),
    Rule(r"bbox_embed\.(\d+)\.(layers\.[0-2]\." + WB + ")", r"heads.box_embed.\1.\2"),
]


def convert_official_sam_detr(path: str | Path) -> tuple[Renamed, dict]:
    """Returns (state dict in our layout, config overrides for the ``sam_detr_r50`` preset)."""
    state, args = read_checkpoint(path)
    if "transformer.decoder.layers.0.point2.6.weight" not in state or "query_embed.weight" not in state:
        raise SparsedetError(f"{path} has no Semantics Aligner (transformer.decoder.layers.0.point2) "
                             f"or reference boxes (query_embed). {HINT}")
    if "transformer.level_embed" in state or args.get("multiscale"):
        raise SparsedetError(f"{path} is a multi-scale SAM-DETR; only the single-scale models convert. {HINT}")
    layers = layer_count(state, "transformer.decoder.layers.")
    state = fold_aliases(state, {"transformer.decoder.bbox_embed.": "bbox_embed."}, path)
    out = rename_keys(state, RULES, path, ignore=[r".*num_batches_tracked"], hint=HINT)
    heads = int(args.get("nheads", 8))
    overrides = sizes_from_state(out, heads) | dilation_from_args(args)
    overrides["model.decoder.smca"] = out["decoder.layers.0.point2.6.weight"].shape[0] == 4 * heads
    overrides["model.input_norm"] = "neck.input_proj.0.1.weight" in out
    if out["queries.query_embed.weight"].shape[1] != 4 or len([k for k in out if k.startswith("heads.class_embed.")
                                                               and k.endswith(".weight")]) != layers:
        raise SparsedetError(f"{path}: expected 4-D reference boxes and one class head per decoder layer. {HINT}")
    if "dropout" in args:
        overrides["model.dropout"] = float(args["dropout"])
    return out, overrides
