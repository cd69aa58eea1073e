"""Small feed-forward blocks shared by heads, query generators and the transformer layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (keys ``layers.{i}``). ``fp32``: run in
    fp32 also under autocast, for box regression: a bf16 box delta moves a 10-px box by about a
    third of a pixel, and the heads see only a few hundred queries."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, fp32: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))
        self.fp32 = fp32

    def forward(self, x: Tensor) -> Tensor:
        if self.fp32 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._layers(x.float())
        return self._layers(x)

    def _layers(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class FeedForward:
    """The transformer layers' feed-forward block, ``linear2(dropout(relu(linear1(x))))``, mixed
    into a layer so that its parameters keep the official names (``linear1``, ``linear2``) on the
    layer itself; the layer owns ``dropout``."""

    def add_feed_forward(self, dim: int, ffn_dim: int) -> None:
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)

    def feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))
