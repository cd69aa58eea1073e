"""SAM-DETR's decoder: the Semantics Aligner re-samples each query from the encoder memory
inside its reference box (RoIAlign 7x7 -> salient points -> bilinear reads), one query vector
and one sine position per head, then a dense cross-attention where every head sees the full
key; the SMCA variant adds a Gaussian-like prior around each head's point (SAM-DETR, Zhang et al.,
CVPR 2022; code: github.com/ZhangGongjie/SAM-DETR)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nn.attention import ProjectedAttention
from ...nn.mlp import FeedForward, MLP
from ...nn.neck import MultiLevel
from ...nn.position import sine_embed_coords
from ...ops.boxes import cxcywh_to_xyxy
from ...ops.functional import apply_box_delta, host_tensor
from ...ops.roi_align import roi_align
from ...config import ModelConfig
from ...stage_kinds import register_decoder
from .base import Decoder, DecoderOutput
from .conditional import QueryPositionSelfAttention

ROI = 7


def point_predictor(dim: int, outputs: int) -> tuple[nn.Sequential, nn.Sequential]:
    """``point1`` (1x1 conv to dim/4 + ReLU) and ``point2`` (MLP on the flattened 7x7 map with
    the official fixed widths 256, 512, 512) predicting ``outputs`` numbers per box."""
    point1 = nn.Sequential(nn.Conv2d(dim, dim // 4, 1), nn.ReLU())
    point2 = nn.Sequential(nn.Linear(dim // 4 * ROI * ROI, 256), nn.ReLU(), nn.Linear(256, 512), nn.ReLU(),
                           nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, outputs))
    return point1, point2


def box_features(memory: Tensor, levels: MultiLevel, boxes: Tensor) -> Tensor:
    """RoIAlign (7x7, aligned) of the memory inside each box. memory: [B, H*W, C] (the one level
    of ``levels``); boxes: [B, Q, 4] cxcywh of the valid image (no gradient, as torchvision's).
    Where ``levels.per_image``, samples past an image's edge read its edge, as it would alone,
    not its batch's padding. Returns [B, Q, C, 7, 7]."""
    B, _, C = memory.shape
    H, W = levels.shapes[0]
    fmap = memory.transpose(1, 2).reshape(B, C, H, W)
    valid = levels.valid_ratios[:, 0] * host_tensor([W, H], memory.device, memory.dtype)  # (w, h)
    extents = valid.round().flip(-1) if levels.per_image else None
    return roi_align(fmap, cxcywh_to_xyxy(boxes.detach()) * valid.repeat(1, 2)[:, None], (ROI, ROI), extents=extents)


def salient_points(rois: Tensor, point1: nn.Module, point2: nn.Module, num_points: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Predict points in each box and read the box's 7x7 features there.

    rois: [B, Q, C, 7, 7]. Returns (offsets [B, Q, M, 2] in (-1, 1) of the half box (x, y),
    features [B, Q, M, C], the predictor's remaining outputs [B, Q, extra])."""
    B, Q, C = rois.shape[:3]
    M = num_points
    out = point2(point1(rois.flatten(0, 1)).flatten(1))
    offsets = out[:, :2 * M].view(B * Q, 1, M, 2).tanh()
    # RoIAlign bins tile the box, so grid coordinates +-1 are its edges (align_corners=False).
    feats = F.grid_sample(rois.flatten(0, 1), offsets, padding_mode="zeros", align_corners=False)
    return offsets.view(B, Q, M, 2), feats.view(B, Q, C, M).transpose(2, 3), out[:, 2 * M:].view(B, Q, -1)


def point_positions(boxes: Tensor, offsets: Tensor) -> Tensor:
    """Image coordinates of box-relative points: centre + offset * half size. [B, Q, M, 2]."""
    return boxes[:, :, None, :2] + offsets * boxes[:, :, None, 2:] * 0.5


def gaussian_prior(points: Tensor, scales: Tensor, shape: tuple[int, int], valid_ratio: Tensor) -> Tensor:
    """SMCA's logit bias -(sx^2 dx^2 + sy^2 dy^2) / 8 between each head's point and every cell
    centre, in feature pixels. points: [B, Q, M, 2]; scales: [B, Q, M, 2]. Returns [B, M, Q, H*W]."""
    H, W = shape
    size = host_tensor([W, H], points.device, points.dtype)
    centre = points * size * valid_ratio[:, None, None]
    ys, xs = torch.meshgrid(torch.arange(H, device=points.device, dtype=points.dtype),
                            torch.arange(W, device=points.device, dtype=points.dtype), indexing="ij")
    cells = torch.stack([xs, ys], -1).view(1, 1, 1, H * W, 2) + 0.5
    dist = ((centre[:, :, :, None] - cells) ** 2 * (scales ** 2)[:, :, :, None]).sum(-1)
    return (-dist / 8.0).permute(0, 2, 1, 3)


class SamDecoderLayer(FeedForward, QueryPositionSelfAttention):
    """Self-attention (position = sine of the box centre) -> norm1 -> Semantics Aligner ->
    cross-attention (q/k C wide per head, v C/M) -> norm2 -> FFN -> norm3. Parameter names
    follow the official layer, so its checkpoints convert by prefix."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, num_heads: int, smca: bool):
        super().__init__(dim, num_heads, dropout)
        self.num_heads, self.smca = num_heads, smca
        self.ca_qcontent_proj = nn.Linear(dim, dim)
        self.ca_qpos_sine_proj = MLP(dim, dim, dim, 2)
        self.ca_kcontent_proj = nn.Linear(dim, dim)
        self.ca_kpos_sine_proj = MLP(dim, dim, dim, 2)
        self.ca_v_proj = nn.Linear(dim, dim)
        self.cross_attn = ProjectedAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.point1, self.point2 = point_predictor(dim, num_heads * (4 if smca else 2))
        nn.init.zeros_(self.point2[-1].bias)
        self.attn1 = nn.Linear(dim, dim * num_heads)
        self.attn2 = nn.Linear(dim, dim * num_heads)
        self.add_feed_forward(dim, ffn_dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, tgt: Tensor, boxes: Tensor, memory: Tensor, levels: MultiLevel) -> Tensor:
        B, Q, C = tgt.shape
        M, shape, ratio = self.num_heads, levels.shapes[0], levels.valid_ratios[:, 0]
        with torch.no_grad():
            centre_pos = sine_embed_coords(boxes[..., :2], C // 2, 10000.0, "yxwh")
        tgt = self.self_attend(tgt, centre_pos)
        offsets, content, extra = salient_points(box_features(memory, levels, boxes), self.point1, self.point2, M)
        points = point_positions(boxes, offsets)
        with torch.no_grad():
            point_pos = sine_embed_coords(points, C // 2, 10000.0, "yxwh")
        content = content * self.attn1(tgt).view(B, Q, M, C).sigmoid()
        point_pos = point_pos * self.attn2(tgt).view(B, Q, M, C).sigmoid()
        q = (self.ca_qcontent_proj(content) + self.ca_qpos_sine_proj(point_pos)).view(B, Q, M * C)
        k = self.ca_kcontent_proj(memory) + self.ca_kpos_sine_proj(levels.pos)
        k = k[:, :, None].expand(-1, -1, M, -1).reshape(B, -1, M * C)
        bias = gaussian_prior(points, extra.view(B, Q, M, 2), shape, ratio) if self.smca else None
        out = self.cross_attn(q, k, self.ca_v_proj(memory), levels.padding, bias)
        tgt = self.norm2(tgt + self.dropout(out))
        ffn = self.feed_forward(tgt)
        return self.norm3(tgt + self.dropout(ffn))


@register_decoder("sam")
class SamDecoder(Decoder):
    """Reference boxes refined layer by layer in logit space (detached between layers, as the
    official decoder); layer outputs go to the heads without a final norm."""

    single_level = True
    config_fields = ("smca",)

    @classmethod
    def from_config(cls, c: ModelConfig) -> "SamDecoder":
        return cls(c.num_decoder_layers, c.hidden_dim, c.ffn_dim, c.dropout, c.num_heads, c.decoder.smca,
                   c.sigmoid_eps)

    def __init__(self, num_layers: int, dim: int, ffn_dim: int, dropout: float, num_heads: int, smca: bool,
                 eps: float = 1e-5):
        super().__init__()
        self.layers = nn.ModuleList(SamDecoderLayer(dim, ffn_dim, dropout, num_heads, smca) for _ in range(num_layers))
        self.eps = eps

    def forward(self, tgt: Tensor, reference: Tensor, memory: Tensor, levels: MultiLevel,
                query_pos: Tensor | None = None, attn_mask: Tensor | None = None, box_heads=None,
                record_sampling: bool = False) -> DecoderOutput:
        """tgt: [B, Q, C]; reference: [B, Q, 4] boxes (cxcywh in [0, 1]); box_heads: per-layer
        box-delta heads. References: each layer's input boxes."""
        outputs, refs = [], []
        for lid, layer in enumerate(self.layers):
            refs.append(reference)
            tgt = layer(tgt, reference, memory, levels)
            outputs.append(tgt)
            if lid + 1 < len(self.layers):
                reference = apply_box_delta(box_heads[lid](tgt), reference, self.eps).detach()
        return DecoderOutput(outputs, refs)
