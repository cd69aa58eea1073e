"""Convert a Hugging Face ``DeformableDetrForObjectDetection`` directory to our layout.

Read from transformers 5.23 (``models/deformable_detr``, ``models/resnet``); the
conventions that matter numerically, and where HF departs from the official code:

* Input: ``pixel_values`` = (rgb/255 - ImageNet mean) / std, mean (0.485, 0.456, 0.406),
  std (0.229, 0.224, 0.225); images are resized (shortest 800, longest 1333, bilinear),
  normalised, THEN padded bottom/right with 0 (zero in normalised space, as the official
  NestedTensor). ``pixel_mask`` is 1 on valid pixels, 0 on padding (the inverse of ours).
* Masks per level: ``F.interpolate(pixel_mask[None].float(), size=(h, w))`` (default mode
  "nearest") from the FULL-resolution mask, for C3-C5 and for the extra level alike.
* Backbone from a ``ResNetConfig``: torchvision "v1.5" (stride on the 3x3 conv) unless
  ``downsample_in_bottleneck`` is true; stem 7x7/2 pad 3, max-pool 3/2 pad 1. Every BatchNorm
  is replaced by a frozen BN with eps hard-coded to 1e-5; stem and stage 1 are frozen.
  Names: ``embedder.embedder.{convolution,normalization}`` = conv1/bn1,
  ``encoder.stages.{s}.layers.{b}.layer.{j}`` = layer{s+1}.{b}.conv/bn{j+1},
  ``...shortcut`` = downsample.{0,1}. A timm backbone (hub checkpoints) already has
  torchvision names. Files saved by transformers 5 use the legacy prefix
  ``model.backbone.conv_encoder.model.`` and legacy ``fc1``/``fc2``/``self_attn.out_proj``.
* Position embedding: sine, normalize=True, scale 2*pi, offset -0.5
  (``(cumsum - 0.5) / (last + 1e-6) * 2pi``), temperature 10000, d_model/2 = 128 features
  per axis, interleaved sin/cos, channel order [y, x]; plus ``level_embed[l]``. Same as official.
* Input projections: 1x1 conv + GN(32) on C3..C5; first extra level 3x3/2 pad 1 conv + GN on
  raw C5, further extra levels on the previous projected level.
* Encoder reference points: ((j + 0.5) / (valid_ratio_w * W), (i + 0.5) / (valid_ratio_h * H))
  then times every level's valid ratio; valid ratio = valid rows/cols of the first
  column/row of each level mask divided by H/W. Same as official.
* MSDA: value zeroed at padding, softmax over levels*points jointly, 2-D ref: loc = ref +
  off / (W, H); 4-D ref: loc = ref_xy + off / P * ref_wh * 0.5; grid_sample(2*loc - 1,
  bilinear, zeros, align_corners=False). Pure PyTorch on CPU (the hub-kernel replacement
  needs the ``kernels`` package; ``disable_custom_kernels`` is unused in 5.23).
* Decoder layer (post-norm): self-attn (q = k = tgt + pos, v = tgt) -> norm2; MSDA cross-attn
  (query tgt + pos) -> norm1; FFN -> norm3. HF has separate q/k/v projections; we fuse them
  into ``in_proj_weight = cat(q, k, v)``, which is numerically the same attention.
* Two-stage: proposals per cell ((j+0.5)/valid_W, (i+0.5)/valid_H, 0.05*2^l), valid iff all
  four in (0.01, 0.99), logits, +inf at padding/invalid; memory zeroed there ->
  enc_output -> enc_output_norm -> class_embed[L] / bbox_embed[L] (+ proposal logit).
  Top-k (k = two_stage_num_proposals) by class channel 0, detached; reference = sigmoid;
  query = pos_trans_norm(pos_trans(sine(sigmoid(logits)))) with the sine in [x, y, w, h]
  order, 128 features each at temperature 10000 and scale 2*pi, computed in float32;
  split -> (query_pos first, tgt second). Same as official.
* Box refinement: ref_{l+1} = sigmoid(bbox_embed[l](h_l) + inverse_sigmoid(ref_l)).detach();
  layer l predicts from its INPUT reference; inverse_sigmoid clamps with eps 1e-5.
* Post-processing: sigmoid, top-100 over queries x classes, cxcywh -> xyxy scaled by
  (w, h, w, h) of the target size, then a score threshold (0.5 by default).

Deviations of HF from the official Deformable DETR:
* With ``with_box_refine=True`` and ``two_stage=False`` transformers 5 TIES
  ``class_embed.1..L-1`` to ``class_embed.0`` (official: independent clones) and saves only
  ``class_embed.0``; official or transformers-4 files carry all L. We copy
  ``class_embed.0`` to every layer when only it is stored (what HF 5 computes) and keep
  distinct heads when the file has them (what the official model computes).
* transformers 5 saves the detection heads only once: under ``model.decoder.{class,bbox}_embed``
  when refinement / two-stage puts them there, else under the top-level names.
* ``two_stage=True`` requires ``with_box_refine=True`` (HF rejects it otherwise).
* Defaults that differ from the official recipe (matter for training, not for inference):
  ``attention_dropout=0.0`` and ``activation_dropout=0.0`` (official 0.1 in decoder
  self-attention and after the FFN activation), ``auxiliary_loss=False`` (official True),
  ``class_cost=1`` and a fixed class-loss weight 1 (official 2 and 2), no encoder
  (two-stage) loss. FFN 1024, 6+6 layers, 4 levels, 4 points, 300 queries, sine embedding
  are already the official defaults.
"""
from __future__ import annotations

from pathlib import Path

from ...errors import SparsedetError
from .common import WB, Renamed, Rule, deformable_head_rules, fold_aliases, read_hf_weights, rename_keys
from .hf_common import (BACKBONE_RULES, backbone_depth, backbone_dilation, check_class_head, fuse_qkv,
                        read_detr_config)

MSDA = r"(sampling_offsets|attention_weights|value_proj|output_proj)"
FFN = {"fc1": "linear1", "fc2": "linear2"}
HINT = "Expected a transformers DeformableDetrForObjectDetection directory (config.json + model.safetensors)."


def _rules(num_decoder_layers: int, two_stage: bool) -> list[Rule]:
    """HF key -> our key; heads depend on whether index L is the two-stage proposal head."""
    layer = r"model\.(encoder|decoder)\.layers\.(\d+)\."
    return [
        *BACKBONE_RULES,
        # neck
        Rule(r"model\.input_proj\.(\d+)\.([01])\." + WB, r"neck.input_proj.\1.\2.\3"),
        Rule(r"model\.level_embed", "neck.level_embed"),
        # encoder / decoder layers
        Rule(r"model\.encoder\.layers\.(\d+)\.self_attn\." + MSDA + r"\." + WB, r"encoder.layers.\1.self_attn.\2.\3"),
        Rule(r"model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\." + WB, r"encoder.layers.\1.norm1.\2"),
        Rule(r"model\.encoder\.layers\.(\d+)\.final_layer_norm\." + WB, r"encoder.layers.\1.norm2.\2"),
        Rule(layer + r"(?:mlp\.)?(fc[12])\." + WB, lambda m: f"{m[1]}.layers.{m[2]}.{FFN[m[3]]}.{m[4]}"),
        Rule(r"model\.decoder\.layers\.(\d+)\.self_attn\.in_proj_" + WB, r"decoder.layers.\1.self_attn.in_proj_\2"),
        Rule(r"model\.decoder\.layers\.(\d+)\.self_attn\.(?:o_proj|out_proj)\." + WB,
             r"decoder.layers.\1.self_attn.out_proj.\2"),
        Rule(r"model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\." + WB, r"decoder.layers.\1.norm2.\2"),
        Rule(r"model\.decoder\.layers\.(\d+)\.encoder_attn\." + MSDA + r"\." + WB,
             r"decoder.layers.\1.cross_attn.\2.\3"),
        Rule(r"model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\." + WB, r"decoder.layers.\1.norm1.\2"),
        Rule(r"model\.decoder\.layers\.(\d+)\.final_layer_norm\." + WB, r"decoder.layers.\1.norm3.\2"),
        # query selection
        Rule(r"model\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm)\." + WB, r"queries.\1.\2"),
        Rule(r"model\.query_position_embeddings\.weight", "queries.query_embed.weight"),
        Rule(r"model\.reference_points\." + WB, r"queries.reference_points.\1"),
        # prediction heads (after folding the model.decoder.* copies)
        *deformable_head_rules(num_decoder_layers, two_stage),
    ]


# transformers' DeformableDetrConfig defaults, for keys a config.json leaves out.
DEFAULTS = {"d_model": 256, "encoder_ffn_dim": 1024, "decoder_ffn_dim": 1024, "encoder_attention_heads": 8,
            "decoder_attention_heads": 8, "encoder_layers": 6, "decoder_layers": 6, "num_queries": 300,
            "two_stage_num_proposals": 300, "num_feature_levels": 4, "encoder_n_points": 4, "decoder_n_points": 4,
            "two_stage": False, "with_box_refine": False, "position_embedding_type": "sine",
            "activation_function": "relu"}


def read_config(hf_dir: str | Path) -> dict:
    """Our config overrides (flat, dotted keys) from ``hf_dir/config.json``."""
    cfg, path, problems, classes = read_detr_config(hf_dir, "deformable_detr", DEFAULTS, HINT)
    if cfg["num_feature_levels"] < 3:
        problems.append("num_feature_levels < 3 (need C3..C5 plus extra levels)")
    two_stage, box_refine = bool(cfg["two_stage"]), bool(cfg["with_box_refine"])
    if two_stage and not box_refine:
        problems.append("two_stage without with_box_refine")
    if backbone_dilation(cfg, path):
        problems.append("a dilated (DC5) backbone (only Conditional DETR converts DC5)")
    if problems:
        raise SparsedetError(f"{path}: unsupported Deformable DETR config: {'; '.join(problems)}")
    return {
        "model.num_classes": len(classes),
        "model.hidden_dim": cfg["d_model"],
        "model.ffn_dim": cfg["encoder_ffn_dim"],
        "model.num_heads": cfg["encoder_attention_heads"],
        "model.num_encoder_layers": cfg["encoder_layers"],
        "model.num_decoder_layers": cfg["decoder_layers"],
        "model.num_queries": cfg["two_stage_num_proposals"] if two_stage else cfg["num_queries"],
        "model.num_levels": cfg["num_feature_levels"],
        "model.enc_points": cfg["encoder_n_points"],
        "model.dec_points": cfg["decoder_n_points"],
        "model.two_stage": two_stage,
        "model.box_refine": box_refine,
        "model.backbone.depth": backbone_depth(cfg, path, [2, 3, 4]),
        "classes": classes,
        "category_ids": list(range(len(classes))),
    }


def convert_hf_deformable_detr(hf_dir: str | Path) -> tuple[Renamed, dict]:
    """Convert a transformers Deformable DETR directory.

    Returns (state dict in our ``Detector`` layout, config overrides from ``read_config``).
    Keys no rule knows stay in the result's ``unknown``: ``convert`` reports them with the keys
    the model built from the config misses, in one error.
    """
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise SparsedetError(f"{hf_dir} is not a directory. {HINT}")
    overrides = read_config(hf_dir)
    state, source = read_hf_weights(hf_dir)
    layers, two_stage = overrides["model.num_decoder_layers"], overrides["model.two_stage"]
    box_refine = overrides["model.box_refine"]

    # The decoder holds copies of the heads it uses for refinement / proposals.
    state = fold_aliases(state, {"model.decoder.class_embed.": "class_embed.",
                                 "model.decoder.bbox_embed.": "bbox_embed."}, source)
    if box_refine and not two_stage and "class_embed.0.weight" in state and "class_embed.1.weight" not in state:
        # transformers 5 ties every class head to layer 0's and stores only that one.
        state.update({f"class_embed.{k}.{p}": state[f"class_embed.0.{p}"].clone()
                      for k in range(1, layers) for p in ("weight", "bias")})
    if not box_refine:
        # One shared head; files written by transformers 4 repeat it for every layer.
        state = fold_aliases(state, {f"{kind}.{k}.": f"{kind}.0." for kind in ("class_embed", "bbox_embed")
                                     for k in range(1, layers)}, source)
    state = fuse_qkv(state, r"model\.decoder\.layers\.\d+\.self_attn")
    out = rename_keys(state, _rules(layers, two_stage), source, ignore=[r".*\.num_batches_tracked"], hint=HINT)
    check_class_head(out, overrides["model.num_classes"])
    return out, overrides
