"""Swin Transformer (Swin-T/S/B/L) backbone in plain PyTorch, with the parameter names of the
official release (microsoft/Swin-Transformer ImageNet files; the detection repositories' per-output
norms ``norm1..norm3``), so that an official ``.pth`` loads by name.

Tokens stay channels-last, ``[B, H, W, C]``, from the patch embedding to the returned maps. Any
image size works: the patch embedding pads to a multiple of the patch, each block pads its map to
a multiple of the window (bottom/right, after ``norm1``), patch merging pads odd sizes, as the
official detection code does. Stage ``i`` (1-based, like ResNet's ``layer{i}``) has stride
``2 ** (i + 1)``: stages 2-4 give strides 8/16/32.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SparsedetError

# Patch-embedding channels and blocks per stage of the official variants. Every variant has
# 32 channels per head, so a stage with C channels has C // 32 heads.
VARIANTS = {"T": (96, (2, 2, 6, 2)), "S": (96, (2, 2, 18, 2)), "B": (128, (2, 2, 18, 2)),
            "L": (192, (2, 2, 18, 2))}
HEAD_DIM = 32
# The official shifted-window mask: -100 (not -inf) between tokens of different regions.
MASKED = -100.0


def window_partition(x: Tensor, w: int) -> Tensor:
    """[B, H, W, C] (H, W multiples of ``w``) -> [B, nW, w*w, C], windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C).transpose(2, 3)
    return x.reshape(B, (H // w) * (W // w), w * w, C)


def window_merge(windows: Tensor, w: int, H: int, W: int) -> Tensor:
    """Inverse of ``window_partition``: [B, nW, w*w, C] -> [B, H, W, C]."""
    B, C = windows.shape[0], windows.shape[-1]
    x = windows.view(B, H // w, W // w, w, w, C).transpose(2, 3)
    return x.reshape(B, H, W, C)


def relative_position_index(w: int) -> Tensor:
    """[w*w, w*w] row of the bias table ((2w-1)^2 rows) for each query/key pair of a window:
    (dy + w - 1) * (2w - 1) + (dx + w - 1) with (dy, dx) = query - key."""
    ys, xs = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + w - 1
    dx = xs[:, None] - xs[None, :] + w - 1
    return dy * (2 * w - 1) + dx


def shift_mask(Hp: int, Wp: int, w: int, s: int, device: torch.device) -> Tensor:
    """[nW, w*w, w*w] additive mask (0 or -100) of the shifted windows of a padded Hp x Wp map:
    after rolling by -s, the last window row/column holds tokens from both edges of the map,
    which must not attend to each other. Regions per axis: [0, L-w), [L-w, L-s), [L-s, L)."""
    def region(length: int) -> Tensor:
        i = torch.arange(length, device=device)
        return (i >= length - w).long() + (i >= length - s).long()

    ids = (region(Hp)[:, None] * 3 + region(Wp)[None, :]).view(1, Hp, Wp, 1)
    ids = window_partition(ids, w)[0, :, :, 0]  # [nW, w*w]
    return (ids[:, :, None] != ids[:, None, :]).float() * MASKED


class DropPath(nn.Module):
    """Stochastic depth: in training, drop the residual branch of whole samples with probability
    ``p`` and scale the kept ones by 1 / (1 - p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned bias per relative position and head.

    The index into the bias table is derived, so it is not saved (official files carry it as
    ``relative_position_index``; loading ignores it)."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.window, self.num_heads = window, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> Tensor:
        """[heads, N, N] with N = window * window."""
        n = self.window * self.window
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: [B, nW, N, C]; mask: [nW, N, N] additive (shifted windows) or None -> [B, nW, N, C]."""
        B, nW, N, C = x.shape
        q, k, v = self.qkv(x).view(B, nW, N, 3, self.num_heads, C // self.num_heads).permute(3, 0, 1, 4, 2, 5)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.position_bias()  # [B, nW, heads, N, N]
        if mask is not None:
            attn = attn + mask[:, None]
        out = attn.softmax(-1) @ v  # [B, nW, heads, N, d]
        return self.proj(out.transpose(2, 3).reshape(B, nW, N, C))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (official names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm block: (shifted) window attention then MLP, each with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, drop_path: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x: [B, H, W, C]; mask: the stage's shifted-window mask (used when this block shifts)."""
        B, H, W, C = x.shape
        w, s = self.window, self.shift
        y = F.pad(self.norm1(x), (0, 0, 0, -W % w, 0, -H % w))  # pad after the norm, as the official code
        Hp, Wp = y.shape[1:3]
        if s:
            y = torch.roll(y, (-s, -s), (1, 2))
        y = window_merge(self.attn(window_partition(y, w), mask if s else None), w, Hp, Wp)
        if s:
            y = torch.roll(y, (s, s), (1, 2))
        x = x + self.drop_path(y[:, :H, :W])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods -> one token: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C] (odd sizes padded)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # The official channel order: (even row, even col), (odd, even), (even, odd), (odd, odd).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch`` x ``patch`` patches -> tokens: [B, 3, H, W] -> [B, ceil(H/p), ceil(W/p), C]."""

    def __init__(self, dim: int, patch: int = 4):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        x = F.pad(x, (0, -W % self.patch, 0, -H % self.patch))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinStage(nn.Module):
    """Blocks alternating plain and shifted windows, then (unless last) patch merging."""

    def __init__(self, dim: int, depth: int, window: int, drop_paths: list[float], downsample: bool):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(SwinBlock(dim, max(dim // HEAD_DIM, 1), window, (i % 2) * (window // 2), p)
                                    for i, p in enumerate(drop_paths))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """x: [B, H, W, C] -> (the stage's output [B, H, W, C], the next stage's input or None)."""
        w = self.window
        H, W = x.shape[1:3]
        mask = shift_mask(H + -H % w, W + -W % w, w, w // 2, x.device).to(x.dtype) if len(self.blocks) > 1 else None
        for block in self.blocks:
            x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else None)


class SwinTransformer(nn.Module):
    """Swin backbone returning the LayerNorm-ed outputs of ``return_layers`` (1..4 = strides 4, 8,
    16, 32) as [B, C, H, W] maps.

    Args:
        variant: T, S, B or L (blocks per stage and channels, see ``VARIANTS``).
        embed_dim: patch-embedding channels instead of the variant's (tiny test models); heads
            stay one per 32 channels (at least one).
        window: attention window in tokens (7 for the 224-px ImageNet weights, 12 for 384-px ones).
        drop_path: stochastic depth of the last block; it grows linearly from 0 at the first.
        return_layers: which stages to return, e.g. (2, 3, 4); later stages are not built.
        frozen_stages: the patch embedding and stages up to this index get no gradient and no
            stochastic depth (the official code puts them in eval mode); -1 trains everything.
        output_norms: a LayerNorm on each returned map (``norm{i}`` for stage i + 1, the official
            detection backbones'); Salience DETR's torchvision-style Swin has none.
    """

    def __init__(self, variant: str = "T", embed_dim: int | None = None, window: int = 7, drop_path: float = 0.2,
                 return_layers=(2, 3, 4), frozen_stages: int = -1, output_norms: bool = True):
        super().__init__()
        if variant not in VARIANTS:
            raise SparsedetError(f"unknown Swin variant {variant!r}; choose one of {sorted(VARIANTS)}")
        dim, depths = VARIANTS[variant]
        dim = embed_dim or dim
        built = max(return_layers)
        self.variant, self.window = variant, window
        self.patch_embed = PatchEmbed(dim)
        n = sum(depths)
        rates = [drop_path * j / max(n - 1, 1) for j in range(n)]  # plain floats: builds on the meta device too
        self.layers = nn.ModuleList()
        self.channels = []
        for i in range(built):
            stage_rates = rates[sum(depths[:i]):sum(depths[:i + 1])]
            if i < frozen_stages:
                stage_rates = [0.0] * len(stage_rates)
            self.layers.append(SwinStage(dim * 2 ** i, depths[i], window, stage_rates, downsample=i + 1 < built))
            self.channels.append(dim * 2 ** i)
        self.return_layers = tuple(return_layers)
        self.output_norms = output_norms
        if output_norms:
            for i in self.return_layers:
                self.add_module(f"norm{i - 1}", nn.LayerNorm(self.channels[i - 1]))
        self.out_channels = [self.channels[i - 1] for i in self.return_layers]
        self.out_strides = [2 ** (i + 1) for i in self.return_layers]
        self._init_weights()
        frozen = [self.patch_embed] if frozen_stages >= 0 else []
        for module in frozen + list(self.layers[:max(frozen_stages, 0)]):
            module.requires_grad_(False)

    def _init_weights(self) -> None:
        # The official detection init: truncated normal linears, zero biases (LayerNorms 1/0 already).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> list[Tensor]:
        """x: [B, 3, H, W] -> one [B, C_i, ceil(H/s_i), ceil(W/s_i)] map per returned stage. padding
        is not masked: windows attend over a batch's padding as in the official code, so a Swin
        model's detections can change with its batch-mates (the neck still masks them)."""
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.layers, start=1):
            out, x = stage(x)
            if i in self.return_layers:
                if self.output_norms:
                    out = getattr(self, f"norm{i - 1}")(out)
                outs.append(out.permute(0, 3, 1, 2).contiguous())
        return outs

    def load_weights(self, path: str | Path) -> None:
        """Load an official Swin ImageNet file (``swin_tiny_patch4_window7_224.pth``: ``{"model": ...}``).
        The classification head and final norm, derived buffers (``relative_position_index``,
        ``attn_mask``) and unbuilt stages are skipped; bias tables of another window size are
        resized (bicubic, as the official fine-tuning does); the output norms, absent from
        ImageNet files, keep their init."""
        from .swin_weights import fit_swin_weights, read_swin_weights
        state = fit_swin_weights(read_swin_weights(path), self.state_dict(), path, self.variant)
        self.load_state_dict(state, strict=False)
