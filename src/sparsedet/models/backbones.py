"""The backbone ``model.backbone`` describes: its ``kind`` maps to a builder (ResNet, the default,
or Swin). Every backbone returns maps fine to coarse and says their channels and strides."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from torch import Tensor, nn

from ..config import BackboneConfig
from ..errors import SparsedetError
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


def _resnet(b: BackboneConfig) -> nn.Module:
    return ResNet(b.depth, b.width, b.return_layers, b.frozen_stages, b.norm, b.dilation)


def _swin(b: BackboneConfig) -> nn.Module:
    if b.window_size < 1 or not 0.0 <= b.drop_path < 1.0:
        raise SparsedetError(f"model.backbone.window_size={b.window_size} and drop_path={b.drop_path}: the window "
                             "must be at least 1 token (7 or 12 for ImageNet weights), drop_path in [0, 1)")
    if b.embed_dim < 0:
        raise SparsedetError(f"model.backbone.embed_dim={b.embed_dim}: 0 (the variant's) or a positive width")
    return SwinTransformer(b.variant, b.embed_dim or None, b.window_size, b.drop_path, b.return_layers,
                           b.frozen_stages, b.output_norms)


BACKBONES: dict[str, Callable[[BackboneConfig], nn.Module]] = {"resnet": _resnet, "swin": _swin}


def build_backbone(b: BackboneConfig) -> nn.Module:
    """The backbone for ``b`` (random weights; ``load_weights`` reads ImageNet files)."""
    if b.kind not in BACKBONES:
        raise SparsedetError(f"unknown model.backbone.kind {b.kind!r}; choose one of {sorted(BACKBONES)}")
    if not b.return_layers or any(i not in (1, 2, 3, 4) for i in b.return_layers):
        raise SparsedetError(f"model.backbone.return_layers={b.return_layers}: stages 1..4 (strides 4..32), "
                             "e.g. [2, 3, 4]")
    return BACKBONES[b.kind](b)
