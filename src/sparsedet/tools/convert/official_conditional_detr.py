"""Convert an official Atten4Vis/ConditionalDETR checkpoint (``ConditionalDETR_r50_epoch50.pth`` etc.).

The file is ``{"model": state_dict, "optimizer", "lr_scheduler", "epoch", "args": Namespace}``, read
with ``weights_only=True``. One class head and one box head serve every decoder layer; the input
projection is a bare 1x1 convolution. Every decoder layer carries ``ca_qpos_proj`` but only the first
uses it (later layers take the content query alone), so the unused copies are dropped. Our decoder
layer keeps the official names, with the cross-attention half (``ca_*``, ``cross_attn``, FFN,
``norm2``/``norm3``) in a ``cross`` submodule. DC5 (dilated) files have the same keys as C5 ones;
the pickled ``args.dilation`` tells them apart (``dilation_from_args``).
"""
from __future__ import annotations

from pathlib import Path

from ...errors import SparsedetError
from .common import WB, Renamed, Rule, dilation_from_args, read_checkpoint, rename_keys, sizes_from_state

HINT = ("Expected an official Conditional DETR checkpoint (Atten4Vis/ConditionalDETR, e.g. "
        "ConditionalDETR_r50_epoch50.pth or ConditionalDETR_r50dc5_epoch50.pth).")
CROSS = r"(ca_\w+|cross_attn\.out_proj|norm2|norm3|linear1|linear2)"
RULES = [
    Rule(r"backbone\.0\.body\.(.+)", r"backbone.\1"),
    Rule(r"input_proj\." + WB, r"neck.input_proj.0.0.\1"),
    Rule(r"query_embed\.weight", "queries.query_embed.weight"),
    Rule(r"transformer\.decoder\.ref_point_head\.(.+)", r"queries.ref_point_head.\1"),
    Rule(r"transformer\.decoder\.(query_scale\..+|norm\..+)", r"decoder.\1"),
    Rule(r"transformer\.decoder\.layers\.(\d+)\." + CROSS + r"\." + WB, r"decoder.layers.\1.cross.\2.\3"),
    Rule(r"transformer\.(encoder|decoder)\.layers\.(.+)", r"\1.layers.\2"),
    Rule(r"class_embed\." + WB, r"heads.class_embed.0.\1"),
    Rule(r"bbox_embed\.(layers\.[0-2]\." + WB + ")", r"heads.box_embed.0.\1"),
]


def convert_official_conditional_detr(path: str | Path) -> tuple[Renamed, dict]:
    """Returns (state dict in our layout, config overrides for the ``conditional_detr_r50`` preset)."""
    state, args = read_checkpoint(path)
    if "transformer.decoder.layers.0.ca_qpos_sine_proj.weight" not in state or "class_embed.weight" not in state:
        raise SparsedetError(f"{path} has no conditional cross-attention (transformer.decoder.layers.0."
                             f"ca_qpos_sine_proj) or single class head (class_embed). {HINT}")
    if "transformer.decoder.layers.0.point2.6.weight" in state:
        raise SparsedetError(f"{path} holds SAM-DETR's Semantics Aligner; use official-sam-detr. {HINT}")
    out = rename_keys(state, RULES, path, hint=HINT, ignore=[
        r".*num_batches_tracked",
        r"transformer\.decoder\.layers\.([1-9]\d*)\.ca_qpos_proj\.(weight|bias)",  # built, never used
    ])
    overrides = sizes_from_state(out, int(args.get("nheads", 8))) | dilation_from_args(args)
    if "dropout" in args:
        overrides["model.dropout"] = float(args["dropout"])
    return out, overrides
