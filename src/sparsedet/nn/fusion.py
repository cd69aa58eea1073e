"""Cross-level token fusion (Salience DETR's ``RepVGGPluXNetwork``, specs/encoders.md §4.4): a
path-aggregation network over the encoder memory's levels, built from re-parameterisable
group-conv blocks with a global-context gate. Child names follow the official module so a
checkpoint's ``transformer.neck.*`` keys load one to one. Only the training form (3x3 and 1x1
branches kept apart) is implemented.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_norm(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm [-> SiLU]; children 0, 1 like torchvision's Conv2dNormActivation."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class ContextGate(nn.Module):
    """Channel gate from an attention-pooled global context (GCNet style): softmax over positions
    of a 1-channel map weighs the features into one vector, a bottleneck MLP turns it into
    per-channel sigmoid gates."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.conv_mask = nn.Conv2d(channels, 1, 1)
        self.se_module = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1, bias=False), nn.ReLU(inplace=True),
                                       nn.Conv2d(channels // reduction, channels, 1, bias=False), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        attn = self.conv_mask(x).view(B, 1, H * W).softmax(-1)
        context = torch.einsum("bcn,bn->bc", x.reshape(B, C, H * W), attn[:, 0]).view(B, C, 1, 1)
        return self.se_module(context) * x


class RepBlock(nn.Module):
    """SiLU(3x3 group conv + 1x1 group conv), gated, plus the input."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv1 = conv_norm(channels, channels, 3, groups=groups, act=False)
        self.conv2 = conv_norm(channels, channels, 1, groups=groups, act=False)
        self.se_module = ContextGate(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.se_module(F.silu(self.conv1(x) + self.conv2(x))) + x


class CSPBlock(nn.Module):
    """Cross-stage partial block: RepBlocks on one 1x1 projection, added to a second one."""

    def __init__(self, cin: int, cout: int, groups: int, num_blocks: int = 3):
        super().__init__()
        self.conv1 = conv_norm(cin, cout, 1)
        self.conv2 = conv_norm(cin, cout, 1)
        self.bottlenecks = nn.Sequential(*[RepBlock(cout, groups) for _ in range(num_blocks)])

    def forward(self, x: Tensor) -> Tensor:
        return self.bottlenecks(self.conv1(x)) + self.conv2(x)


class CrossLevelFusion(nn.Module):
    """Top-down (coarse to fine: lateral 1x1, nearest upsample, concat, CSP block) then bottom-up
    (3x3 stride-2 conv, concat, CSP block). maps: fine to coarse [B, dim, H_l, W_l] -> same shapes."""

    def __init__(self, dim: int, num_levels: int = 4, groups: int = 4):
        super().__init__()
        n = num_levels - 1
        self.lateral_convs = nn.ModuleList(conv_norm(dim, dim, 1) for _ in range(n))
        self.layer_blocks = nn.ModuleList(CSPBlock(2 * dim, dim, groups) for _ in range(n))
        self.downsample_blocks = nn.ModuleList(conv_norm(dim, dim, 3, stride=2) for _ in range(n))
        self.pan_blocks = nn.ModuleList(CSPBlock(2 * dim, dim, groups) for _ in range(n))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        # Top-down: each coarser result is first replaced by its lateral projection.
        inner = [maps[-1]]
        for lvl in range(len(maps) - 1, 0, -1):
            high = self.lateral_convs[lvl - 1](inner[0])
            inner[0] = high
            up = F.interpolate(high, size=maps[lvl - 1].shape[-2:], mode="nearest")
            inner.insert(0, self.layer_blocks[lvl - 1](torch.cat([up, maps[lvl - 1]], 1)))
        # Bottom-up.
        outs = [inner[0]]
        for lvl in range(len(inner) - 1):
            down = self.downsample_blocks[lvl](outs[-1])
            outs.append(self.pan_blocks[lvl](torch.cat([down, inner[lvl + 1]], 1)))
        return outs
