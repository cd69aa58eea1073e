"""Convert an official fundamentalvision/Deformable-DETR checkpoint (``r50_deformable_detr*.pth``).

The file is ``{"model": state_dict, "optimizer", "lr_scheduler", "epoch", "args": Namespace}``, read
with ``weights_only=True``. Without box refinement the one class/box head pair is saved once per
decoder layer (the same module repeated); with refinement each layer has its own and the decoder saves
them again under ``transformer.decoder.bbox_embed`` (and, two-stage, ``transformer.decoder.class_embed``).
Copies are checked equal and dropped. Head L (the last) of a two-stage model is its proposal head.
Multi-scale and single-scale (C5) models convert; DC5 (dilated C5) does not.
"""
from __future__ import annotations

from pathlib import Path

from ...errors import SparsedetError
from .common import (WB, Renamed, Rule, deformable_head_rules, fold_aliases, layer_count, read_checkpoint,
                     rename_keys, sizes_from_state)

HINT = ("Expected an official Deformable DETR checkpoint (fundamentalvision/Deformable-DETR, e.g. "
        "r50_deformable_detr-checkpoint.pth).")


def _rules(num_decoder_layers: int, two_stage: bool) -> list[Rule]:
    return [
        Rule(r"backbone\.0\.body\.(.+)", r"backbone.\1"),
        Rule(r"input_proj\.(\d+)\.([01])\." + WB, r"neck.input_proj.\1.\2.\3"),
        Rule(r"transformer\.level_embed", "neck.level_embed"),
        Rule(r"transformer\.(encoder|decoder)\.layers\.(.+)", r"\1.layers.\2"),
        Rule(r"transformer\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm)\." + WB, r"queries.\1.\2"),
        Rule(r"transformer\.reference_points\." + WB, r"queries.reference_points.\1"),
        Rule(r"query_embed\.weight", "queries.query_embed.weight"),
        *deformable_head_rules(num_decoder_layers, two_stage),
    ]


def convert_official_deformable_detr(path: str | Path) -> tuple[Renamed, dict]:
    """Returns (state dict in our layout, config overrides for the ``deformable_detr_r50`` preset)."""
    state, args = read_checkpoint(path)
    if "transformer.encoder.layers.0.self_attn.sampling_offsets.weight" not in state or "class_embed.0.weight" not in state:
        raise SparsedetError(f"{path} has no deformable encoder (transformer.encoder.layers.0.self_attn."
                             f"sampling_offsets) or class head (class_embed.0). {HINT}")
    foreign = [k for k in ("transformer.enc_mask_predictor.layer1.0.weight", "transformer.tgt_embed.weight",
                           "label_enc.weight") if k in state]
    if foreign:
        raise SparsedetError(f"{path} holds {foreign[0]}, which Deformable DETR does not have (a Sparse DETR or "
                             f"DINO checkpoint? use official-sparse-detr or official-dino). {HINT}")
    if args.get("dilation"):
        raise SparsedetError(f"{path} is a DC5 (dilated) model; our ResNet has no dilated stage yet. {HINT}")
    layers = layer_count(state, "transformer.decoder.layers.")
    two_stage = "transformer.enc_output.weight" in state
    box_refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in state)
    if two_stage and not box_refine:
        raise SparsedetError(f"{path} is two-stage without box refinement, which no release uses and we "
                             f"do not build. {HINT}")
    state = fold_aliases(state, {"transformer.decoder.class_embed.": "class_embed.",
                                 "transformer.decoder.bbox_embed.": "bbox_embed."}, path)
    if not box_refine:  # one head pair, saved once per layer
        state = fold_aliases(state, {f"{kind}.{k}.": f"{kind}.0." for kind in ("class_embed", "bbox_embed")
                                     for k in range(1, layers)}, path)
    out = rename_keys(state, _rules(layers, two_stage), path, ignore=[r".*num_batches_tracked"], hint=HINT)
    overrides = sizes_from_state(out, int(args.get("nheads", 8)))
    overrides.update({"model.two_stage": two_stage, "model.box_refine": box_refine})
    if overrides["model.num_levels"] == 1:
        overrides["model.backbone.return_layers"] = [4]
    if two_stage:  # proposals, not learned queries
        overrides["model.num_queries"] = int(args.get("num_queries", 300))
    if "dropout" in args:
        overrides["model.dropout"] = float(args["dropout"])
    return out, overrides
