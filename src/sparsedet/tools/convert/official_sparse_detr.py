"""Convert an official kakaobrain/sparse-detr checkpoint (``sparse_detr_r50_{10..50}.pth``).

The file is ``{"model": state_dict, "optimizer", "lr_scheduler", "epoch", "args": Namespace}``, read
with ``weights_only=True``. The 12 head pairs are one list: 0..L-1 decoder layers, L the two-stage
head, L+1.. the encoder auxiliary heads; the copies saved again under ``transformer.decoder.*`` and
``transformer.encoder.*`` are checked equal and dropped, as are thop's ``total_ops/total_params``
buffers. The keep ratio and query count come from ``args`` (``rho``, ``num_queries``). Swin-T files
(``sparse_detr_swint_{10..50}.pth``) hold the official Swin under ``backbone.0.body.`` too.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from ...errors import SparsedetError
from .common import WB, Renamed, Rule, fold_aliases, layer_count, read_checkpoint, rename_keys, sizes_from_state
from .swin import SWIN_BUFFERS

HINT = "Expected an official Sparse DETR checkpoint (kakaobrain/sparse-detr, e.g. sparse_detr_r50_30.pth)."


def _head_rules(num_decoder_layers: int) -> list[Rule]:
    def place(kind: str, ours: str):
        def target(m):
            i, rest = int(m.group(1)), m.group(2)
            if i < num_decoder_layers:
                return f"heads.{ours}.{i}.{rest}"
            if i == num_decoder_layers:
                return f"queries.{'class_head' if kind == 'class' else 'box_head'}.{rest}"
            return f"encoder.aux_heads.{ours}.{i - num_decoder_layers - 1}.{rest}"
        return target
    return [Rule(r"class_embed\.(\d+)\.(" + WB + ")", place("class", "class_embed")),
            Rule(r"bbox_embed\.(\d+)\.(layers\.[0-2]\." + WB + ")", place("box", "box_embed"))]


RULES = [
    Rule(r"backbone\.0\.body\.(.+)", r"backbone.\1"),
    Rule(r"input_proj\.(\d+)\.([01])\." + WB, r"neck.input_proj.\1.\2.\3"),
    Rule(r"transformer\.level_embed", "neck.level_embed"),
    Rule(r"transformer\.(encoder|decoder)\.layers\.(.+)", r"\1.layers.\2"),
    Rule(r"transformer\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm)\." + WB, r"queries.\1.\2"),
    Rule(r"transformer\.enc_mask_predictor\.(layer[12]\.\d\." + WB + ")", r"encoder.scorer.\1"),
]


def convert_official_sparse_detr(path: str | Path) -> tuple[Renamed, dict]:
    """Returns (state dict in our layout, config overrides for the ``sparse_detr_r50`` preset)."""
    state, args = read_checkpoint(path)
    if "transformer.enc_mask_predictor.layer2.4.weight" not in state:
        raise SparsedetError(f"{path} has no token scorer (transformer.enc_mask_predictor). {HINT}")
    layers = layer_count(state, "transformer.decoder.layers.")
    enc_layers = layer_count(state, "transformer.encoder.layers.")
    aliases = {"transformer.decoder.class_embed.": "class_embed.", "transformer.decoder.bbox_embed.": "bbox_embed."}
    aliases.update({f"transformer.encoder.{kind}.{i}.": f"{kind}.{layers + 1 + i}."
                    for kind in ("class_embed", "bbox_embed") for i in range(enc_layers - 1)})
    state = fold_aliases(state, aliases, path)
    out = rename_keys(state, RULES + _head_rules(layers), path,
                      ignore=[r".*num_batches_tracked", r".*total_(ops|params)", *SWIN_BUFFERS], hint=HINT)
    if "rho" not in args:
        warnings.warn(f"{path} carries no training args; assuming the preset's keep ratio and 300 queries")
    overrides = sizes_from_state(out, args.get("nheads", 8))
    overrides["model.encoder.aux_heads"] = any(k.startswith("encoder.aux_heads.") for k in out)
    if "rho" in args:
        overrides["model.encoder.keep_ratio"] = float(args["rho"])
    if "num_queries" in args:
        overrides["model.num_queries"] = int(args["num_queries"])
    if "dropout" in args:
        overrides["model.dropout"] = float(args["dropout"])
    return out, overrides
