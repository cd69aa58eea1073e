"""Corr: the share of the decoder's cross-attention that falls on the tokens a sparse encoder kept
(Sparse DETR's check of its scorer; Focus-DETR, Table 3).

For one image and encoder layer t::

    Corr_t = sum of DAM over the tokens layer t kept / sum of DAM over the image's valid tokens

where DAM is Sparse DETR's decoder attention map (``losses.selection.decoder_attention_map``):
every deformable decoder sampling point's attention weight splatted bilinearly onto its level's
token grid, summed over decoder layers, queries, heads and points. "Kept" is the entries layer t
writes back (``LayerSelection.counts``); valid tokens are the non-padding ones. A dataset's
Corr_t is the **mean over images of the per-image ratios** (Sparse DETR logs the per-image ratio's
mean over each batch); ``mean`` is then the mean over encoder layers. Beside it, ``kept_per_layer``
is the mean share of valid tokens each layer kept: the Corr a scorer blind to the decoder would get
on average, so Corr well above it means the scorer keeps what the decoder reads.

A dense encoder keeps every valid token, so its numerator is its denominator: Corr = 1. Models that
cross-attend densely to one level (conditional, sam, decoupled) have no sampling points to build a
DAM from: Corr is undefined there and asking for it is an error (``check_corr``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import SparsedetError
from ..stage_kinds import DECODER_SAMPLING
from ..losses.selection import decoder_attention_map
from ..models.detector import DetectorOutput
from ..models.encoders.scoring import TokenSelection, written


def kept_masks(selection: TokenSelection) -> Tensor:
    """[T, B, S] True on the tokens encoder layer t wrote back for image b (padding never)."""
    masks = []
    for layer in selection.layers:
        mask = torch.zeros_like(selection.padding)
        mask.scatter_(1, layer.indices, written(layer.indices, layer.counts))
        masks.append(mask & ~selection.padding)
    return torch.stack(masks)


def corr_ratio(dam: Tensor, kept: Tensor, padding: Tensor) -> Tensor:
    """DAM mass on the kept tokens over DAM mass on the valid tokens, per image.

    dam: [B, S]; kept: [..., B, S] bool; padding: [B, S] True on padding. Returns [..., B]; NaN for
    an image whose valid tokens received no attention at all (undefined, left out of means).
    """
    valid = dam.masked_fill(padding, 0.0)
    hit = (valid * kept).sum(-1)
    total = valid.sum(-1)
    return torch.where(total > 0, hit / total.clamp(min=torch.finfo(total.dtype).tiny), torch.nan)


def output_corr(out: DetectorOutput, num_encoder_layers: int) -> tuple[Tensor, Tensor]:
    """(Corr, kept share of the valid tokens), each [B, T], of every image and encoder layer of a
    forward run with ``record_sampling=True``."""
    if out.selection is None:  # dense: every valid token kept, numerator = denominator
        ones = torch.ones(out.logits.shape[0], num_encoder_layers)
        return ones, ones
    if out.sampling is None:
        raise SparsedetError("Corr needs the decoder's sampling: run the model with record_sampling=True")
    locations, weights = out.sampling
    selection = out.selection
    dam = decoder_attention_map(locations.float(), weights.float(), selection.shapes)
    kept = kept_masks(selection)
    share = kept.sum(-1) / (~selection.padding).sum(-1).clamp(min=1)
    return corr_ratio(dam, kept, selection.padding).T.cpu(), share.T.float().cpu()


def check_corr(model) -> None:
    """Refuse, before any work, a model whose Corr cannot be computed."""
    if not isinstance(model, nn.Module):
        raise SparsedetError("Corr needs the PyTorch model (a run folder or zoo name): an exported .onnx file "
                             "returns detections only, not where the decoder looked")
    if DECODER_SAMPLING not in model.decoder.provides:
        kind = model.config.kind
        raise SparsedetError(
            f"Corr is undefined for kind={kind!r}: its decoder has no sampling points (it "
            "cross-attends densely), so there is no decoder attention map to compare the kept tokens with; "
            "leave out --corr")


class CorrTracker:
    """Per-image Corr and kept share over an evaluation pass. An image seen twice (a distributed
    sampler's padding) counts once: the last wins."""

    def __init__(self, num_encoder_layers: int):
        self.num_layers = num_encoder_layers
        self.per_image: dict[int, tuple[list[float], list[float]]] = {}

    @classmethod
    def for_model(cls, model) -> "CorrTracker":
        check_corr(model)
        return cls(model.config.num_encoder_layers)

    def update(self, image_ids: list[int], out: DetectorOutput) -> None:
        """Record the Corr of each image of a forward run with ``record_sampling=True``."""
        corr, kept = output_corr(out, self.num_layers)
        for image_id, c, k in zip(image_ids, corr.tolist(), kept.tolist()):
            self.per_image[int(image_id)] = (c, k)

    def detect(self, model, batch, sizes: Tensor, image_ids: list[int]) -> list[dict]:
        """``model.detect`` that also records each image's Corr."""
        out = model(batch, record_sampling=True)
        self.update(image_ids, out)
        return model.postprocess.detections(out.logits, out.boxes, sizes)

    def merge(self, parts: list[dict[int, tuple[list[float], list[float]]]]) -> None:
        """Add the ``per_image`` values other processes collected."""
        for part in parts:
            self.per_image.update(part)

    def result(self) -> dict:
        """{"mean": mean over layers, "per_layer": [T] means over images, "kept_per_layer": [T] mean
        kept share of the valid tokens, "images": images seen}; a layer no image defines is None."""
        rows = list(self.per_image.values())
        per_layer = [mean_defined([c[t] for c, _ in rows]) for t in range(self.num_layers)]
        kept = [mean_defined([k[t] for _, k in rows]) for t in range(self.num_layers)]
        defined = [v for v in per_layer if v is not None]
        return {"mean": mean_defined(defined), "per_layer": per_layer, "kept_per_layer": kept, "images": len(rows)}


def mean_defined(values: list[float]) -> float | None:
    """Mean of the defined (non-NaN) values, None when there are none (JSON has no NaN)."""
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else None


def format_corr(corr: dict) -> str:
    """One line: the mean and each encoder layer's Corr."""
    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    layers = " ".join(show(v) for v in corr["per_layer"])
    kept = " ".join(show(v) for v in corr.get("kept_per_layer", []))
    return (f"Corr    {show(corr['mean'])}  decoder attention on kept tokens, mean over {corr['images']} images; "
            f"per encoder layer: {layers} (kept share of tokens: {kept})")
