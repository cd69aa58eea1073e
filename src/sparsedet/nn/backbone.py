"""ResNet-18/34/50/101 in plain PyTorch with torchvision-compatible parameter names.

Batch norm is frozen (``FrozenBatchNorm2d``: statistics and affine parameters are
buffers), as in every DETR recipe. ``width`` scales the channel counts for tiny
CPU models; at the standard width 64 a torchvision ImageNet file loads as is. ``dilation``
builds DC5: layer4 keeps stride 16 with dilated convolutions, torchvision's
``replace_stride_with_dilation=[False, False, True]`` (same parameters, so the same files load).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SparsedetError
from ..ops.padding import padding_zeroer
from .resnet_weights import read_resnet_weights

BLOCKS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]),
          50: ("bottleneck", [3, 4, 6, 3]), 101: ("bottleneck", [3, 4, 23, 3])}


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (all buffers)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # present in torchvision files
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """The affine map this norm applies per channel: x * scale + shift."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_shift()
        return torch.addcmul(shift.view(1, -1, 1, 1).to(x.dtype), x, scale.view(1, -1, 1, 1).to(x.dtype))


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``. A frozen norm is folded into the convolution's weights instead of making
    another pass over its output: an fp32 R50 at 800x1333 takes 0.91 s instead of 1.24 s on a
    2-core CPU (bf16: 0.36 instead of 0.53 s). Trainable batch norm runs as is."""
    if not isinstance(norm, FrozenBatchNorm2d):
        return norm(conv(x))
    scale, shift = norm.scale_shift()
    weight = conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)
    return F.conv2d(x, weight, shift.to(conv.weight.dtype), conv.stride, conv.padding, conv.dilation, conv.groups)


NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


def _same(x: Tensor) -> Tensor:
    return x


def _conv(cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, norm, dilation: int = 1):
        super().__init__()
        if dilation != 1:  # as torchvision: DC5 is defined for the bottleneck ResNets only
            raise SparsedetError("a dilated (DC5) stage needs bottleneck blocks: ResNet-50 or -101, not -18/-34")
        self.conv1, self.bn1 = _conv(cin, planes, 3, stride), norm(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3), norm(planes)
        self.downsample = _downsample(cin, planes, stride, norm)

    def forward(self, x: Tensor, zero_out: Callable[[Tensor], Tensor] = _same) -> Tensor:
        """x: padding zeroed; zero_out zeroes padding at the output's stride (``ops.padding``)."""
        out = F.relu(conv_norm(self.conv1, self.bn1, x))
        out = conv_norm(self.conv2, self.bn2, zero_out(out))
        return F.relu(out + _shortcut(self.downsample, x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, norm, dilation: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, planes, 1), norm(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3, stride, dilation), norm(planes)
        self.conv3, self.bn3 = _conv(planes, planes * 4, 1), norm(planes * 4)
        self.downsample = _downsample(cin, planes * 4, stride, norm)

    def forward(self, x: Tensor, zero_in: Callable[[Tensor], Tensor] = _same) -> Tensor:
        """x: padding zeroed; zero_in zeroes padding at the input's stride (``ops.padding``)."""
        out = F.relu(conv_norm(self.conv1, self.bn1, x))
        out = F.relu(conv_norm(self.conv2, self.bn2, zero_in(out)))
        out = conv_norm(self.conv3, self.bn3, out)
        return F.relu(out + _shortcut(self.downsample, x))


def _shortcut(downsample: nn.Sequential | None, x: Tensor) -> Tensor:
    return x if downsample is None else conv_norm(downsample[0], downsample[1], x)


def _downsample(cin: int, cout: int, stride: int, norm) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), norm(cout))


class ResNet(nn.Module):
    """ResNet body returning the outputs of ``return_layers`` (1..4 = strides 4, 8, 16, 32).

    Args:
        depth: 18, 34, 50 or 101.
        width: channels of the stem (64 is the standard network).
        return_layers: which stages to return, e.g. (2, 3, 4) for C3-C5.
        frozen_stages: stem and stages up to this index get no gradient (1 = stem + layer1,
            the DETR default; -1 trains everything).
        norm: ``frozen_bn`` for pretrained weights, ``bn`` (trainable) when training from scratch.
        dilation: DC5, layer4 at stride 16: its first block keeps stride 1 (3x3 and shortcut) with
            dilation 1, the later blocks' 3x3 convolutions dilate by 2 (torchvision's and timm's
            ``replace_stride_with_dilation`` / ``output_stride=16``). Bottleneck depths only.
    """

    def __init__(self, depth: int = 50, width: int = 64, return_layers=(2, 3, 4), frozen_stages: int = 1,
                 norm: str = "frozen_bn", dilation: bool = False):
        super().__init__()
        if depth not in BLOCKS:
            raise SparsedetError(f"unknown ResNet depth {depth}; choose one of {sorted(BLOCKS)}")
        if norm not in NORMS:
            raise SparsedetError(f"unknown backbone norm {norm!r}; choose one of {sorted(NORMS)}")
        self.depth, self.width = depth, width
        kind, counts = BLOCKS[depth]
        make_norm = NORMS[norm]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(width)
        cin = width
        if dilation and max(return_layers) < 4:
            raise SparsedetError(f"dilation (DC5) changes layer4, which return_layers {list(return_layers)} "
                                 "does not build; return layer 4 or drop the dilation")
        self.channels, strides, self.block_strides = [], [], []
        stride = 4  # after the stem
        # Stages after the last returned one are not built (a stride-16 model has no layer4).
        for i, n in enumerate(counts[:max(return_layers)]):
            planes = width * 2 ** i
            dilate = dilation and i == 3
            step = 1 if i == 0 or dilate else 2
            blocks = []
            for j in range(n):
                # A dilated stage's first block still sees the undilated input grid: dilation 1 there.
                blocks.append(block(cin, planes, step if j == 0 else 1, make_norm, 2 if dilate and j > 0 else 1))
                cin = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.channels.append(cin)
            self.block_strides += [(stride, stride * step)] + [(stride * step,) * 2] * (n - 1)
            stride *= step
            strides.append(stride)
        self.return_layers = tuple(return_layers)
        self.out_channels = [self.channels[i - 1] for i in self.return_layers]
        self.out_strides = [strides[i - 1] for i in self.return_layers]
        for name, p in self.named_parameters():
            stage = 0 if not name.startswith("layer") else int(name[5])
            if stage <= frozen_stages:
                p.requires_grad_(False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor, padding: Tensor | None = None) -> list[Tensor]:
        """x: [B, 3, H, W] (padding zeroed) -> the returned stages' maps. padding: [B, H, W] (True on
        padding) to zero the padded cells before every spatial convolution, so that each image's
        maps are those it has alone (``ops.padding``); None computes as the official code."""
        zero = padding_zeroer(padding)
        x = F.relu(conv_norm(self.conv1, self.bn1, x))
        x = F.max_pool2d(zero(x, 2), 3, stride=2, padding=1)  # after ReLU, a zero never wins the max
        outs, blocks = [], iter(self.block_strides)
        for i in range(1, len(self.channels) + 1):
            for block in getattr(self, f"layer{i}"):
                stride_in, stride_out = next(blocks)
                x = zero(x, stride_in)
                side = partial(zero, stride=stride_out if isinstance(block, BasicBlock) else stride_in)
                x = block(x, side)
            if i in self.return_layers:
                outs.append(zero(x, stride_out))
        return outs

    def load_weights(self, path: str | Path) -> None:
        """Load ImageNet weights: a torchvision state dict (``.pth``/``.safetensors``) or a detectron2
        ``.pkl`` of torchvision weights (see ``resnet_weights``); ``fc.*`` is ignored."""
        state = read_resnet_weights(path)
        unbuilt = tuple(f"layer{i}." for i in range(len(self.channels) + 1, 5))
        state = {k: v for k, v in state.items() if not k.startswith(("fc.",) + unbuilt)}
        ours = self.state_dict()
        missing = [k for k in ours if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in ours and not k.endswith("num_batches_tracked")]
        misshapen = [f"{k} {tuple(v.shape)} (expected {tuple(ours[k].shape)})" for k, v in state.items()
                     if k in ours and v.shape != ours[k].shape]
        if missing or unexpected or misshapen:
            raise SparsedetError(
                f"backbone weights {path} do not fit ResNet-{self.depth} of width {self.width} (missing: "
                f"{missing[:5]}, unexpected: {unexpected[:5]}, misshapen: {misshapen[:3]}); "
                "expected ImageNet ResNet weights of the same depth and width")
        self.load_state_dict(state, strict=False)
