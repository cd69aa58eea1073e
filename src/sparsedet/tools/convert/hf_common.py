"""What transformers' DETR checkpoints share: config.json checks, fused q/k/v projections, ResNet
key names (transformers' own ResNet or timm's, which are torchvision's) and the ResNet depth and
dilation a config describes."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ...errors import SparsedetError
from ...jsonfile import read_json_object
from ...nn.backbone import BLOCKS
from .common import Renamed, Rule

BACKBONE = r"model\.backbone\.(?:conv_encoder\.)?model\."
BN = r"(weight|bias|running_mean|running_var)"


def _stage(m: re.Match) -> str:
    return f"backbone.layer{int(m[1]) + 1}.{m[2]}"


BACKBONE_RULES = [
    # backbone: transformers ResNet names
    Rule(BACKBONE + r"embedder\.embedder\.convolution\.weight", "backbone.conv1.weight"),
    Rule(BACKBONE + r"embedder\.embedder\.normalization\." + BN, r"backbone.bn1.\1"),
    Rule(BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.convolution\.weight",
         lambda m: f"{_stage(m)}.conv{int(m[3]) + 1}.weight"),
    Rule(BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.normalization\." + BN,
         lambda m: f"{_stage(m)}.bn{int(m[3]) + 1}.{m[4]}"),
    Rule(BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.weight",
         lambda m: f"{_stage(m)}.downsample.0.weight"),
    Rule(BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\." + BN,
         lambda m: f"{_stage(m)}.downsample.1.{m[3]}"),
    # backbone: timm ResNet names are torchvision names already
    Rule(BACKBONE + r"((?:conv1|bn1|layer[1-4]\.\d+\.(?:conv\d|bn\d|downsample\.[01]))\.\w+)", r"backbone.\1"),
]


def backbone_depth(cfg: dict, source: Path, stages: list[int], last_only: bool = False) -> int:
    """ResNet depth from the backbone part of a transformers DETR config (transformers or timm
    ResNet); ``stages``: the ResNet stages the model reads (2..4 = C3..C5); ``last_only``: the
    model reads the last returned map alone (Conditional DETR), so earlier ones may be returned too.
    Any dilation is left to ``backbone_dilation``."""
    def fits(returned: list, want: list) -> bool:
        return returned[-len(want):] == want if last_only else returned == want

    bb = cfg.get("backbone_config") or {}
    if bb.get("model_type") == "resnet":
        counts = list(bb.get("depths", []))
        kind = bb.get("layer_type", "bottleneck")
        depth = next((d for d, (k, c) in BLOCKS.items() if k == kind and c == counts), None)
        if depth is None:
            raise SparsedetError(f"{source}: ResNet with {kind} blocks {counts} is not one of ResNet-{sorted(BLOCKS)}")
        expansion = 4 if kind == "bottleneck" else 1
        width = bb.get("embedding_size", 64)
        sizes = [width * 2 ** i * expansion for i in range(4)]
        problems = []
        if width != 64 or list(bb.get("hidden_sizes", sizes)) != sizes:
            problems.append(f"channels {bb.get('hidden_sizes')} (need {[64 * 2 ** i * expansion for i in range(4)]})")
        if bb.get("downsample_in_bottleneck") or bb.get("downsample_in_first_stage"):
            problems.append("downsample_in_bottleneck/downsample_in_first_stage (need both false: torchvision v1.5)")
        if bb.get("hidden_act", "relu") != "relu":
            problems.append(f"hidden_act {bb.get('hidden_act')!r} (need 'relu')")
        want = [f"stage{i}" for i in stages]
        if not fits(list(bb.get("out_features") or want), want):
            problems.append(f"out_features {bb.get('out_features')} (need {want})")
        if problems:
            raise SparsedetError(f"{source}: unsupported backbone: {'; '.join(problems)}")
        return depth
    if bb and bb.get("model_type") != "timm_backbone":
        raise SparsedetError(f"{source}: unsupported backbone type {bb.get('model_type')!r}; a ResNet is needed")
    # timm backbone: named in backbone_config (transformers 5) or at the top level (transformers 4);
    # transformers builds a timm resnet50 when nothing is named.
    name = (bb if bb.get("model_type") == "timm_backbone" else cfg).get("backbone") or "resnet50"
    match = re.fullmatch(r"resnet(\d+)", str(name))
    if match is None or int(match[1]) not in BLOCKS:
        raise SparsedetError(f"{source}: unsupported backbone {name!r}; a ResNet-{sorted(BLOCKS)} is needed")
    if not fits(list(bb.get("out_indices") or stages), stages) or bb.get("output_stride") not in (None, 16, 32):
        raise SparsedetError(f"{source}: backbone must return stages {stages} (out_indices {stages}) at output "
                             f"stride 32, or 16 (DC5); got out_indices {bb.get('out_indices')}, output_stride "
                             f"{bb.get('output_stride')}")
    return int(match[1])


def backbone_dilation(cfg: dict, source: Path) -> bool:
    """Whether transformers builds the config's last ResNet stage dilated (DC5). Only a timm backbone
    dilates: ``output_stride`` 16 in ``backbone_config`` (transformers 5 writes it), or ``dilation``
    when there is no ``backbone_config`` (transformers 4 files; transformers 5 reads them the same way).
    transformers' own ResNet ignores ``dilation``, so such a model converts undilated, as it runs."""
    bb = cfg.get("backbone_config") or {}
    if bb.get("model_type") == "resnet":
        if cfg.get("dilation"):
            warnings.warn(f"{source}: dilation is set, but transformers' own ResNet backbone ignores it (only timm "
                          "backbones dilate), so the model runs undilated and converts undilated", stacklevel=2)
        return False
    return bb.get("output_stride") == 16 if bb else bool(cfg.get("dilation"))


def read_detr_config(hf_dir: str | Path, model_type: str, defaults: dict, hint: str
                     ) -> tuple[dict, Path, list[str], list[str]]:
    """``hf_dir/config.json`` over transformers' defaults. Returns (config, its path, problems
    found so far, class names per logit column); the caller adds its own checks and raises."""
    path = Path(hf_dir) / "config.json"
    raw = read_json_object(path, "Hugging Face config")
    if raw.get("model_type") != model_type:
        raise SparsedetError(f"{path}: model_type is {raw.get('model_type')!r}, not {model_type!r}. {hint}")
    cfg = {**defaults, **raw}
    problems = [f"{a} != {b} (ours share one value)" for a, b in (("encoder_ffn_dim", "decoder_ffn_dim"),
                ("encoder_attention_heads", "decoder_attention_heads")) if cfg[a] != cfg[b]]
    for key, need in (("position_embedding_type", "sine"), ("activation_function", "relu")):
        if cfg.get(key, need) != need:
            problems.append(f"{key} {cfg[key]!r} (need {need!r})")
    # Logit column i is id2label[i] (for hub COCO models the index is the COCO category id).
    id2label = cfg.get("id2label") or {}
    if not id2label or set(id2label) != {str(i) for i in range(len(id2label))}:
        problems.append("id2label keys must be 0..N-1 (one per logit column)")
        return cfg, path, problems, []
    return cfg, path, problems, [str(id2label[str(i)]) for i in range(len(id2label))]


def fuse_qkv(state: dict[str, Tensor], attention: str) -> dict[str, Tensor]:
    """Separate q/k/v projections of the attention modules whose key prefix matches the regular
    expression ``attention`` -> one ``in_proj`` as torch's MultiheadAttention (q, k, v order)."""
    out = dict(state)
    for key in [k for k in state if re.fullmatch(attention + r"\.q_proj\.(weight|bias)", k)]:
        prefix, param = key.rsplit(".q_proj.", 1)
        parts = [f"{prefix}.{p}_proj.{param}" for p in "qkv"]
        if all(p in out for p in parts):
            out[f"{prefix}.in_proj_{param}"] = torch.cat([out.pop(p) for p in parts], dim=0)
    return out


def check_class_head(state: Renamed, num_classes: int) -> None:
    """Refuse weights whose class head does not have one output per ``id2label`` entry of config.json
    (a head that is missing altogether is reported with the rest of the layout)."""
    head = state.get("heads.class_embed.0.weight")
    if head is not None and head.shape[0] != num_classes:
        raise SparsedetError(f"{state.source}: class head has {head.shape[0]} outputs but config.json id2label "
                             f"names {num_classes} classes")
