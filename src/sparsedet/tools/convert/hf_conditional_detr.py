"""Convert a Hugging Face ``ConditionalDetrForObjectDetection`` directory to our layout.

Read from transformers 5.23 (``models/conditional_detr``). What matters numerically:
* The model reads the backbone's last map, C5 (stride 32), or DC5 (stride 16) when transformers
  dilates a timm backbone (``dilation``, ``output_stride`` 16: ``backbone_dilation``);
  ``input_projection`` is a plain 1x1 conv (no GroupNorm).
* Position: sine, normalize=True, scale 2*pi, NO half-pixel offset (``cumsum / (last + 1e-6)``),
  temperature 10000, [y, x] channel order; no level embedding. Same as the official model.
* Encoder: post-norm DETR layers, q = k = x + pos, v = x; HF's separate q/k/v projections are
  fused into torch's ``in_proj`` (q, k, v order), numerically the same attention.
* Decoder: reference points sigmoid(ref_point_head(query_position_embeddings)), fixed for all
  layers; spatial query = sine(reference) times query_scale(previous output) from layer 1 on;
  per-head concatenation of content and spatial parts; layer 0 alone has ``q_pos_proj`` in the
  cross-attention; a shared ``layernorm`` on the outputs. With ``auxiliary_loss=True``
  transformers 5 feeds the NORMED output to the next layer (the official model does not);
  the final prediction is unaffected only when ``auxiliary_loss`` is false, the default.
* Heads: shared ``class_labels_classifier`` and ``bbox_predictor``; box = sigmoid(delta +
  [inverse_sigmoid(reference), 0, 0]) with eps 1e-5.
Names: transformers 5 ``self_attn.{q,k}_{content,pos}_proj`` / ``encoder_attn.*`` and
``mlp.fc1``; transformers 4 files (the hub's microsoft/conditional-detr-resnet-50) use the
official ``sa_*`` / ``ca_*`` names with ``fc1``. Both convert.
"""
from __future__ import annotations

from pathlib import Path

from ...errors import SparsedetError
from .common import WB, Renamed, Rule, read_hf_weights, rename_keys
from .hf_common import (BACKBONE_RULES, backbone_depth, backbone_dilation, check_class_head, fuse_qkv,
                        read_detr_config)

HINT = "Expected a transformers ConditionalDetrForObjectDetection directory (config.json + model.safetensors)."
ENC = r"model\.encoder\.layers\.(\d+)\."
DEC = r"model\.decoder\.layers\.(\d+)\."
SELF = {"q_content_proj": "sa_qcontent_proj", "q_pos_proj": "sa_qpos_proj", "k_content_proj": "sa_kcontent_proj",
        "k_pos_proj": "sa_kpos_proj", "v_proj": "sa_v_proj"}
CROSS = {"q_content_proj": "ca_qcontent_proj", "q_pos_proj": "ca_qpos_proj", "k_content_proj": "ca_kcontent_proj",
         "k_pos_proj": "ca_kpos_proj", "v_proj": "ca_v_proj", "q_pos_sine_proj": "ca_qpos_sine_proj"}
RULES = [
    *BACKBONE_RULES,
    Rule(r"model\.input_projection\." + WB, r"neck.input_proj.0.0.\1"),
    Rule(r"model\.query_position_embeddings\.weight", "queries.query_embed.weight"),
    Rule(r"model\.decoder\.ref_point_head\.(layers\.[01]\.)" + WB, r"queries.ref_point_head.\1\2"),
    Rule(r"model\.decoder\.query_scale\.(layers\.[01]\.)" + WB, r"decoder.query_scale.\1\2"),
    Rule(r"model\.decoder\.layernorm\." + WB, r"decoder.norm.\1"),
    Rule(r"class_labels_classifier\." + WB, r"heads.class_embed.0.\1"),
    Rule(r"bbox_predictor\.(layers\.[0-2]\.)" + WB, r"heads.box_embed.0.\1\2"),
    # encoder
    Rule(ENC + r"self_attn\.in_proj_" + WB, r"encoder.layers.\1.self_attn.in_proj_\2"),
    Rule(ENC + r"self_attn\.(?:o_proj|out_proj)\." + WB, r"encoder.layers.\1.self_attn.out_proj.\2"),
    Rule(ENC + r"self_attn_layer_norm\." + WB, r"encoder.layers.\1.norm1.\2"),
    Rule(ENC + r"(?:mlp\.)?fc([12])\." + WB, r"encoder.layers.\1.linear\2.\3"),
    Rule(ENC + r"final_layer_norm\." + WB, r"encoder.layers.\1.norm2.\2"),
    # decoder: transformers 5 names
    Rule(DEC + r"self_attn\.(\w+_proj)\." + WB,
         lambda m: f"decoder.layers.{m[1]}.{SELF[m[2]]}.{m[3]}" if m[2] in SELF else None),
    Rule(DEC + r"encoder_attn\.(\w+_proj)\." + WB,
         lambda m: f"decoder.layers.{m[1]}.cross.{CROSS[m[2]]}.{m[3]}" if m[2] in CROSS else None),
    # decoder: official / transformers 4 names
    Rule(DEC + r"(sa_\w+_proj)\." + WB, r"decoder.layers.\1.\2.\3"),
    Rule(DEC + r"(ca_\w+_proj)\." + WB, r"decoder.layers.\1.cross.\2.\3"),
    # decoder: both
    Rule(DEC + r"self_attn\.(?:o_proj|out_proj)\." + WB, r"decoder.layers.\1.self_attn.out_proj.\2"),
    Rule(DEC + r"encoder_attn\.(?:o_proj|out_proj)\." + WB, r"decoder.layers.\1.cross.cross_attn.out_proj.\2"),
    Rule(DEC + r"self_attn_layer_norm\." + WB, r"decoder.layers.\1.norm1.\2"),
    Rule(DEC + r"encoder_attn_layer_norm\." + WB, r"decoder.layers.\1.cross.norm2.\2"),
    Rule(DEC + r"(?:mlp\.)?fc([12])\." + WB, r"decoder.layers.\1.cross.linear\2.\3"),
    Rule(DEC + r"final_layer_norm\." + WB, r"decoder.layers.\1.cross.norm3.\2"),
]
DEFAULTS = {"d_model": 256, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048, "encoder_attention_heads": 8,
            "decoder_attention_heads": 8, "encoder_layers": 6, "decoder_layers": 6, "num_queries": 300,
            "position_embedding_type": "sine", "activation_function": "relu", "dropout": 0.1}


def read_config(hf_dir: str | Path) -> dict:
    """Our config overrides (flat, dotted keys) from ``hf_dir/config.json``."""
    cfg, path, problems, classes = read_detr_config(hf_dir, "conditional_detr", DEFAULTS, HINT)
    if problems:
        raise SparsedetError(f"{path}: unsupported Conditional DETR config: {'; '.join(problems)}")
    return {
        "model.num_classes": len(classes), "model.hidden_dim": cfg["d_model"], "model.ffn_dim": cfg["encoder_ffn_dim"],
        "model.num_heads": cfg["encoder_attention_heads"], "model.num_encoder_layers": cfg["encoder_layers"],
        "model.num_decoder_layers": cfg["decoder_layers"], "model.num_queries": cfg["num_queries"],
        "model.dropout": float(cfg["dropout"]), "model.backbone.depth": backbone_depth(cfg, path, [4], last_only=True),
        "model.backbone.dilation": backbone_dilation(cfg, path),
        "classes": classes, "category_ids": list(range(len(classes))),
    }


def convert_hf_conditional_detr(hf_dir: str | Path) -> tuple[Renamed, dict]:
    """Returns (state dict in our layout, config overrides for the ``conditional_detr_r50`` preset).
    Unknown and missing keys fail when ``convert`` checks the layout against the built model."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise SparsedetError(f"{hf_dir} is not a directory. {HINT}")
    overrides = read_config(hf_dir)
    state, source = read_hf_weights(hf_dir)
    out = rename_keys(fuse_qkv(state, ENC + r"self_attn"), RULES, source, ignore=[r".*\.num_batches_tracked"],
                      hint=HINT)
    check_class_head(out, overrides["model.num_classes"])
    return out, overrides
