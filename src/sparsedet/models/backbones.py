"""The backbone ``model.backbone`` describes: its ``kind`` maps to a builder (ResNet, the default,
or Swin; ``register_backbone`` adds one, with the fields only it reads and its check). Every
backbone returns maps fine to coarse and says their channels and strides."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import Tensor, nn

from ..config import BackboneConfig
from ..errors import SparsedetError
from ..stage_kinds import BACKBONES, BackboneKind, register_backbone  # noqa: F401 (re-exported)
from ..nn.backbone import ResNet
from ..nn.swin import SwinTransformer


class Backbone(Protocol):
    """images [B, 3, H, W] (normalised, padding zeroed) -> one [B, C_i, ceil(H/s_i), ceil(W/s_i)]
    map per returned stage, with ``out_channels`` C_i and ``out_strides`` s_i. ``padding`` [B, H, W]
    (True on padding), where given, keeps the padded cells from reaching the image's (ResNet)."""

    out_channels: list[int]
    out_strides: list[int]

    def __call__(self, x: Tensor, padding: Tensor | None = None) -> list[Tensor]: ...

    def load_weights(self, path: str | Path) -> None: ...


@register_backbone("resnet", config_fields=("depth", "width", "norm", "dilation"))
def resnet(b: BackboneConfig) -> nn.Module:
    return ResNet(b.depth, b.width, b.return_layers, b.frozen_stages, b.norm, b.dilation)


def check_swin(b: BackboneConfig) -> None:
    if b.window_size < 1 or not 0.0 <= b.drop_path < 1.0:
        raise SparsedetError(f"model.backbone.window_size={b.window_size} and drop_path={b.drop_path}: the window "
                             "must be at least 1 token (7 or 12 for ImageNet weights), drop_path in [0, 1)")
    if b.embed_dim < 0:
        raise SparsedetError(f"model.backbone.embed_dim={b.embed_dim}: 0 (the variant's) or a positive width")


@register_backbone("swin", config_fields=("variant", "embed_dim", "window_size", "drop_path", "output_norms"),
                   check=check_swin)
def swin(b: BackboneConfig) -> nn.Module:
    return SwinTransformer(b.variant, b.embed_dim or None, b.window_size, b.drop_path, b.return_layers,
                           b.frozen_stages, b.output_norms)


def build_backbone(b: BackboneConfig) -> nn.Module:
    """The backbone for ``b`` (random weights; ``load_weights`` reads ImageNet files)."""
    kind = BACKBONES.find(b.kind)
    if not b.return_layers or any(i not in (1, 2, 3, 4) for i in b.return_layers):
        raise SparsedetError(f"model.backbone.return_layers={b.return_layers}: stages 1..4 (strides 4..32), "
                             "e.g. [2, 3, 4]")
    kind.check(b)
    return kind.build(b)
