"""Swin backbones inside released detection checkpoints: their key names and what the converted
keys say about the backbone (variant, window, returned stages, output norms).

The detection repositories store the official Swin (``patch_embed``, ``layers.{i}.blocks.{j}``,
``layers.{i}.downsample``, per-output ``norm{i}``) under their own prefix, which each converter's
rules strip; Salience DETR stores torchvision's Swin (``features.{k}``), renamed by
:func:`torchvision_swin_name`. The derived ``relative_position_index`` and ``attn_mask`` buffers
are dropped (``SWIN_BUFFERS``): our model recomputes them.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

from torch import Tensor

from ...errors import SparsedetError
from ...nn.swin import VARIANTS
from .keys import layer_count

# The official (detection) Swin's parameters under a repository's backbone prefix, as one group.
SWIN_KEYS = r"((?:patch_embed|layers|norm\d)\..+)"
SWIN_BUFFERS = [r"backbone\..*\.(relative_position_index|attn_mask)"]
_MLP = {".mlp.0.": ".mlp.fc1.", ".mlp.3.": ".mlp.fc2."}  # torchvision's MLP is a Sequential


def torchvision_swin_name(key: str) -> str | None:
    """Our name for ``key``, what follows ``features.`` in torchvision's Swin: ``features.0`` is the
    patch embedding (conv, permute, LayerNorm), stage i has its blocks at ``features.{2i+1}`` and
    its patch merging at ``features.{2i+2}``. None for a key of no such form."""
    head, _, rest = key.partition(".")
    if not head.isdigit() or not rest:
        return None
    k = int(head)
    if k == 0:
        part, _, leaf = rest.partition(".")
        return f"backbone.patch_embed.{ {'0': 'proj', '2': 'norm'}[part]}.{leaf}" if part in ("0", "2") else None
    if k % 2:
        for theirs, ours in _MLP.items():
            rest = rest.replace(theirs, ours)
        return f"backbone.layers.{k // 2}.blocks.{rest}"
    return f"backbone.layers.{k // 2 - 1}.downsample.{rest}"


def is_swin(state: Mapping[str, Tensor]) -> bool:
    """Whether converted (our-layout) keys hold a Swin backbone."""
    return "backbone.patch_embed.proj.weight" in state


def swin_overrides(state: Mapping[str, Tensor], source: object = "checkpoint") -> dict:
    """``model.backbone`` overrides that build the Swin whose converted keys ``state`` holds:
    variant from the blocks per stage (and width), ``embed_dim`` when it is not the variant's,
    window from the bias table ((2w-1)^2 rows), returned stages from the neck's 1x1 input
    projections (their input channels), output norms from ``norm{i}`` keys."""
    embed = state["backbone.patch_embed.proj.weight"].shape[0]
    stages = layer_count(state, "backbone.layers.")
    depths = tuple(layer_count(state, f"backbone.layers.{i}.blocks.") for i in range(stages))
    fits = [v for v, (dim, counts) in VARIANTS.items() if counts[:len(depths)] == depths]
    if not fits:
        raise SparsedetError(f"{source}: a Swin backbone with {list(depths)} blocks per stage is none of Swin-"
                             f"{'/'.join(VARIANTS)} ({', '.join(f'{v}: {list(c)}' for v, (_, c) in VARIANTS.items())})")
    variant = next((v for v in fits if VARIANTS[v][0] == embed), fits[0])
    rows = state["backbone.layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    window = (math.isqrt(rows) + 1) // 2
    if (2 * window - 1) ** 2 != rows:
        raise SparsedetError(f"{source}: a Swin bias table of {rows} rows is no window's ((2w-1)^2 rows)")
    channels = [embed * 2 ** i for i in range(len(depths))]
    returned = []
    for i in range(layer_count(state, "neck.input_proj.")):
        proj = state[f"neck.input_proj.{i}.0.weight"]
        if proj.shape[-1] != 1:  # a 3x3 extra level, fed by the last returned stage
            continue
        if proj.shape[1] not in channels:
            raise SparsedetError(f"{source}: input projection {i} takes {proj.shape[1]} channels, which no stage of "
                                 f"this Swin gives ({channels})")
        returned.append(channels.index(proj.shape[1]) + 1)
    overrides = {"model.backbone.kind": "swin", "model.backbone.variant": variant,
                 "model.backbone.window_size": window, "model.backbone.return_layers": returned,
                 "model.backbone.output_norms": any(re.fullmatch(r"backbone\.norm\d\.weight", k) for k in state)}
    if embed != VARIANTS[variant][0]:
        overrides["model.backbone.embed_dim"] = embed
    return overrides
