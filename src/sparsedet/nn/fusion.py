"""Cross-level token fusion of Salience DETR (Hou et al., CVPR 2024; docs/methods.md cites it).

The official module is ``RepVGGPluXNetwork`` (xiuqhou/Salience-DETR, ``models/necks/repnet.py``): a
path-aggregation network over the encoder memory's levels whose fusion layers are CSP stages of
RepVGG-style group-conv blocks with a global-context channel gate. Child names follow the official
module, so an official checkpoint's ``transformer.neck.*`` keys load one to one as ``encoder.fusion.*``
(tools/convert/official_salience_detr.py; tests/test_fixture_salience_detr.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Bias-free conv, BatchNorm and optionally SiLU, as children ``0``, ``1`` (``2``)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


def _zeroed(x: Tensor, keep: Tensor | None) -> Tensor:
    """x with the padded cells zeroed where ``keep`` is given, as a 3x3 convolution of an image
    alone reads its edge."""
    return x if keep is None else x * keep.to(x.dtype)


class _ContextGate(nn.Module):
    """GCNet-style gate: features pooled with a softmax over positions of a 1-channel logit map,
    a bottleneck MLP (reduction 16, no biases) gives one sigmoid per channel that scales the input."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.conv_mask = nn.Conv2d(channels, 1, 1)
        self.se_module = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1, bias=False), nn.Sigmoid())
        # Overwritten by CrossLevelFusion's init; kept so a seed draws the official random stream.
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """keep: [B, 1, H, W] 1 on content cells: the pooling's softmax runs over those only."""
        B, C, H, W = x.shape
        logits = self.conv_mask(x)
        if keep is not None:
            logits = logits.masked_fill(keep == 0, float("-inf"))
        weights = logits.view(B, H * W, 1).softmax(1)
        context = torch.bmm(x.reshape(B, C, H * W), weights.to(x.dtype)).view(B, C, 1, 1)
        return self.se_module(context) * x


class _RepBlock(nn.Module):
    """x + gate(SiLU(BN(3x3 group conv x) + BN(1x1 group conv x))). Only this two-branch training
    form exists (the official code has no deploy-time switch that merges the branches)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv1 = _conv_bn(channels, channels, 3, groups=groups, act=False)
        self.conv2 = _conv_bn(channels, channels, 1, groups=groups, act=False)
        self.se_module = _ContextGate(channels)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        y = _zeroed(x, keep)
        return self.se_module(F.silu(self.conv1(y) + self.conv2(y), inplace=True), keep) + x


class _CSPStage(nn.Module):
    """Cross-stage partial stage: rep blocks on one 1x1 projection plus a second 1x1 projection,
    then a 1x1 projection to ``cout`` when ``expansion`` changed the width (``conv3``)."""

    def __init__(self, cin: int, cout: int, groups: int, num_blocks: int, expansion: float):
        super().__init__()
        hidden = int(cout * expansion)
        self.conv1 = _conv_bn(cin, hidden, 1)
        self.conv2 = _conv_bn(cin, hidden, 1)
        self.bottlenecks = nn.Sequential(*(_RepBlock(hidden, groups) for _ in range(num_blocks)))
        self.conv3 = _conv_bn(hidden, cout, 1) if hidden != cout else nn.Identity()

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        y = self.conv1(x)
        for block in self.bottlenecks:
            y = block(y, keep)
        return self.conv3(y + self.conv2(x))


class CrossLevelFusion(nn.Module):
    """PAN over ``num_levels`` maps of width ``dim``, ordered fine to coarse.

    Top-down, from the coarsest level: the running feature goes through ``lateral_convs[l-1]``
    (1x1 ConvBNSiLU), is upsampled (nearest) to level ``l-1`` and concatenated before that level's
    map; ``layer_blocks[l-1]`` fuses the pair into the next running feature. Bottom-up: output 0 is
    the last top-down feature; output ``l`` is ``pan_blocks[l-1]`` of ``downsample_blocks[l-1]``
    (3x3 stride-2 ConvBNSiLU) of output ``l-1`` concatenated before the *lateral projection* of
    level ``l`` (official quirk: not the top-down block output; for the coarsest level it is the
    lateral projection of the input map). Sizes must satisfy ``H_l == ceil(H_{l-1} / 2)``.

    Init as the official module: Kaiming-uniform (a=1) for every conv weight, zero conv biases,
    PyTorch defaults for BatchNorm. Only the training (two-branch) form of the blocks exists.
    """

    def __init__(self, dim: int = 256, num_levels: int = 4, groups: int = 4, num_blocks: int = 3,
                 expansion: float = 1.0):
        super().__init__()
        self.lateral_convs, self.layer_blocks = nn.ModuleList(), nn.ModuleList()
        self.downsample_blocks, self.pan_blocks = nn.ModuleList(), nn.ModuleList()
        # Built in the official order so that a given seed draws the same numbers.
        for _ in range(num_levels - 1):
            self.lateral_convs.append(_conv_bn(dim, dim, 1))
            self.layer_blocks.append(_CSPStage(2 * dim, dim, groups, num_blocks, expansion))
        for _ in range(num_levels - 1):
            self.downsample_blocks.append(_conv_bn(dim, dim, 3, stride=2))
            self.pan_blocks.append(_CSPStage(2 * dim, dim, groups, num_blocks, expansion))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, maps: list[Tensor], keeps: list[Tensor] | None = None) -> list[Tensor]:
        """maps fine to coarse; keeps: per level [B, 1, h, w], 1 on each image's content cells, so
        that the 3x3 convolutions and the context gates never read a batch's padding (None: as
        the official code, over the padded maps)."""
        keeps = keeps or [None] * len(maps)
        if len(maps) != len(self.lateral_convs) + 1:
            raise ValueError(f"expected {len(self.lateral_convs) + 1} maps, got {len(maps)}")
        skips = list(maps)  # what the bottom-up path concatenates at each level
        running = maps[-1]
        for lvl in range(len(maps) - 1, 0, -1):
            running = self.lateral_convs[lvl - 1](running)
            skips[lvl] = running
            up = F.interpolate(running, size=maps[lvl - 1].shape[-2:], mode="nearest")
            running = self.layer_blocks[lvl - 1](torch.cat([up, maps[lvl - 1]], 1), keeps[lvl - 1])
        outs = [running]
        for lvl in range(1, len(maps)):
            down = self.downsample_blocks[lvl - 1](_zeroed(outs[-1], keeps[lvl - 1]))
            outs.append(self.pan_blocks[lvl - 1](torch.cat([down, skips[lvl]], 1), keeps[lvl]))
        return outs
