"""Convert an official xiuqhou/Salience-DETR checkpoint (``salience_detr_resnet50_800_1333_coco_1x.pth``).

Released files are flat state dicts (saved through accelerate). The filter ratios are buffers and
become config (``encoder.level_ratios``, ``encoder.layer_ratios``); ``enhance_mcsp`` is a second
name of the two-stage class head and is checked equal and dropped, as are the sine-embedding
buffers; ``_classes_`` (the training set's names per category id) becomes the class table. The
neck's convolutions have no bias: ours get zeros. The Swin-L file holds torchvision's Swin
(``features.{k}``, no output norms), renamed by ``swin.torchvision_swin_name``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ...data.categories import raw_id_table
from ...errors import SparsedetError
from .common import WB, Renamed, Rule, fold_aliases, read_checkpoint, rename_keys, sizes_from_state
from .swin import SWIN_BUFFERS, torchvision_swin_name

HINT = "Expected an official Salience DETR checkpoint (xiuqhou/Salience-DETR, e.g. salience_detr_resnet50_800_1333_coco_1x.pth)."
ENCODER_PARTS = {"pre_attention": "pre_attn", "pre_norm": "pre_norm", "self_attn": "self_attn", "norm1": "norm1",
                 "linear1": "linear1", "linear2": "linear2", "norm2": "norm2"}
RULES = [
    Rule(r"backbone\.((conv1|bn1|layer\d)\..+)", r"backbone.\1"),
    # Swin: torchvision's, as a feature extractor in nn.Sequential(extractor, PostProcess()).
    Rule(r"backbone\.(?:0\.)?features\.(.+)", lambda m: torchvision_swin_name(m.group(1))),
    Rule(r"neck\.convs\.(\d)\.([01])\." + WB, r"neck.input_proj.\1.\2.\3"),
    Rule(r"transformer\.level_embeds", "neck.level_embed"),
    Rule(r"transformer\.alpha", "encoder.alpha"),
    Rule(r"transformer\.tgt_embed\.weight", "queries.tgt_embed.weight"),
    Rule(r"transformer\.(enc_output|enc_output_norm)\." + WB, r"queries.\1.\2"),
    Rule(r"transformer\.encoder_class_head\." + WB, r"queries.class_head.\1"),
    Rule(r"transformer\.encoder_bbox_head\.(layers\.[0-2]\." + WB + ")", r"queries.box_head.\1"),
    Rule(r"transformer\.enc_mask_predictor\.(layer[12]\.\d\." + WB + ")", r"encoder.scorer.\1"),
    Rule(r"transformer\.encoder\.layers\.(\d+)\.(\w+)(\..+)",
         lambda m: f"encoder.layers.{m.group(1)}.{ENCODER_PARTS[m.group(2)]}{m.group(3)}"
         if m.group(2) in ENCODER_PARTS else None),
    Rule(r"transformer\.encoder\.background_embedding\.(row|col)_embed\.weight",
         lambda m: f"encoder.background_{m.group(1)}s.weight"),
    Rule(r"transformer\.neck\.(.+)", r"encoder.fusion.\1"),
    Rule(r"transformer\.decoder\.layers\.(.+)", r"decoder.layers.\1"),
    Rule(r"transformer\.decoder\.(ref_point_head\.layers\.[01]|norm)\." + WB, r"decoder.\1.\2"),
    Rule(r"transformer\.decoder\.class_head\.(\d+)\." + WB, r"heads.class_embed.\1.\2"),
    Rule(r"transformer\.decoder\.bbox_head\.(\d+)\.(layers\.[0-2]\." + WB + ")", r"heads.box_embed.\1.\2"),
    Rule(r"denoising_generator\.label_encoder\.weight", "denoising.label_enc.weight"),
]
DROPPED = [r"position_embedding\.dim_t[xy]", r"_classes_", r".*total_(ops|params)", r".*num_batches_tracked",
           r"transformer\.(level|layer)_filter_ratio", *SWIN_BUFFERS]


def convert_official_salience_detr(path: str | Path) -> tuple[Renamed, dict]:
    """Returns (state dict in our layout, config overrides for the ``salience_detr_r50`` preset)."""
    state, _ = read_checkpoint(path)
    if "transformer.level_filter_ratio" not in state or "transformer.enc_mask_predictor.layer2.4.weight" not in state:
        raise SparsedetError(f"{path} has no salience filter (transformer.level_filter_ratio / enc_mask_predictor). {HINT}")
    state = fold_aliases(state, {"transformer.encoder.enhance_mcsp.": "transformer.encoder_class_head."}, path)
    out = rename_keys(state, RULES, path, ignore=DROPPED, hint=HINT)
    for key in [k for k in out if k.startswith("neck.input_proj.") and k.endswith(".0.weight")]:
        out.setdefault(key[:-len("weight")] + "bias", torch.zeros(out[key].shape[0]))
    overrides = sizes_from_state(out)
    overrides.update({
        "model.encoder.level_ratios": [round(float(r), 6) for r in state["transformer.level_filter_ratio"]],
        "model.encoder.layer_ratios": [round(float(r), 6) for r in state["transformer.layer_filter_ratio"]],
        "model.encoder.background_size": out["encoder.background_rows.weight"].shape[0],
        "model.encoder.fusion": any(k.startswith("encoder.fusion.") for k in out),
    })
    names = _decode_names(state["_classes_"]) if "_classes_" in state else []
    if len(names) == overrides["model.num_classes"]:
        overrides["classes"], overrides["category_ids"] = raw_id_table(names, "none")
    return out, overrides


def _decode_names(codes: Tensor) -> list[str]:
    """The training set's class names, which the official trainer stores as character codes with
    -1 after each name; "none" names an id without a category."""
    names, chars = [], []
    for code in codes.flatten().tolist():
        if code == -1:
            names.append("".join(chars))
            chars = []
        else:
            chars.append(chr(code))
    return names
