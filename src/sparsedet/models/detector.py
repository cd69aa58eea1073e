"""DetectionTransformer: backbone -> neck -> encoder -> queries -> decoder -> heads -> post-processing."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import Config, ModelConfig
from ..data.batch import Batch
from ..errors import SparsedetError
from ..nn.init import transformer_init
from ..nn.neck import MultiLevel, Neck
from ..stage_kinds import BASES, CAPABILITIES, DECODER_SAMPLING, ENCODERS, TOKEN_PROJECTION, encoder_class
from .backbones import build_backbone
from .bases import Base
from .denoising import ContrastiveDenoising
from .decoders import Decoder, build_decoder
from .encoders import Encoder, build_encoder
from .heads import DenoisingPredictions, PredictionHeads, Predictions, ProposalPredictions
from .postprocess import PostProcess
from .encoders.scoring import TokenSelection
from .projection import TokenProjection
from .queries import Queries


_LAYOUT_LOCK = threading.Lock()


def check_model_config(c: ModelConfig) -> None:
    """Clear errors for combinations the architecture cannot build, read from what each stage declares."""
    base = BASES.find(c.kind)
    if c.num_heads < 1 or c.hidden_dim % c.num_heads:  # every attention splits hidden_dim among the heads
        divisors = [n for n in range(1, min(c.hidden_dim, 32) + 1) if c.hidden_dim % n == 0]
        raise SparsedetError(f"model.hidden_dim={c.hidden_dim} does not split among model.num_heads={c.num_heads} "
                             f"heads; set model.num_heads so that it divides model.hidden_dim (e.g. one of "
                             f"{divisors}), or change model.hidden_dim")
    if c.classes and len(c.classes) != c.num_classes:
        raise SparsedetError(
            f"model has {c.num_classes} classes but {len(c.classes)} class names; make them agree")
    encoder = encoder_class(c.encoder.kind)
    if base.single_level and (c.num_levels != 1 or not encoder.single_level):
        one = " or ".join(repr(kind) for kind, cls in ENCODERS.items() if cls.single_level)
        raise SparsedetError(f"kind={c.kind!r} attends globally over one feature level: set num_levels=1 and "
                             f"encoder.kind={one} (as its presets do)")
    if encoder.single_level and not base.single_level:
        single = ", ".join(kind for kind, b in BASES.items() if b.single_level)
        raise SparsedetError(f"encoder.kind={c.encoder.kind!r} attends over one feature level: it is for the "
                             f"single-level kinds ({single})")
    _check_needs(c, base, encoder)
    base.check(c)


def _check_needs(c: ModelConfig, base: Base, encoder: type[Encoder]) -> None:
    """What the encoder needs, the base's queries or its decoder must provide."""
    missing = sorted(encoder.needs - base.capabilities(c))
    if not missing:
        return
    need = missing[0]
    if need in base.provides_with:
        fix = f"kind={c.kind!r} gives it with {base.provides_with[need]}: set {base.provides_with[need]}"
    else:
        givers = [kind for kind, b in BASES.items()
                  if need in b.provides | b.provides_with.keys() | b.decoder_class.provides]
        fix = f"kind={c.kind!r} does not give it: choose a model kind that does ({', '.join(givers) or 'none'})"
    raise SparsedetError(f"encoder.kind={c.encoder.kind!r} needs {CAPABILITIES.get(need, repr(need))}; {fix}")


def _check_holds(queries: nn.Module, projection: TokenProjection | None, kind: str) -> None:
    """A base that provides the token projection registers its layers in its queries (else they
    would neither train nor save)."""
    held = {id(m) for m in queries.modules()}
    if projection is not None and any(id(layer) not in held for layer in projection.layers().values()):
        raise SparsedetError(f"kind={kind!r} provides {TOKEN_PROJECTION}, but its queries do not hold the projection's "
                             "layers: register them in the query module, as ProposalQueries does")


@dataclass
class DetectorOutput:
    """Raw model output.

    logits: [B, Q, C] (sigmoid, no background column); boxes: [B, Q, 4] normalised cxcywh of the
    unpadded image; aux: earlier decoder layers' predictions; enc: the two-stage proposals'
    predictions or None; dn: the denoising queries' predictions (every layer) or None;
    selection: a sparse encoder's ``TokenSelection`` (per layer: kept token indices, scores and
    counts; per level via ``level_counts``), None for dense encoders; enc_aux: predictions on the
    sparse tokens of encoder layers (Sparse DETR); sampling: the deformable decoder's (locations
    [B, layers, Q, heads, levels, points, 2] as (x, y) in [0, 1] of the padded input, weights
    [B, layers, Q, heads, levels, points]) when recorded (Sparse DETR's training, figures), else None.
    """

    logits: Tensor
    boxes: Tensor
    aux: list[Predictions] = field(default_factory=list)
    enc: ProposalPredictions | None = None
    dn: DenoisingPredictions | None = None
    selection: TokenSelection | None = None
    enc_aux: list[Predictions] = field(default_factory=list)
    sampling: tuple[Tensor, Tensor] | None = field(default=None, repr=False)


class DetectionTransformer(nn.Module):
    """The chain backbone -> neck -> encoder -> queries -> decoder -> heads; the base detector
    (``stage_kinds.BASES``) builds the queries and names the decoder, the kind tables build the
    backbone, encoder and decoder. ``projection``: the two-stage ``TokenProjection`` that the
    queries and the encoder share, None where the base provides none."""

    encoder: Encoder
    queries: Queries
    decoder: Decoder

    def __init__(self, config: ModelConfig, run_config: Config | None = None):
        """``run_config``: the whole configuration the model belongs to (data and training too), which
        saving and export record; by default one holding ``config`` alone."""
        super().__init__()
        check_model_config(config)
        self.config = c = config
        self.run_config = run_config or Config(model=config)
        base = BASES[c.kind]
        self.refine_boxes = base.refine(c)
        self.backbone = build_backbone(c.backbone)  # weights: Detector.from_config
        self.neck = Neck(self.backbone.out_channels, c.hidden_dim, c.num_levels, c.pos_temperature, c.pos_offset,
                         norm=c.input_norm, level_embed=not base.single_level,
                         in_strides=self.backbone.out_strides, mask_padding=c.mask_padding)
        self.encoder = build_encoder(c)
        # One part, built here: the queries hold its layers (their keys: queries.*), the encoder may score with it.
        self.projection = (TokenProjection(c.hidden_dim, c.num_classes) if TOKEN_PROJECTION in base.capabilities(c)
                           else None)
        self.queries = base.queries(c, self.projection)
        _check_holds(self.queries, self.projection, c.kind)
        self.decoder = build_decoder(c, base.decoder)
        self.heads = PredictionHeads(c.hidden_dim, c.num_classes, c.num_decoder_layers, base.share_heads(c),
                                     initial_size_bias=base.size_bias(c))
        self.postprocess = PostProcess(c)
        self.denoising = (ContrastiveDenoising(c.num_classes, c.hidden_dim, c.dn_queries, c.dn_label_noise,
                                               c.dn_box_noise, c.sigmoid_eps, c.dn_spare_label)
                          if base.denoising else None)
        self.register_buffer("image_mean", torch.tensor(c.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(c.image_std).view(1, 3, 1, 1), persistent=False)
        transformer_init(self, [self.encoder, self.decoder, self.queries])
        self._channels_last = False  # the backbone's weight layout, see train()

    def train(self, mode: bool = True) -> "DetectionTransformer":
        """``nn.Module.train``. Eval mode also lays the backbone's weights out channels_last (faster
        convolutions: an R50 at 800x1333 on a 2-core CPU takes 0.9 instead of 1.2 s in fp32) and
        training mode lays them back, so training, saving and resuming see the layout they always
        had. The weights change once per mode change, never per prediction: predictions running in
        other threads see the same tensors throughout."""
        super().train(mode)
        with _LAYOUT_LOCK, torch.inference_mode(False):  # ordinary tensors, even if called under it
            if self._channels_last == mode:
                self.backbone.to(memory_format=torch.contiguous_format if mode else torch.channels_last)
                self._channels_last = not mode
        return self

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def features(self, batch: Batch) -> MultiLevel:
        """Normalise, backbone, neck: the encoder's input."""
        x = (batch.images - self.image_mean) / self.image_std
        x = x.masked_fill(batch.mask[:, None], 0.0)
        return self.neck(self.backbone(x, batch.mask if self.config.mask_padding else None), batch.mask)

    def forward(self, batch: Batch, targets: list[dict] | None = None, record_sampling: bool = False
                ) -> DetectorOutput:
        """batch: images [B, 3, H, W] in [0, 1] with padding mask; targets enable denoising in training;
        record_sampling: also return the deformable decoder's sampling (for figures)."""
        levels = self.features(batch)
        encoded = self.encoder(levels, self.projection)
        memory, selection = encoded.memory, encoded.selection
        init = self.queries(memory, levels)
        tgt, reference, attn_mask, dn = init.tgt, init.reference, None, None
        if self.denoising is not None and self.training and targets is not None:
            dn = self.denoising(targets, tgt.shape[1])
            if dn is not None:
                tgt = torch.cat([dn.tgt, tgt], 1)
                reference = torch.cat([dn.reference, reference], 1)
                attn_mask = dn.attn_mask
        box_heads = ([self.heads.box_head(i) for i in range(self.config.num_decoder_layers)] if self.refine_boxes
                     else None)
        # An encoder whose loss reads where the decoder looked (Sparse DETR) declares it needs that.
        wanted = record_sampling or (self.training and DECODER_SAMPLING in self.encoder.needs)
        record = wanted and DECODER_SAMPLING in self.decoder.provides
        decoded = self.decoder(tgt, reference, memory, levels, init.query_pos, attn_mask, box_heads,
                               record_sampling=record)
        logits, boxes = self.heads(decoded, self.config.sigmoid_eps)
        dn_out = None
        if dn is not None:
            D = dn.num_queries
            dn_out = DenoisingPredictions(logits[:, :, :D], boxes[:, :, :D], dn)
            logits, boxes = logits[:, :, D:], boxes[:, :, D:]
        aux = [Predictions(logits[i], boxes[i]) for i in range(len(logits) - 1)]
        return DetectorOutput(logits[-1], boxes[-1], aux, init.enc, dn_out, selection, encoded.aux, decoded.sampling)

    @torch.no_grad()
    def detect(self, batch: Batch, sizes: Tensor, threshold: float = 0.0, top_k: int | None = None) -> list[dict]:
        """Forward + post-processing. sizes: [B, 2] (height, width) to scale boxes to."""
        out = self(batch)
        return self.postprocess.detections(out.logits, out.boxes, sizes, top_k, threshold)
