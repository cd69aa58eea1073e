"""Attention modules with parameters: multi-scale deformable attention, and multi-head attention
on already projected queries, keys and values (Conditional DETR, SAM-DETR)."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import deform_attn
from ..ops.functional import host_tensor


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), official layout and init.

    Parameter names follow the official module: ``sampling_offsets``,
    ``attention_weights``, ``value_proj``, ``output_proj``.
    """

    def __init__(self, dim: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden dim {dim} must be divisible by num_heads {num_heads}")
        self.dim, self.num_levels, self.num_heads, self.num_points = dim, num_levels, num_heads, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    reinit_after_xavier = True  # the official init of offsets, weights and projections

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        # Each head starts looking in its own direction, on square rings of growing radius.
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        reference: Tensor,
        value: Tensor,
        shapes: list[tuple[int, int]],
        value_padding: Tensor | None = None,
        value_is_projected: bool = False,
        return_sampling: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            query: [B, Q, C] (content + position).
            reference: [B, Q, L, 2] points (x, y) or [B, Q, L, 4] boxes (cx, cy, w, h), in [0, 1]
                of the padded map, i.e. already multiplied by each level's valid ratio.
            value: [B, S, C] flattened multi-level input (or already ``value_proj``-ed values,
                see ``value_is_projected``).
            shapes: per level (H, W) as Python ints.
            value_padding: [B, S] True on padding; those values are zeroed.
            return_sampling: also return the sampling locations [B, Q, heads, L, P, 2] (x, y in
                [0, 1] of the padded map) and their attention weights [B, Q, heads, L, P].
        Returns:
            [B, Q, C] (and the sampling, if asked).
        """
        B, Q, _ = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        v = value if value_is_projected else self.value_proj(value)
        if value_padding is not None:
            v = v.masked_fill(value_padding[..., None], 0.0)
        v = v.view(B, v.shape[1], M, self.dim // M)
        # Offsets, softmax and locations in fp32 under autocast: they are box arithmetic, and bf16
        # bilinear sampling is slower and less exact.
        offsets = self.sampling_offsets(query).float()
        weights = self.attention_weights(query).float().view(B, Q, M, L * P).softmax(-1).view(B, Q, M, L, P)
        reference = reference.float()
        if reference.shape[-1] == 2:
            # reference + offset / (W, H) as one multiply-add over flat rows: 3x faster than the
            # broadcast division over six dimensions.
            inverse = host_tensor([(1.0 / w, 1.0 / h) for h, w in shapes], query.device)
            scale = inverse[None, :, None, :].expand(M, L, P, 2).reshape(-1)
            start = reference.reshape(B, Q, 1, L, 1, 2).expand(B, Q, M, L, P, 2).reshape(B, Q, -1)
            loc = torch.addcmul(start, offsets, scale).view(B, Q, M, L, P, 2)
        else:
            offsets = offsets.view(B, Q, M, L, P, 2)
            loc = reference[:, :, None, :, None, :2] + offsets / P * reference[:, :, None, :, None, 2:] * 0.5
        with torch.autocast(device_type=query.device.type, enabled=False):
            out = deform_attn.ms_deform_attn(v.float(), shapes, loc, weights)
        out = self.output_proj(out.to(query.dtype))
        return (out, loc, weights) if return_sampling else out


class SelfAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (same parameters, batch first) that runs in fp32 on a CPU even
    under bf16 autocast: at DETR's few hundred queries, bf16 ``scaled_dot_product_attention`` forward
    and backward take 2.8 ms on a CPU against 0.63 ms in fp32, and the projections are tiny."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__(dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, **kwargs) -> tuple[Tensor, Tensor | None]:
        if query.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return super().forward(query, key, value, **kwargs)
        kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
        with torch.autocast("cpu", enabled=False):
            return super().forward(query.float(), key.float(), value.float(), **kwargs)

    def with_key_padding(self, query: Tensor, key: Tensor, value: Tensor, key_padding: Tensor) -> Tensor:
        """``forward(...)[0]`` with ``key_padding`` [B, k] (True: not attended to), written out with
        the same weights: ``nn.MultiheadAttention``'s own mask checks guard on the sequence length,
        which an ONNX export of a data-dependent number of tokens cannot. Each query must keep a key."""
        cpu_fp32 = query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", enabled=False) if cpu_fp32 else contextlib.nullcontext():
            dtype = torch.float32 if cpu_fp32 else query.dtype
            B, L, C = query.shape
            H = self.num_heads
            w_q, w_k, w_v = self.in_proj_weight.to(dtype).chunk(3)
            b_q, b_k, b_v = self.in_proj_bias.to(dtype).chunk(3)

            def heads(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
                return F.linear(x.to(dtype), w, b).view(B, -1, H, C // H).transpose(1, 2)

            q, k, v = heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v)
            scores = (q @ k.transpose(-1, -2)) * (C // H) ** -0.5
            weights = scores.masked_fill(key_padding[:, None, None, :], float("-inf")).softmax(-1)
            weights = F.dropout(weights, self.dropout, self.training)
            out = (weights @ v).transpose(1, 2).reshape(B, L, C)
            return F.linear(out, self.out_proj.weight.to(dtype), self.out_proj.bias.to(dtype))


class ProjectedAttention(nn.Module):
    """Multi-head attention whose inputs are already projected: only ``out_proj`` has weights.

    The query/key width per head may differ from the value width per head: Conditional DETR
    concatenates content and position per head (q/k 2C/M, v C/M), SAM-DETR gives every head a
    full C-wide query (q/k C, v C/M). Scale is 1/sqrt(q/k width per head), as the official code.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_padding: Tensor | None = None,
                bias: Tensor | None = None) -> Tensor:
        """q: [B, Q, M*Dk]; k: [B, S, M*Dk]; v: [B, S, C]; key_padding: [B, S] True = ignore;
        bias: [B, M, Q, S] added to the logits (SMCA's spatial prior). Returns [B, Q, C]."""
        B, Q, _ = q.shape
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(q, key_padding, bias),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, Q, -1))

    def attention_weights(self, q: Tensor, k: Tensor, key_padding: Tensor | None = None,
                          bias: Tensor | None = None) -> Tensor:
        """The softmax ``forward`` applies, for figures: [B, M, Q, S] (same arguments as ``forward``)."""
        q, k = self._heads(q), self._heads(k)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        mask = self._mask(q, key_padding, bias)
        return (logits if mask is None else logits + mask).softmax(-1)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    @staticmethod
    def _mask(q: Tensor, key_padding: Tensor | None, bias: Tensor | None) -> Tensor | None:
        mask = None
        if key_padding is not None:
            B, S = key_padding.shape
            mask = torch.zeros(B, 1, 1, S, dtype=q.dtype, device=q.device).masked_fill(
                key_padding[:, None, None], float("-inf"))
        if bias is not None:
            mask = bias if mask is None else bias + mask
        return mask
