"""Figures of what a model looked at (``sparsedet viz``): the tokens its encoder updated, per feature
level and per encoder layer (Focus-DETR figs. 6, 9, 10), where the decoder read for one query, the
decoder attention map (Sparse DETR's DAM) beside the kept tokens with the image's Corr, and the final
detections.

Every drawn token comes from the model's own ``TokenSelection`` (or, for a dense encoder, from the
valid tokens it updates): nothing is re-scored here.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from ..engine.corr import corr_ratio, mean_defined
from ..engine.thresholds import Threshold, keep_above
from ..engine.precision import evaluating
from ..errors import SparsedetError
from ..losses.selection import decoder_attention_map
from ..models.detector import DetectorOutput
from ..models.encoders.scoring import written
from ..nn.attention import ProjectedAttention
from ..ops.functional import token_levels
from .draw import PALETTE, caption, draw_detections, grid

PANEL = 384  # pixel side of one panel in the tiled figures
KEPT = (0, 255, 255)  # outline of kept tokens over the red attention heat map
HEAT_OPACITY = 0.8  # the red heat map's opacity at its maximum (the photo shows through)
LEGEND_ROW = 14  # pixel height of a legend row and width of a colour bar's bar
VIZ_DEFAULT = 0.3  # minimum score of drawn detections for runs that recorded no threshold


@dataclass
class Observation:
    """One image through the model: the resized input it saw, the output, the encoder's input
    layout, and (query-side decoders) each decoder layer's cross-attention weights [M, Q, S]."""

    image: Image.Image
    out: DetectorOutput
    shapes: list[tuple[int, int]]
    padding: Tensor          # [S] True on padding tokens
    padded_size: tuple[int, int]
    cross_attention: list[Tensor]


@torch.no_grad()
def observe(model, image) -> Observation:
    """Run ``model`` (a ``Detector``) on one image, recording what the figures need."""
    batch, _, resized = model.preprocess([image])
    device = next(model.parameters()).device
    seen, attention = {}, []

    def keep_levels(module, args, levels) -> None:
        seen["levels"] = levels

    def keep_attention(module, args, kwargs) -> None:
        q, k = args[0], args[1]
        padding = args[3] if len(args) > 3 else kwargs.get("key_padding")
        bias = args[4] if len(args) > 4 else kwargs.get("bias")
        attention.append(module.attention_weights(q, k, padding, bias)[0].float().cpu())

    hooks = [model.neck.register_forward_hook(keep_levels)]
    hooks += [m.register_forward_pre_hook(keep_attention, with_kwargs=True) for name, m in model.decoder.named_modules()
              if isinstance(m, ProjectedAttention) and name.endswith("cross_attn")]
    try:
        with evaluating(model):
            out = model(batch.to(device), record_sampling=True)
    finally:
        for h in hooks:
            h.remove()
    levels = seen["levels"]
    # SD-DETR runs two cross-attentions per layer (classification, localisation): show the first.
    per_layer = len(attention) // max(1, model.config.num_decoder_layers)
    attention = attention[::per_layer] if per_layer else []
    # The figures read the output number by number: on the host, after one copy from a GPU.
    return Observation(resized[0], on_cpu(out), levels.shapes, levels.padding[0].cpu(),
                       (int(batch.images.shape[-2]), int(batch.images.shape[-1])), attention)


def on_cpu(value):
    """``value`` with every tensor in it on the CPU: tensors, and the lists, tuples, dicts and
    dataclasses (a ``DetectorOutput`` and what it holds) around them; anything else as it is."""
    if isinstance(value, Tensor):
        return value.cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = copy.copy(value)
        for f in dataclasses.fields(value):
            object.__setattr__(moved, f.name, on_cpu(getattr(value, f.name)))
        return moved
    return value


def updated_tokens(obs: Observation, layer: int) -> Tensor:
    """Flat indices of the tokens encoder ``layer`` updated for the image: the selection's written
    entries for a sparse encoder, every valid token for a dense one."""
    selection = obs.out.selection
    if selection is None:
        return (~obs.padding).nonzero().squeeze(1)
    chosen = selection.layers[layer]
    return chosen.indices[0][written(chosen.indices, chosen.counts)[0]].cpu()


def token_cells(indices: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """Flat token indices (levels fine to coarse) -> per level [n, 2] (row, column)."""
    level = token_levels(indices, shapes)
    cells, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        local = indices[level == lvl] - start
        cells.append(torch.stack([local // w, local % w], -1))
        start += h * w
    return cells


def cell_boxes(cells: Tensor, shape: tuple[int, int], padded_size: tuple[int, int]) -> list[tuple[float, ...]]:
    """(x0, y0, x1, y1) input pixels of each (row, column) cell of a level of ``shape``."""
    sy, sx = padded_size[0] / shape[0], padded_size[1] / shape[1]
    return [(c * sx, r * sy, (c + 1) * sx, (r + 1) * sy) for r, c in cells.tolist()]


def _overlay(image: Image.Image, boxes_by_colour: list[tuple[tuple[int, int, int], list]], alpha: int = 110
             ) -> Image.Image:
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for colour, boxes in boxes_by_colour:
        for box in boxes:
            draw.rectangle(box, fill=colour + (alpha,))
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def _level_legend(image: Image.Image, strides: list[float]) -> Image.Image:
    """``image`` above a white strip that names each level's colour, left to right, wrapping."""
    draw = ImageDraw.Draw(image)
    texts = [f"level {lvl} (stride {s:g})" for lvl, s in enumerate(strides)]
    widths = [LEGEND_ROW + 4 + draw.textlength(t) + 10 for t in texts]
    spots, x, row = [], 0.0, 0
    for w in widths:
        if x and x + w > image.width:
            x, row = 0.0, row + 1
        spots.append((x, row * LEGEND_ROW))
        x += w
    out = Image.new("RGB", (image.width, image.height + (row + 1) * LEGEND_ROW), (255, 255, 255))
    out.paste(image)
    draw = ImageDraw.Draw(out)
    for lvl, ((x, y), text) in enumerate(zip(spots, texts)):
        y += image.height
        draw.rectangle([x + 2, y + 2, x + LEGEND_ROW - 2, y + LEGEND_ROW - 2], fill=PALETTE[lvl % len(PALETTE)])
        draw.text((x + LEGEND_ROW + 2, y + 1), text, fill=(0, 0, 0))
    return out


def _colour_bar(image: Image.Image, top: float) -> Image.Image:
    """``image`` beside a bar of the heat map's colours from 0 (bottom) to ``top`` (its maximum), on white."""
    label = f"{top:.2g}"
    strip = LEGEND_ROW + 6 + int(ImageDraw.Draw(image).textlength(label)) + 4
    out = Image.new("RGB", (image.width + strip, image.height), (255, 255, 255))
    out.paste(image)
    draw = ImageDraw.Draw(out)
    x, span = image.width + 3, max(image.height - 1, 1)
    for y in range(image.height):
        white = round(255 * (1 - HEAT_OPACITY * (1 - y / span)))  # red over white, as _heat lays it
        draw.line([x, y, x + LEGEND_ROW - 1, y], fill=(255, white, white))
    draw.text((x + LEGEND_ROW + 3, 0), label, fill=(0, 0, 0))
    draw.text((x + LEGEND_ROW + 3, image.height - 12), "0", fill=(0, 0, 0))
    return out


def _strides(obs: Observation) -> list[float]:
    return [obs.padded_size[1] / w for _, w in obs.shapes]


def tokens_per_level(obs: Observation, layer: int = 0) -> tuple[list[Image.Image], list[list]]:
    """One panel per level: the cells encoder ``layer`` updated. Returns (panels, boxes per level)."""
    cells = token_cells(updated_tokens(obs, layer), obs.shapes)
    total = [h * w for h, w in obs.shapes]
    panels, drawn = [], []
    for lvl, (shape, c) in enumerate(zip(obs.shapes, cells)):
        boxes = cell_boxes(c, shape, obs.padded_size)
        drawn.append(boxes)
        panel = _overlay(obs.image, [(PALETTE[lvl % len(PALETTE)], boxes)])
        panels.append(caption(panel, f"level {lvl} (stride {_strides(obs)[lvl]:g}): {len(boxes)} of {total[lvl]}"))
    return panels, drawn


def tokens_per_layer(obs: Observation, num_layers: int) -> list[Image.Image]:
    """One panel per encoder layer: every updated cell, coloured by level (coarse drawn first)."""
    panels = []
    for layer in range(num_layers):
        cells = token_cells(updated_tokens(obs, layer), obs.shapes)
        coloured = [(PALETTE[lvl % len(PALETTE)], cell_boxes(cells[lvl], obs.shapes[lvl], obs.padded_size))
                    for lvl in reversed(range(len(obs.shapes)))]
        count = sum(len(c) for c in cells)
        panel = caption(_overlay(obs.image, coloured), f"encoder layer {layer}: {count} tokens updated")
        panels.append(_level_legend(panel, _strides(obs)))
    return panels


def best_query(out: DetectorOutput) -> int:
    """The query with the highest class score on the image."""
    return int(out.logits[0].sigmoid().max(-1).values.argmax())


def decoder_reads(obs: Observation, query: int, layer: int) -> tuple[Image.Image, dict]:
    """Where decoder ``layer`` read for ``query``: deformable sampling points (radius by attention
    weight, colour by level) or, for dense cross-attention, the head-averaged weights as a heat map;
    the query's box at that layer in white."""
    out, (ph, pw) = obs.out, obs.padded_size
    image = obs.image.convert("RGB").copy()
    facts: dict = {"query": query, "layer": layer}
    if out.sampling is not None:
        locations, weights = out.sampling[0][0, layer, query], out.sampling[1][0, layer, query]  # [M, L, P, 2], [M, L, P]
        draw = ImageDraw.Draw(image)
        top = float(weights.max())
        points = []
        for (m, lvl, p), w in zip(torch.cartesian_prod(*(torch.arange(n) for n in weights.shape)).tolist(),
                                  weights.flatten().tolist()):
            x, y = float(locations[m, lvl, p, 0]) * pw, float(locations[m, lvl, p, 1]) * ph
            r = 1.5 + 6.0 * (w / top) ** 0.5
            draw.ellipse([x - r, y - r, x + r, y + r], outline=PALETTE[lvl % len(PALETTE)], width=2)
            points.append({"x": x, "y": y, "level": lvl, "head": m, "weight": w})
        facts["points"] = points
    elif obs.cross_attention:
        weights = obs.cross_attention[layer][:, query].mean(0)  # [S]
        image = _heat(image, weights.view(obs.shapes[0]), obs.padded_size)
        facts["attention_peak_token"] = int(weights.argmax())
    boxes = out.aux[layer].boxes if layer < len(out.aux) else out.boxes
    cx, cy, bw, bh = (boxes[0, query] * torch.tensor([obs.image.width, obs.image.height] * 2)).tolist()
    ImageDraw.Draw(image).rectangle([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], outline=(255, 255, 255),
                                    width=2)
    image = caption(image, f"decoder layer {layer}, query {query}")
    if out.sampling is not None:
        image = _level_legend(image, _strides(obs))
    elif obs.cross_attention:
        image = _colour_bar(image, float(weights.max()))
    return image, facts


def _heat(image: Image.Image, values: Tensor, padded_size: tuple[int, int]) -> Image.Image:
    """``values`` [h, w] on a grid over the padded input, drawn as red (opaque at the maximum) on ``image``."""
    heat = torch.nn.functional.interpolate(values.float()[None, None], size=padded_size, mode="nearest")[0, 0]
    heat = heat[:image.height, :image.width]
    alpha = (255 * HEAT_OPACITY * heat / heat.max().clamp(min=1e-12)).byte().numpy()
    red = Image.new("RGBA", image.size, (255, 0, 0, 0))
    red.putalpha(Image.fromarray(alpha))
    return Image.alpha_composite(image.convert("RGBA"), red).convert("RGB")


def attention_map(obs: Observation) -> Tensor | None:
    """The image's decoder attention map [S] (every decoder layer, query, head and point splatted on
    the tokens), or None for a decoder without sampling points."""
    if obs.out.sampling is None:
        return None
    locations, weights = obs.out.sampling
    return decoder_attention_map(locations[:1].float(), weights[:1].float(), obs.shapes)[0].cpu()


def image_corr(obs: Observation, dam: Tensor, num_layers: int) -> list[float]:
    """Corr of each encoder layer on this image: the DAM's share on the tokens it updated."""
    kept = torch.zeros(num_layers, 1, dam.shape[0], dtype=torch.bool)
    for layer in range(num_layers):
        kept[layer, 0, updated_tokens(obs, layer)] = True
    return corr_ratio(dam[None], kept, obs.padding[None])[:, 0].tolist()


def attention_per_level(obs: Observation, dam: Tensor, layer: int = 0) -> list[Image.Image]:
    """One panel per level: the DAM as a heat map (each level scaled to its own maximum) with the
    tokens encoder ``layer`` updated outlined."""
    cells = token_cells(updated_tokens(obs, layer), obs.shapes)
    valid = dam.masked_fill(obs.padding, 0.0)
    total = float(valid.sum()) or 1.0
    panels = []
    for lvl, (values, shape) in enumerate(zip(valid.split([h * w for h, w in obs.shapes]), obs.shapes)):
        panel = _heat(obs.image.convert("RGB"), values.view(shape), obs.padded_size)
        draw = ImageDraw.Draw(panel)
        for box in cell_boxes(cells[lvl], shape, obs.padded_size):
            draw.rectangle(box, outline=KEPT, width=1)
        share = float(values.sum()) / total
        panel = caption(panel, f"level {lvl}: {share:.0%} of the attention, {len(cells[lvl])} kept")
        panels.append(_colour_bar(panel, float(values.max())))
    return panels


def visualize(model, image, out_dir: str | Path, query: int | None = None, layer: int = -1,
              threshold: float | None = None) -> dict:
    """Write tokens_per_level.png, tokens_per_layer.png, decoder_query.png, dam.png (deformable
    decoders only), detections.png and viz.json (what was drawn; "corr": this image's Corr per
    encoder layer and its mean, None without sampling points; "threshold" the detections passed,
    ``threshold`` or the run's recorded one, else 0.3, and "best_score" of any detection) into
    ``out_dir``; returns the json's content."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    obs = observe(model, image)
    c = model.config
    layer = layer % c.num_decoder_layers
    query = best_query(obs.out) if query is None else query
    if not 0 <= query < obs.out.logits.shape[1]:
        raise SparsedetError(f"query {query} out of range: the model has {obs.out.logits.shape[1]} queries")

    panels, drawn = tokens_per_level(obs)
    grid(panels, columns=len(panels), cell=PANEL).save(out_dir / "tokens_per_level.png")
    grid(tokens_per_layer(obs, c.num_encoder_layers), columns=3, cell=PANEL).save(out_dir / "tokens_per_layer.png")
    picture, reads = decoder_reads(obs, query, layer)
    picture.save(out_dir / "decoder_query.png")
    dam, corr = attention_map(obs), None
    if dam is not None:
        grid(attention_per_level(obs, dam), columns=len(obs.shapes), cell=PANEL).save(out_dir / "dam.png")
        per_layer = image_corr(obs, dam, c.num_encoder_layers)
        corr = {"mean": mean_defined(per_layer), "per_layer": [None if math.isnan(v) else v for v in per_layer]}
    size = torch.tensor([[obs.image.height, obs.image.width]])
    det = model.postprocess.detections(obs.out.logits, obs.out.boxes, size, c.top_k)[0]
    best = float(det["scores"].max()) if det["scores"].numel() else None
    threshold = Threshold.of(threshold, c, VIZ_DEFAULT)
    det = keep_above(det, threshold.value)
    draw_detections(obs.image, det, model.classes).save(out_dir / "detections.png")

    facts = {"image_size": [obs.image.height, obs.image.width], "padded_size": list(obs.padded_size),
             "levels": [list(s) for s in obs.shapes], "strides": _strides(obs),
             "tokens_per_level_layer0": [len(b) for b in drawn], "token_boxes_layer0": drawn,
             "tokens_per_layer": [len(updated_tokens(obs, t)) for t in range(c.num_encoder_layers)],
             "decoder": reads, "detections": len(det["scores"]), "threshold": threshold.value,
             "threshold_origin": threshold.origin, "best_score": best, "corr": corr}
    (out_dir / "viz.json").write_text(json.dumps(facts))
    return facts
