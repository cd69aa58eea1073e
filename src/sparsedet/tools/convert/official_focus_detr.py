"""Convert an official Focus-DETR checkpoint (huawei-noah Focus-DETR / detrex ``projects/focus_detr``).

Released files are detectron2 checkpoints ``{"model": state_dict, ...}`` (most inside a .zip,
read as is). The backbone uses detectron2 ResNet names, mapped to torchvision's here, or
detectron2's Swin, which has the official names. The
two-stage class head is also saved as ``enhance_MCSP`` (once per encoder layer) and the decoder
heads again under ``transformer.decoder.*``: those copies are checked equal and dropped. Heads
are 80-way in detectron2's contiguous COCO order.
"""
from __future__ import annotations

from pathlib import Path

from ...errors import SparsedetError
from ...nn.resnet_weights import detectron2_name
from .common import WB, Renamed, Rule, fold_aliases, layer_count, read_checkpoint, rename_keys, sizes_from_state
from .swin import SWIN_BUFFERS, SWIN_KEYS

HINT = "Expected an official Focus-DETR checkpoint (e.g. focus_detr_r50_4scale_12ep.zip as released, or the .pth inside)."


def _encoder_part(m) -> str | None:
    names = {"attentions.0.attn": "pre_attn", "attentions.1": "self_attn", "ffns.0.layers.0.0": "linear1",
             "ffns.0.layers.1": "linear2", "norms.0": "norm1", "norms.1": "norm2", "norm2": "pre_norm"}
    return f"encoder.layers.{m.group(1)}.{names[m.group(2)]}{m.group(3)}" if m.group(2) in names else None


def _decoder_part(m) -> str | None:
    names = {"attentions.0.attn": "self_attn", "attentions.1": "cross_attn", "ffns.0.layers.0.0": "linear1",
             "ffns.0.layers.1": "linear2", "norms.0": "norm2", "norms.1": "norm1", "norms.2": "norm3"}
    return f"decoder.layers.{m.group(1)}.{names[m.group(2)]}{m.group(3)}" if m.group(2) in names else None


def _head(kind: str, num_decoder_layers: int):
    ours = "class_embed" if kind == "class" else "box_embed"

    def target(m) -> str:
        i, rest = int(m.group(1)), m.group(2)
        if i < num_decoder_layers:
            return f"heads.{ours}.{i}.{rest}"
        return f"queries.{'class_head' if kind == 'class' else 'box_head'}.{rest}"
    return target


LAYER = r"\.(\d+)\.(attentions\.0\.attn|attentions\.1|ffns\.0\.layers\.0\.0|ffns\.0\.layers\.1|norms\.\d|norm2)(\..+)"
RULES = [
    Rule(r"backbone\.((stem|res\d)\..+)", lambda m: (name := detectron2_name(m.group(1))) and f"backbone.{name}"),
    Rule(r"backbone\." + SWIN_KEYS, r"backbone.\1"),  # detectron2's Swin has the official names
    Rule(r"neck\.convs\.(\d)\.conv\." + WB, r"neck.input_proj.\1.0.\2"),
    Rule(r"neck\.convs\.(\d)\.norm\." + WB, r"neck.input_proj.\1.1.\2"),
    Rule(r"neck\.extra_convs\.0\.conv\." + WB, r"neck.input_proj.3.0.\1"),
    Rule(r"neck\.extra_convs\.0\.norm\." + WB, r"neck.input_proj.3.1.\1"),
    Rule(r"transformer\.level_embeds", "neck.level_embed"),
    Rule(r"transformer\.alpha", "encoder.alpha"),
    Rule(r"transformer\.tgt_embed\.weight", "queries.tgt_embed.weight"),
    Rule(r"transformer\.(enc_output|enc_output_norm)\." + WB, r"queries.\1.\2"),
    Rule(r"transformer\.enc_mask_predictor\.(layer[12]\.\d\." + WB + ")", r"encoder.scorer.\1"),
    Rule(r"transformer\.encoder\.layers" + LAYER, _encoder_part),
    Rule(r"transformer\.decoder\.layers" + LAYER, _decoder_part),
    Rule(r"transformer\.decoder\.(ref_point_head\.layers\.[01]|norm)\." + WB, r"decoder.\1.\2"),
    Rule(r"label_enc\.weight", "denoising.label_enc.weight"),
]


def convert_official_focus_detr(path: str | Path) -> tuple[Renamed, dict]:
    """Returns (state dict in our layout, config overrides for the ``focus_detr_r50`` preset)."""
    state, _ = read_checkpoint(path)
    if "transformer.alpha" not in state or "transformer.enc_mask_predictor.layer2.4.weight" not in state:
        raise SparsedetError(f"{path} has no foreground selector (transformer.alpha / enc_mask_predictor). {HINT}")
    layers = layer_count(state, "transformer.decoder.layers.")
    enc_layers = layer_count(state, "transformer.encoder.layers.")
    aliases = {"transformer.decoder.class_embed.": "class_embed.", "transformer.decoder.bbox_embed.": "bbox_embed."}
    aliases.update({f"{prefix}.{i}.": f"class_embed.{layers}." for prefix in
                    ("enhance_MCSP_layerlist", "transformer.encoder.enhance_MCSP") for i in range(enc_layers)})
    state = fold_aliases(state, aliases, path)
    rules = RULES + [Rule(r"class_embed\.(\d+)\.(" + WB + ")", _head("class", layers)),
                     Rule(r"bbox_embed\.(\d+)\.(layers\.[0-2]\." + WB + ")", _head("box", layers))]
    out = rename_keys(state, rules, path, ignore=[r".*num_batches_tracked", r".*total_(ops|params)", *SWIN_BUFFERS],
                      hint=HINT)
    return out, sizes_from_state(out)
