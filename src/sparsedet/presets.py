"""Named presets: one small function per method and size, each returning a ``Config``.

The R50 presets follow the official code's hyper-parameters (repositories in docs/methods.md), the Swin ones
the official Swin configs (docs/backbones.md). The tiny
presets are for CPU demos and tests: a narrow ResNet-18 trained from scratch, hidden 128,
3 + 3 layers, 100 queries, images around 256 px.
"""
from __future__ import annotations

from collections.abc import Callable

from .config import BackboneConfig, Config, DataConfig, EncoderConfig, LossConfig, ModelConfig, TrainConfig
from .errors import SparsedetError, close_names
from .plugins import not_found_hint


def _imagenet(**fields) -> BackboneConfig:
    """The R50 presets' backbone: torchvision's ImageNet ResNet-50, downloaded once when training
    starts (``model.backbone.weights=PATH`` for a local file, ``=null`` for none)."""
    return BackboneConfig(weights="imagenet", **fields)


def deformable_detr_r50() -> Config:
    """Deformable DETR, single stage, 300 learned queries (44.5 AP in the paper, 50 epochs)."""
    return Config(model=ModelConfig(kind="deformable", backbone=_imagenet()), train=TrainConfig(epochs=50, lr_drop=0.8))


def deformable_detr_r50_two_stage() -> Config:
    """Deformable DETR with iterative box refinement and two-stage proposals (46.9 AP)."""
    cfg = deformable_detr_r50()
    cfg.model.two_stage = cfg.model.box_refine = True
    return cfg


def dino_r50() -> Config:
    """DINO 4-scale: 900 queries, contrastive denoising, mixed query selection,
    look-forward-twice (49.0 AP at 12 epochs)."""
    model = ModelConfig(
        kind="dino", backbone=_imagenet(), ffn_dim=2048, dropout=0.0, num_queries=900, two_stage=True, box_refine=True,
        pos_temperature=20.0, pos_offset=0.0, sigmoid_eps=1e-3, dn_queries=100, top_k=300,
        loss=LossConfig(cls_weight=1.0))
    train = TrainConfig(lr=1e-4, lr_backbone=1e-5, lr_linear_proj_mult=1.0, epochs=12, lr_drop=11 / 12)
    return Config(model=model, train=train)


def sparse_detr_r50() -> Config:
    """Sparse DETR on two-stage Deformable DETR with box refinement, Efficient-DETR query
    initialisation and encoder auxiliary heads; rho = 0.1 (45.3 AP, 105 GFLOPs at 50 epochs).
    Released checkpoints exist for rho 0.1 to 0.5: set ``encoder.keep_ratio``."""
    cfg = deformable_detr_r50_two_stage()
    cfg.model.efficient_queries = True
    cfg.model.encoder = EncoderConfig(kind="sparse", keep_ratio=0.1, aux_heads=True)
    cfg.model.loss.select_weight = 1.0
    return cfg


def focus_detr_r50() -> Config:
    """Focus-DETR on DINO (12-epoch R50 config: 48.8 AP): foreground selector with base keep
    ratio 0.5 and cascade (1, .8, .6, .6, .4, .2), dual attention over 300 object tokens.
    80 classes in the official detectron2 order."""
    cfg = dino_r50()
    m = cfg.model
    m.num_classes, m.pos_temperature, m.pos_offset, m.share_heads, m.dn_spare_label = 80, 10000.0, -0.5, False, False
    m.encoder = EncoderConfig(kind="focus", keep_ratio=0.5, object_tokens=300)
    m.loss.select_weight = 1.5
    return cfg


def salience_detr_r50() -> Config:
    """Salience DETR (R50, 12 epochs: 50.0 AP released checkpoint): per-level quotas
    (.4, .8, 1, 1) then the cascade, background embedding, cross-level fusion, proposal NMS at
    IoU 0.3, varifocal classification loss."""
    cfg = dino_r50()
    m = cfg.model
    m.pos_temperature, m.pos_offset, m.proposal_nms, m.share_heads, m.dn_spare_label = 10000.0, -0.5, 0.3, False, False
    m.encoder = EncoderConfig(kind="salience", level_ratios=[0.4, 0.8, 1.0, 1.0], object_tokens=300)
    m.loss.cls_loss, m.loss.select_weight = "varifocal", 2.0
    cfg.train.lr_drop = 10 / 12
    return cfg


def conditional_detr_r50() -> Config:
    """Conditional DETR R50 (C5, 300 queries, 50 epochs: 41.0 AP): global-attention encoder,
    conditional cross-attention with fixed 2-D reference points."""
    model = ModelConfig(
        kind="conditional", backbone=_imagenet(return_layers=[4]), num_levels=1,
        encoder=EncoderConfig(kind="global"), input_norm=False, ffn_dim=2048, pos_offset=0.0)
    train = TrainConfig(lr=1e-4, lr_backbone=1e-5, lr_linear_proj_mult=1.0, epochs=50, lr_drop=0.8)
    return Config(model=model, train=train)


def sam_detr_r50() -> Config:
    """SAM-DETR R50 (C5, 50 epochs: 39.8 AP): learned reference boxes, Semantics Aligner.
    The 12-epoch checkpoints add GroupNorm to the input projection (``input_norm=true``)."""
    cfg = conditional_detr_r50()
    cfg.model.kind, cfg.model.pos_offset = "sam", -0.5
    return cfg


def sam_detr_smca_r50() -> Config:
    """SAM-DETR with SMCA's spatial prior (50 epochs: 41.8 AP)."""
    cfg = sam_detr_r50()
    cfg.model.decoder.smca = True
    return cfg


def _dc5(cfg: Config) -> Config:
    """The DC5 variant of a C5 preset: layer4 dilated (stride 16, 4x the encoder tokens). The
    official DC5 runs train 1 image per GPU (8 GPUs) and were evaluated at batch size 1."""
    cfg.model.backbone.dilation = True
    cfg.train.batch_size = 1
    return cfg


def conditional_detr_dc5_r50() -> Config:
    """Conditional DETR DC5-R50 (50 epochs: 43.7 AP, 195 GFLOPs)."""
    return _dc5(conditional_detr_r50())


def sam_detr_dc5_r50() -> Config:
    """SAM-DETR R50-DC5 (50 epochs: 43.3 AP; 12 epochs: 38.3)."""
    return _dc5(sam_detr_r50())


def sam_detr_smca_dc5_r50() -> Config:
    """SAM-DETR R50-DC5 with SMCA (50 epochs: 45.0 AP; 12 epochs: 40.6)."""
    return _dc5(sam_detr_smca_r50())


def decoupled_detr_r50() -> Config:
    """SD-DETR / Decoupled DETR on Conditional DETR (our reconstruction, no official code):
    mini-detector anchors, task-aware queries, split cross-attention, alignment loss."""
    cfg = conditional_detr_r50()
    cfg.model.kind = "decoupled"
    cfg.model.loss.cls_loss = "aligned"
    return cfg


def _swin(variant: str, window: int, drop_path: float, frozen_stages: int, weights: str = "imagenet",
          output_norms: bool = True) -> BackboneConfig:
    """A Swin backbone returning stages 2-4 (strides 8/16/32; the neck adds the fourth level) with
    the official ImageNet file by name, downloaded once when training starts."""
    return BackboneConfig(kind="swin", variant=variant, window_size=window, drop_path=drop_path,
                          frozen_stages=frozen_stages, weights=weights, output_norms=output_norms)


def deformable_detr_swin_t() -> Config:
    """Deformable DETR on Swin-T as Sparse DETR trained it (45.7 AP, 40.3M, 180.4 GFLOPs at 50
    epochs): ImageNet-1k window 7, stochastic depth 0.2, patch embedding and stage 1 frozen."""
    cfg = deformable_detr_r50()
    cfg.model.backbone = _swin("T", 7, 0.2, frozen_stages=1)
    return cfg


def sparse_detr_swin_t() -> Config:
    """Sparse DETR on Swin-T, rho = 0.1 (48.2 AP, 41.4M, 113.4 GFLOPs at 50 epochs); the backbone
    as in ``deformable_detr_swin_t``."""
    cfg = sparse_detr_r50()
    cfg.model.backbone = _swin("T", 7, 0.2, frozen_stages=1)
    return cfg


def focus_detr_swin_t() -> Config:
    """Focus-DETR on Swin-T (ImageNet-1k, window 7, stochastic depth 0.1, nothing frozen; 50.0 AP
    at 12 epochs)."""
    cfg = focus_detr_r50()
    cfg.model.backbone = _swin("T", 7, 0.1, frozen_stages=-1)
    return cfg


def focus_detr_swin_b() -> Config:
    """Focus-DETR on Swin-B 384 (ImageNet-22k, window 12, stochastic depth 0.2, nothing frozen;
    56.2 AP at 36 epochs, lr drop after 30)."""
    cfg = focus_detr_r50()
    cfg.model.backbone = _swin("B", 12, 0.2, frozen_stages=-1, weights="imagenet-22k")
    cfg.train.epochs, cfg.train.lr_drop = 36, 30 / 36
    return cfg


def salience_detr_swin_l() -> Config:
    """Salience DETR on Swin-L (ImageNet-22k 224-px file, window 7, stochastic depth 0.2, patch
    embedding and stage 1 frozen, no norms on the returned stages: its torchvision-style Swin has
    none; 56.5 AP at 12 epochs)."""
    cfg = salience_detr_r50()
    cfg.model.backbone = _swin("L", 7, 0.2, frozen_stages=1, weights="imagenet-22k", output_norms=False)
    return cfg


def dino_swin_t() -> Config:
    """DINO 4-scale on Swin-T (ImageNet-1k, window 7, the official code's stochastic depth 0.2,
    nothing frozen)."""
    cfg = dino_r50()
    cfg.model.backbone = _swin("T", 7, 0.2, frozen_stages=-1)
    return cfg


def dino_swin_l() -> Config:
    """DINO 4-scale on Swin-L 384 (ImageNet-22k, window 12, stochastic depth 0.2, nothing frozen;
    56.8 AP at 12 epochs)."""
    cfg = dino_r50()
    cfg.model.backbone = _swin("L", 12, 0.2, frozen_stages=-1, weights="imagenet-22k")
    return cfg


def _tiny(cfg: Config) -> Config:
    m = cfg.model
    m.backbone = BackboneConfig(depth=18, width=32, norm="bn", frozen_stages=-1)
    m.hidden_dim, m.ffn_dim, m.num_heads = 128, 512, 8
    m.num_encoder_layers = m.num_decoder_layers = 3
    m.num_queries, m.top_k, m.dropout = 100, 100, 0.0
    if m.dn_queries:
        m.dn_queries = 30
    # Three encoder layers: a three-step cascade with the official mean keep ratio's shape;
    # 64 object tokens of the ~700 a 256 px image keeps (official: 300 of ~10,000).
    m.encoder.layer_ratios, m.encoder.object_tokens = [1.0, 0.6, 0.2], 64
    # Mild scale jitter, no crop: few distinct shapes keep CPU kernels warm (2x faster steps).
    cfg.data = DataConfig(train_scales=[224, 240, 256], max_size=320, crop=False, size_divisor=32)
    m.eval_size, m.eval_max_size = 256, 384
    t = cfg.train
    # Batch 2 beat 1, 4 and 8 at a fixed 3-minute CPU budget (more updates per second).
    t.lr, t.lr_backbone, t.batch_size, t.clip_grad = 4e-4, 4e-4, 2, 0.1
    t.warmup_steps, t.log_every, t.precision = 50, 20, "auto"
    if m.num_levels == 1:
        # One stride-16 level (the DC5 resolution): C5 of a 256 px image is only 8 x 8.
        m.backbone.return_layers = [3]
        # The official 1e-4: in an earlier trial at 4e-4, SAM-DETR's and SD-DETR's encoder memory
        # collapsed to a constant (their queries are read from it); benchmarks/decoders.py --lr --probe-every.
        t.lr = t.lr_backbone = 1e-4
    return cfg


def dino_tiny() -> Config:
    """CPU-sized DINO (from scratch): the demo's default."""
    return _tiny(dino_r50())


def deformable_detr_tiny() -> Config:
    """CPU-sized two-stage Deformable DETR with box refinement (from scratch)."""
    return _tiny(deformable_detr_r50_two_stage())


def sparse_detr_tiny() -> Config:
    """CPU-sized Sparse DETR (rho = 0.2)."""
    cfg = _tiny(sparse_detr_r50())
    cfg.model.encoder.keep_ratio = 0.2
    return cfg


def focus_detr_tiny() -> Config:
    """CPU-sized Focus-DETR."""
    return _tiny(focus_detr_r50())


def salience_detr_tiny() -> Config:
    """CPU-sized Salience DETR."""
    return _tiny(salience_detr_r50())


def conditional_detr_tiny() -> Config:
    """CPU-sized Conditional DETR."""
    return _tiny(conditional_detr_r50())


def sam_detr_tiny() -> Config:
    """CPU-sized SAM-DETR."""
    return _tiny(sam_detr_r50())


def sam_detr_smca_tiny() -> Config:
    """CPU-sized SAM-DETR with SMCA."""
    return _tiny(sam_detr_smca_r50())


def decoupled_detr_tiny() -> Config:
    """CPU-sized SD-DETR."""
    return _tiny(decoupled_detr_r50())


PRESETS: dict[str, Callable[[], Config]] = {f.__name__: f for f in (
    deformable_detr_r50, deformable_detr_r50_two_stage, dino_r50, sparse_detr_r50, focus_detr_r50, salience_detr_r50,
    conditional_detr_r50, sam_detr_r50, sam_detr_smca_r50, decoupled_detr_r50,
    deformable_detr_swin_t, sparse_detr_swin_t, focus_detr_swin_t, focus_detr_swin_b, salience_detr_swin_l,
    dino_swin_t, dino_swin_l,
    conditional_detr_dc5_r50, sam_detr_dc5_r50, sam_detr_smca_dc5_r50,
    dino_tiny, deformable_detr_tiny, sparse_detr_tiny, focus_detr_tiny, salience_detr_tiny,
    conditional_detr_tiny, sam_detr_tiny, sam_detr_smca_tiny, decoupled_detr_tiny)}


def register_preset(function: Callable[[], Config]) -> Callable[[], Config]:
    """Decorator: the function's name becomes a preset (e.g. a new method's, next to its encoder)."""
    if function.__name__ in PRESETS and PRESETS[function.__name__] is not function:
        raise SparsedetError(f"preset {function.__name__!r} already exists")
    PRESETS[function.__name__] = function
    return function


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        plugins = not_found_hint()  # loads the installed plugins, which may register the preset
    if name not in PRESETS:
        close = close_names(name, PRESETS)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise SparsedetError(f"unknown preset {name!r}.{hint} Available: {', '.join(PRESETS)}{plugins}")
    config = PRESETS[name]()
    config.preset = name
    return config
