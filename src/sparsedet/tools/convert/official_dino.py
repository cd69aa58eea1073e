"""Convert an official IDEA-Research/DINO checkpoint (``checkpoint0011_4scale.pth``) to our layout.

The file is a training checkpoint ``{"model": state_dict, "args": Namespace, ...}`` read with
``weights_only=True``. Shared heads are stored once per decoder layer and again under
``transformer.decoder.*``; the copies are checked equal and folded. The architecture (widths,
layers, queries, classes, levels, points) is read from tensor shapes; DINO's fixed conventions
(temperature 20, no position offset, eps 1e-3, final decoder norm) come from the ``dino_r50`` preset.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ...errors import SparsedetError
from ...nn.backbone import BLOCKS
from .common import Rule, fold_aliases, read_state_dict, rename_keys

WB = r"(weight|bias)"
HINT = "Expected an official DINO checkpoint (IDEA-Research/DINO, e.g. checkpoint0011_4scale.pth)."
RULES = [
    Rule(r"backbone\.0\.body\.(.+)", r"backbone.\1"),
    Rule(r"input_proj\.(\d+)\.([01])\." + WB, r"neck.input_proj.\1.\2.\3"),
    Rule(r"transformer\.level_embed", "neck.level_embed"),
    Rule(r"transformer\.(encoder|decoder)\.layers\.(.+)", r"\1.layers.\2"),
    Rule(r"transformer\.decoder\.(ref_point_head\.layers\.[01]|norm)\." + WB, r"decoder.\1.\2"),
    Rule(r"transformer\.tgt_embed\.weight", "queries.tgt_embed.weight"),
    Rule(r"transformer\.(enc_output|enc_output_norm)\." + WB, r"queries.\1.\2"),
    Rule(r"transformer\.enc_out_class_embed\." + WB, r"queries.class_head.\1"),
    Rule(r"transformer\.enc_out_bbox_embed\.(layers\.[0-2]\." + WB + ")", r"queries.box_head.\1"),
    Rule(r"class_embed\.0\." + WB, r"heads.class_embed.0.\1"),
    Rule(r"bbox_embed\.0\.(layers\.[0-2]\." + WB + ")", r"heads.box_embed.0.\1"),
    Rule(r"label_enc\.weight", "denoising.label_enc.weight"),
]


def convert_official_dino(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Returns (state dict in our layout, config overrides for the ``dino_r50`` preset)."""
    state = read_state_dict(path)
    if "transformer.tgt_embed.weight" not in state or "label_enc.weight" not in state:
        raise SparsedetError(f"{path} has no transformer.tgt_embed / label_enc weights. {HINT}")
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("transformer.decoder.layers."))
    enc_layers = 1 + max((int(k.split(".")[3]) for k in state if k.startswith("transformer.encoder.layers.")), default=-1)
    # The heads are shared: one module saved once per layer and again inside the decoder.
    aliases = {"transformer.decoder.class_embed.": "class_embed.", "transformer.decoder.bbox_embed.": "bbox_embed."}
    aliases.update({f"{kind}.{k}.": f"{kind}.0." for kind in ("class_embed", "bbox_embed") for k in range(1, layers)})
    state = fold_aliases(state, aliases, path)
    out, unknown = rename_keys(state, RULES, path, ignore=[r".*num_batches_tracked"])
    if unknown:
        raise SparsedetError(f"{path}: unknown keys ({len(unknown)}): {', '.join(sorted(unknown)[:10])}. {HINT}")
    num_classes, hidden = out["heads.class_embed.0.weight"].shape
    attn = out["decoder.layers.0.cross_attn.attention_weights.weight"].shape[0]
    num_levels = out["neck.level_embed"].shape[0]
    heads = 8  # not recoverable from shapes (heads x points); every released DINO uses 8
    overrides = {
        "model.num_classes": num_classes, "model.hidden_dim": hidden,
        "model.ffn_dim": out["decoder.layers.0.linear1.weight"].shape[0],
        "model.num_heads": heads, "model.num_encoder_layers": enc_layers, "model.num_decoder_layers": layers,
        "model.num_queries": out["queries.tgt_embed.weight"].shape[0], "model.num_levels": num_levels,
        "model.enc_points": out["encoder.layers.0.self_attn.attention_weights.weight"].shape[0] // (heads * num_levels)
        if enc_layers else 4,
        "model.dec_points": attn // (heads * num_levels),
        "model.backbone.depth": resnet_depth(out),
    }
    return out, overrides


def resnet_depth(state: dict[str, Tensor]) -> int:
    """The ResNet depth whose block kind and stage-3 block count fit the converted backbone keys."""
    kind = "bottleneck" if any(k.startswith("backbone.") and ".conv3." in k for k in state) else "basic"
    stage3 = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("backbone.layer3.")), default=-1)
    for depth, (block, counts) in BLOCKS.items():
        if (block, counts[2]) == (kind, stage3):
            return depth
    raise SparsedetError(f"backbone with {stage3} {kind} blocks in layer3 is not a ResNet-18/34/50/101")
