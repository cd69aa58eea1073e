"""Convert an official IDEA-Research/DINO checkpoint (``checkpoint0011_4scale.pth``) to our layout.

The file is a training checkpoint ``{"model": state_dict, "args": Namespace, ...}`` read with
``weights_only=True``. Shared heads are stored once per decoder layer and again under
``transformer.decoder.*``; the copies are checked equal and folded. The architecture (widths,
layers, queries, classes, levels, points) is read from tensor shapes; DINO's fixed conventions
(temperature 20, no position offset, eps 1e-3, final decoder norm) come from the ``dino_r50`` preset.
Swin-L files (``checkpoint0011_4scale_swin.pth`` ...) keep the Swin bare under ``backbone.0.``
(ResNets under ``backbone.0.body.``); its variant, window and stages are read from the keys, 4- and
5-scale alike.
"""
from __future__ import annotations

from pathlib import Path

from ...errors import SparsedetError
from .common import WB, Renamed, Rule, fold_aliases, layer_count, read_state_dict, rename_keys, sizes_from_state
from .swin import SWIN_BUFFERS, SWIN_KEYS

HINT = "Expected an official DINO checkpoint (IDEA-Research/DINO, e.g. checkpoint0011_4scale.pth)."
RULES = [
    Rule(r"backbone\.0\.body\.(.+)", r"backbone.\1"),
    Rule(r"backbone\.0\." + SWIN_KEYS, r"backbone.\1"),  # Swin: the Joiner holds it bare
    Rule(r"input_proj\.(\d+)\.([01])\." + WB, r"neck.input_proj.\1.\2.\3"),
    Rule(r"transformer\.level_embed", "neck.level_embed"),
    Rule(r"transformer\.(encoder|decoder)\.layers\.(.+)", r"\1.layers.\2"),
    Rule(r"transformer\.decoder\.(ref_point_head\.layers\.[01]|norm)\." + WB, r"decoder.\1.\2"),
    Rule(r"transformer\.tgt_embed\.weight", "queries.tgt_embed.weight"),
    Rule(r"transformer\.(enc_output|enc_output_norm)\." + WB, r"queries.\1.\2"),
    Rule(r"transformer\.enc_out_class_embed\." + WB, r"queries.class_head.\1"),
    Rule(r"transformer\.enc_out_bbox_embed\.(layers\.[0-2]\." + WB + ")", r"queries.box_head.\1"),
    Rule(r"class_embed\.0\." + WB, r"heads.class_embed.0.\1"),
    Rule(r"bbox_embed\.0\.(layers\.[0-2]\." + WB + ")", r"heads.box_embed.0.\1"),
    Rule(r"label_enc\.weight", "denoising.label_enc.weight"),
]


def convert_official_dino(path: str | Path) -> tuple[Renamed, dict]:
    """Returns (state dict in our layout, config overrides for the ``dino_r50`` preset)."""
    state = read_state_dict(path)
    if "transformer.tgt_embed.weight" not in state or "label_enc.weight" not in state:
        raise SparsedetError(f"{path} has no transformer.tgt_embed / label_enc weights. {HINT}")
    layers = layer_count(state, "transformer.decoder.layers.")
    # The heads are shared: one module saved once per layer and again inside the decoder.
    aliases = {"transformer.decoder.class_embed.": "class_embed.", "transformer.decoder.bbox_embed.": "bbox_embed."}
    aliases.update({f"{kind}.{k}.": f"{kind}.0." for kind in ("class_embed", "bbox_embed") for k in range(1, layers)})
    state = fold_aliases(state, aliases, path)
    out = rename_keys(state, RULES, path, ignore=[r".*num_batches_tracked", *SWIN_BUFFERS], hint=HINT)
    return out, sizes_from_state(out)
