"""Dataclass configs with JSON round-trip and dotted ``key.sub=value`` overrides."""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stage_kinds import BACKBONES, BASES, DECODERS, ENCODERS
from .plugins import load_plugins
from .errors import SparsedetError, close_names
from .jsonfile import read_json_object

# Precision words: inference (predict, eval, bench) takes PRECISIONS; training also "auto" (bf16
# where the hardware runs it natively, else fp32). engine.precision says what each one runs as.
PRECISIONS = ("fp32", "bf16", "fp16")
TRAIN_PRECISIONS = PRECISIONS + ("auto",)
CLS_LOSSES = ("focal", "varifocal", "aligned")  # losses/criterion.py computes each


@dataclass
class BackboneConfig:
    """``kind`` picks the network (models/backbones.py): "resnet" (depth, width, norm, dilation) or "swin"
    (variant, embed_dim, window_size, drop_path, output_norms). Stages count alike for both:
    return_layers 2, 3, 4 are strides 8, 16, 32; frozen_stages k freezes the stem (Swin: patch
    embedding) and stages 1..k."""

    kind: str = "resnet"
    depth: int = 50
    width: int = 64                 # stem channels; 64 = the standard ResNet
    # ImageNet weights: a file (ResNet: torchvision .pth/.safetensors, detectron2 .pkl; Swin: the official
    # .pth), or a name downloaded once: imagenet, imagenet-detectron2 (ResNet-50), imagenet-22k (Swin)
    weights: str | None = None
    frozen_stages: int = 1          # stem + layer1 frozen, as in DETR recipes
    norm: str = "frozen_bn"         # "frozen_bn" (pretrained) or "bn" (trainable, for training from scratch)
    return_layers: list[int] = field(default_factory=lambda: [2, 3, 4])
    dilation: bool = False          # DC5: layer4 at stride 16, dilated 3x3 convolutions (bottleneck depths)
    variant: str = "T"              # Swin-T, S, B or L: blocks per stage and channels
    embed_dim: int = 0              # Swin patch-embedding channels; 0 = the variant's (96, 96, 128, 192)
    window_size: int = 7            # Swin attention window: 7 (224-px ImageNet weights) or 12 (384-px)
    drop_path: float = 0.2          # Swin stochastic depth of the last block (linear from 0)
    output_norms: bool = True       # Swin: LayerNorm on each returned stage (Salience DETR's has none)


@dataclass
class LossConfig:
    cls_weight: float = 2.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    match_cls: float = 2.0
    match_bbox: float = 5.0
    match_giou: float = 2.0
    cls_loss: str = "focal"         # "focal" | "varifocal" (Salience: IoU-aware) | "aligned" (SD-DETR: score^a * IoU^b)
    align_alpha: float = 0.25       # SD-DETR alignment target t = score^align_alpha * IoU^align_beta
    align_beta: float = 0.75
    select_weight: float = 1.0      # token-selection supervision (DAM 1, foreground 1.5, salience 2)


@dataclass
class EncoderConfig:
    """Which tokens the encoder updates (the papers: docs/methods.md). ``kind``: "dense" (every token, every
    layer), "sparse" (Sparse DETR), "focus" (Focus-DETR) or "salience" (Salience DETR)."""

    kind: str = "dense"
    keep_ratio: float = 0.1         # fraction of valid tokens kept (Sparse rho; Focus base ratio 0.5)
    layer_ratios: list[float] = field(default_factory=lambda: [1.0, 0.8, 0.6, 0.6, 0.4, 0.2])  # cascade
    level_ratios: list[float] = field(default_factory=lambda: [0.4, 0.8, 1.0, 1.0])  # Salience per-level quotas
    object_tokens: int = 300        # Focus/Salience: tokens in the dual attention's self-attention
    # Focus/Salience label assignment: box-size range (max distance from a token to the box
    # edges, pixels) owned by each level. Default: the official code's non-overlapping ranges.
    label_ranges: list[list[float]] = field(
        default_factory=lambda: [[-1.0, 64.0], [64.0, 128.0], [128.0, 256.0], [256.0, 1e5]])
    aux_heads: bool = True          # Sparse DETR: detection heads on the sparse tokens of layers 0..L-2
    background_size: int = 200      # Salience: learned background embedding table (max cells per side)
    fusion: bool = True             # Salience: cross-level token fusion on the encoder memory


@dataclass
class DecoderConfig:
    """Switches of the query-side methods, SAM-DETR and SD-DETR (the papers: docs/methods.md)."""

    smca: bool = False              # SAM-DETR: Gaussian-like spatial prior around each head's salient point
    task_queries: bool = True       # SD-DETR: content queries from each task's salient points (else learned)
    split_cross_attention: bool = True  # SD-DETR: one cross-attention per task (else one shared)
    task_points: int = 8            # SD-DETR: salient points per task and query


@dataclass
class ModelConfig:
    # Base detector and decoder: "deformable" | "dino" (multi-scale deformable decoders),
    # "conditional" | "sam" | "decoupled" (single-level global attention: Conditional DETR, SAM-DETR, SD-DETR)
    kind: str = "deformable"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    classes: list[str] = field(default_factory=list)        # names per logit column
    category_ids: list[int] = field(default_factory=list)   # dataset category id per logit column
    num_classes: int = 91
    hidden_dim: int = 256
    ffn_dim: int = 1024
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    num_levels: int = 4
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    input_norm: bool = True         # GroupNorm after the input projections (Conditional DETR: none)
    # Keep a batch's padding out of each image's features (ResNet stages, the neck's GroupNorm and
    # level masks), so detections do not depend on batch-mates; converted checkpoints set false,
    # computing as the official code does on a padded batch.
    mask_padding: bool = True
    enc_points: int = 4
    dec_points: int = 4
    dropout: float = 0.1
    num_queries: int = 300
    two_stage: bool = False
    box_refine: bool = False
    share_heads: bool | None = None  # one class/box head pair for all decoder layers; None: the base's default
    efficient_queries: bool = False  # Sparse DETR: content queries = top memory tokens, class-specific ranking
    proposal_nms: float = 0.0        # Salience: IoU of the cell-grid NMS on two-stage proposals (0 = off)
    pos_temperature: float = 10000.0
    pos_offset: float = -0.5        # Deformable DETR centres cells at (i + 0.5); DINO uses 0
    sigmoid_eps: float = 1e-5
    dn_queries: int = 0             # DINO contrastive denoising: 100
    dn_label_noise: float = 0.5
    dn_box_noise: float = 1.0
    dn_spare_label: bool = True     # DINO's label table has a row for unused slots; Focus/Salience do not
    top_k: int = 100                # detections kept per image by post-processing
    # Default minimum score of predict, viz, videos, ONNX and eval's confusion matrix: recorded at the end
    # of training (engine.thresholds: best F1 on the val split); None = not recorded (each verb's own default)
    score_threshold: float | None = None
    eval_size: int = 800            # preprocessing: shorter side at inference (pixels)
    eval_max_size: int = 1333       # preprocessing: longer side at most (pixels)
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class DataConfig:
    # Datasets: a COCO json, or a YOLO data.yaml (or the folder holding it); set by `sparsedet train`
    # and kept in the run's config.json so that `--resume RUN` needs nothing else.
    train: str = ""
    val: str = ""
    images: str = ""                   # COCO image root; "" = each json's folder (or its images/)
    train_scales: list[int] = field(default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800])
    max_size: int = 1333
    crop: bool = True
    crop_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_range: list[int] = field(default_factory=lambda: [384, 600])
    num_workers: int = 0
    size_divisor: int = 1              # pad batches to a multiple: fewer distinct shapes, faster CPU kernels
    aspect_grouping: bool = True       # batch landscape with landscape and portrait with portrait images


@dataclass
class TrainConfig:
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1   # sampling offsets / reference points
    weight_decay: float = 1e-4
    batch_size: int = 2                # images per step and process (torchrun: per GPU)
    accumulate: int = 1                # micro-batches per optimiser step
    max_steps: int = 0                 # optimiser steps; 0: use epochs
    epochs: int = 50
    schedule: str = "step"             # "step": x0.1 at lr_drop; "cosine": down to lr * min_lr_ratio
    lr_drop: float = 0.8               # fraction of training after which lr drops x0.1 (step schedule)
    min_lr_ratio: float = 0.01         # cosine schedule floor
    warmup_steps: int = 0
    clip_grad: float = 0.1
    ema: bool = False                  # exponential moving average of the weights, evaluated and saved too
    ema_decay: float = 0.9997
    minutes: float = 0.0               # wall-clock budget; 0 = none
    eval_every: int = 0                # steps; 0 = once per epoch, -1 = at the end only
    checkpoint_every: int = 0          # steps; 0 = at every evaluation and at the end
    keep_checkpoints: int = 1          # newest step checkpoints kept in RUN/checkpoints (plus the best)
    log_every: int = 20
    max_nonfinite: int = 20            # non-finite losses in a row that stop the run
    seed: int = 42
    device: str = "auto"
    precision: str = "fp32"            # "fp32" | "bf16" | "fp16" (with a loss scaler) | "auto" (bf16 where native)
    threads: int = 0                   # 0 = torch default
    tensorboard: bool = True           # also log to RUN/tensorboard when the tensorboard package is installed

    def _set_amp(self, value: str) -> None:
        self.precision = _renamed("train.amp", value)[1]

    # The deprecated train.amp set from Python (overrides and JSON go through RENAMED). Write-only:
    # a read would give a precision word where old code expects "none".
    amp = property(fset=_set_amp)


@dataclass
class Config:
    preset: str = ""    # the preset this configuration started from
    source: str = ""    # for converted weights: the checkpoint source and file, e.g. "official-dino: x.pth"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return _build(cls, d, "")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        return cls.from_dict(read_json_object(path, "config"))


# Renamed keys: old dotted key -> (new key in the same section, old value -> new value). The old
# spellings keep working, with a FutureWarning: run folders written before the rename, scripts.
RENAMED = {"train.amp": ("train.precision", lambda v: "fp32" if v == "none" else v)}


def _renamed(key: str, value: Any) -> tuple[str, Any]:
    """``(key, value)`` under the current name (warning when ``key`` is an old one)."""
    if key not in RENAMED:
        return key, value
    new, convert = RENAMED[key]
    warnings.warn(f"{key} is deprecated and will be removed; use {new} ({key}={value!r} is "
                  f"{new}={convert(value)!r})", FutureWarning, stacklevel=3)
    return new, convert(value)


def _build(cls, d: dict, prefix: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        full, value = _renamed(prefix + key, value)
        key = full[len(prefix):]
        if key not in names:
            _unknown(prefix + key, [prefix + n for n in names])
        sub = names[key].default_factory if names[key].default_factory is not dataclasses.MISSING else None
        if isinstance(value, dict) and sub is not None and dataclasses.is_dataclass(sub()):
            value = _build(type(sub()), value, prefix + key + ".")
        kwargs[key] = value
    return cls(**kwargs)


def _unknown(key: str, known: list[str], close: list[str] | None = None):
    close = close_names(key, known) if close is None else close
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
    raise SparsedetError(f"unknown config key {key!r}{hint}")


def _similar_keys(obj: Any, parts: list[str], prefix: str = "") -> list[str]:
    """Existing dotted keys that look like ``parts``, matched one part at a time: the section first,
    then the field within it, so ``trian.minutes`` finds ``train.minutes`` (matching the whole
    string at once would weigh a long field name over the short misspelt section)."""
    names = [f.name for f in dataclasses.fields(obj)]
    head, rest = parts[0], parts[1:]
    found = []
    for name in [head] if head in names else close_names(head, names):
        child = getattr(obj, name)
        if not rest:
            found.append(prefix + name)
        elif dataclasses.is_dataclass(child):
            found += _similar_keys(child, rest, f"{prefix}{name}.")
    if not prefix and head not in ("model", "data", "train"):
        found += _similar_keys(obj.model, parts, "model.")  # model fields may omit "model."
    return found[:3]


def parse_value(text: str) -> Any:
    """JSON value if it parses (numbers, true/false, null, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered == "null":
            return None
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["train.max_steps=100", ...] -> {"train.max_steps": 100, ...}."""
    parsed = {}
    for item in items:
        if "=" not in item:
            raise SparsedetError(f"override {item!r} is not of the form key.sub=value")
        k, v = item.split("=", 1)
        parsed[k.strip()] = parse_value(v.strip())
    return parsed


def apply_overrides(config: Config, overrides: dict[str, Any] | list[str]) -> Config:
    """Set fields by dotted key, e.g. ``{"train.max_steps": 100}`` or ``["train.max_steps=100"]``.

    Keys may omit the leading ``model.`` for model fields (``hidden_dim=128``).
    """
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = dict(_renamed(key, value) for key, value in overrides.items())
    for key, value in overrides.items():
        parts = key.split(".")
        if parts[0] not in ("model", "data", "train"):
            parts = ["model"] + parts
        obj = config
        for i, part in enumerate(parts):
            if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
                fields = dataclasses.fields(obj) if dataclasses.is_dataclass(obj) else []
                known = [".".join(parts[:i] + [f.name]) for f in fields]
                _unknown(key, known, _similar_keys(config, key.split(".")))
            if i == len(parts) - 1:
                setattr(obj, part, _coerce(getattr(obj, part), value, ".".join(parts)))
            else:
                obj = getattr(obj, part)
    for key in overrides:
        _check_takes_effect(config, key if key.split(".")[0] in ("model", "data", "train") else "model." + key)
    validate(config)
    return config


def _decoder_fields(base: Any) -> tuple[str, ...]:
    decoder = DECODERS.get(base.decoder)
    return decoder.config_fields if decoder is not None else ()


# The sections whose fields only some kinds read, each kind declaring its own (``config_fields``;
# a base: its decoder's): prefix -> (the key that picks the kind, its table, a kind's fields). An
# override of a field that the kind in use does not read, and another does, cannot take effect: it
# is refused. A field that no kind declares (backbone weights) every kind reads.
STAGE_SECTIONS = {
    "model.backbone.": ("model.backbone.kind", BACKBONES, lambda kind: kind.config_fields),
    "model.encoder.": ("model.encoder.kind", ENCODERS, lambda cls: cls.config_fields),
    "model.decoder.": ("model.kind", BASES, _decoder_fields),
}


def _check_takes_effect(config: Config, key: str) -> None:
    prefix = next((p for p in STAGE_SECTIONS if key.startswith(p)), None)
    if prefix is None:
        return
    switch, table, fields_of = STAGE_SECTIONS[prefix]
    current = config
    for name in switch.split("."):
        current = getattr(current, name)
    if current not in table:
        load_plugins()  # a third-party kind declares its fields when its package is imported
    field_name = key.removeprefix(prefix)
    kinds = tuple(kind for kind, entry in table.items() if field_name in fields_of(entry))
    if not kinds or current in kinds:
        return
    if prefix == "model.backbone.":
        who = f"the {' and '.join(kinds)} backbone{'s read' if len(kinds) > 1 else ' reads'} it"
        fix = f"set {switch}={kinds[0]} or leave it out"
    else:
        noun = "encoder" if prefix == "model.encoder." else "model"
        who, fix = f"{' and '.join(kinds)} read it", f"leave it out, or choose a preset with a {'/'.join(kinds)} {noun}"
    raise SparsedetError(f"{key} has no effect with {switch}={current!r}: only {who}; {fix}")


# Range checks: (field, test, what it must be). Every entry point (CLI overrides, the API,
# engine.build.build_trainer given a Config) runs them through ``validate``.
_RULES = [
    ("train.lr", lambda v: v > 0, "a positive number, e.g. 0.0002"),
    ("train.lr_backbone", lambda v: v >= 0, "0 (frozen backbone) or more, e.g. 2e-05"),
    ("train.lr_linear_proj_mult", lambda v: v >= 0, "0 or more, e.g. 0.1"),
    ("train.weight_decay", lambda v: v >= 0, "0 or more, e.g. 0.0001"),
    ("train.batch_size", lambda v: v >= 1, "at least 1 (images per step and process), e.g. 2"),
    ("train.accumulate", lambda v: v >= 1, "at least 1 (micro-batches per step)"),
    ("train.max_steps", lambda v: v >= 0, "0 (use train.epochs) or more"),
    ("train.epochs", lambda v: v >= 0, "0 or more"),
    ("train.lr_drop", lambda v: 0 <= v <= 1, "a fraction of training in [0, 1], e.g. 0.8"),
    ("train.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1], e.g. 0.01"),
    ("train.warmup_steps", lambda v: v >= 0, "0 or more"),
    ("train.clip_grad", lambda v: v >= 0, "0 (no clipping) or more, e.g. 0.1"),
    ("train.ema_decay", lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.9997"),
    ("train.minutes", lambda v: v >= 0, "0 (no budget) or more"),
    ("train.eval_every", lambda v: v >= -1, "steps, 0 (once per epoch) or -1 (at the end only)"),
    ("train.checkpoint_every", lambda v: v >= 0, "steps, or 0 (at every evaluation)"),
    ("train.keep_checkpoints", lambda v: v >= 1, "at least 1"),
    ("train.log_every", lambda v: v >= 1, "at least 1 (steps)"),
    ("train.max_nonfinite", lambda v: v >= 1, "at least 1"),
    ("train.threads", lambda v: v >= 0, "0 (torch's default) or more"),
    ("train.precision", lambda v: v in TRAIN_PRECISIONS, ", ".join(PRECISIONS) + " or auto"),
    ("train.schedule", lambda v: v in ("step", "cosine"), "step or cosine"),
    ("data.num_workers", lambda v: v >= 0, "0 (load in the main process) or more"),
    ("data.size_divisor", lambda v: v >= 1, "at least 1"),
    ("data.max_size", lambda v: v >= 1, "at least 1 (pixels)"),
    ("model.top_k", lambda v: v >= 1, "at least 1 (detections per image)"),
    ("model.score_threshold", lambda v: v is None or (not isinstance(v, bool) and 0 <= v <= 1),
     "a score in [0, 1], or null (not recorded)"),
    ("model.eval_size", lambda v: v >= 1, "at least 1 (pixels)"),
    ("model.eval_max_size", lambda v: v >= 1, "at least 1 (pixels)"),
    ("model.loss.cls_loss", lambda v: v in CLS_LOSSES, f"{', '.join(CLS_LOSSES[:-1])} or {CLS_LOSSES[-1]}"),
]


def validate(config: Config) -> Config:
    """Refuse values out of range with a SparsedetError naming the key and what it must be (NaN
    fails every numeric test). Returns ``config``."""
    for key, test, must in _RULES:
        value = config
        for name in key.split("."):
            value = getattr(value, name)
        try:
            ok = bool(test(value))
        except TypeError:
            ok = False
        if not ok:
            raise SparsedetError(f"{key}={value!r} is out of range: it must be {must}")
    t = config.train
    if t.max_steps == 0 and t.epochs == 0:
        raise SparsedetError("train.max_steps and train.epochs are both 0: nothing to train; set "
                             "train.max_steps=N or train.epochs=N")
    return config


def _coerce(current: Any, value: Any, key: str) -> Any:
    if current is None or value is None or isinstance(current, (list, dict)):
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise SparsedetError(f"{key} expects true or false, got {value!r}")
        return value
    if isinstance(current, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SparsedetError(f"{key} expects a number, got {value!r}")
        if isinstance(current, int) and not float(value).is_integer():
            raise SparsedetError(f"{key} expects a whole number, got {value!r}")
        return type(current)(value)
    if isinstance(current, str) and not isinstance(value, str):
        return str(value)
    return value
