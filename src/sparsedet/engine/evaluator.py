"""COCO box AP with pycocotools semantics (computed by faster-coco-eval), per-class AP, results json.

Detections in the COCO results format are dicts ``{"image_id", "category_id", "bbox": [x, y, w, h]
in original image pixels, "score"}``. Metrics are fractions in [0, 1]; -1 means undefined (no ground
truth in that area range or category), exactly as pycocotools' ``stats``.
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.batch import collate
from ..data.categories import column_categories
from ..data.sampler import shape_batches
from ..data.coco_json import validate_coco
from ..errors import SparsedetError
from ..jsonfile import read_json
from ..filewrite import atomic_write
from .corr import CorrTracker
from .distributed import Context, gather_objects
from .precision import inference_precision, resolve_precision

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_STAT_MEANINGS = (
    "IoU=0.50:0.95  area=all     maxDets=100",
    "IoU=0.50       area=all     maxDets=100",
    "IoU=0.75       area=all     maxDets=100",
    "IoU=0.50:0.95  area=small   maxDets=100",
    "IoU=0.50:0.95  area=medium  maxDets=100",
    "IoU=0.50:0.95  area=large   maxDets=100",
    "IoU=0.50:0.95  area=all     maxDets=1",
    "IoU=0.50:0.95  area=all     maxDets=10",
    "IoU=0.50:0.95  area=all     maxDets=100",
    "IoU=0.50:0.95  area=small   maxDets=100",
    "IoU=0.50:0.95  area=medium  maxDets=100",
    "IoU=0.50:0.95  area=large   maxDets=100",
)
_RESULT_KEYS = ("image_id", "category_id", "bbox", "score")
_RESULTS_HINT = 'each detection needs "image_id", "category_id", "bbox": [x, y, w, h] and "score"'


def load_results(path: str | Path) -> list[dict]:
    """Read a COCO results json (a list of detections, bbox xywh in pixels)."""
    data = read_json(path, "results")
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise SparsedetError(f"results file {path} must hold a JSON list of detections; {_RESULTS_HINT}")
    return data


def save_results(results: list[dict], path: str | Path) -> None:
    """Write detections in the COCO results format (the inverse of `load_results`), atomically."""
    atomic_write(Path(path), lambda p: Path(p).write_text(json.dumps(results), encoding="utf-8"),
                 "detections (COCO results)")


def coco_results(image_id: int, det: dict, category_ids: list[int | None],
                 classes: list[str] | None = None) -> list[dict]:
    """One image's detections ("boxes" [n, 4] xyxy in original pixels, "scores" [n], "labels" [n]
    as column indices) as COCO results entries: bbox xywh rounded to 1/1000 pixel (far below what
    changes an IoU decision; keeps results files small), the column's original category id and,
    when ``classes`` (a name per column) is given, its ``"category_name"``. Columns without a
    category (None) are dropped."""
    boxes = det["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    labels = [int(label) for label in det["labels"].detach().cpu().reshape(-1).tolist()]
    scores = det["scores"].detach().cpu().reshape(-1).tolist()
    return [{"image_id": image_id, "category_id": category_ids[label],
             **({"category_name": classes[label]} if classes is not None else {}),
             "bbox": [round(v, 3) for v in box], "score": score}
            for box, score, label in zip(xywh, scores, labels) if category_ids[label] is not None]


def _ground_truth(gt: dict | str | Path) -> dict:
    """A private, evaluator-ready copy of the ground truth (the caller's dict is never touched)."""
    if isinstance(gt, (str, Path)):
        data = validate_coco(read_json(gt, "ground-truth"), f"ground-truth file {gt}")
    else:
        data = validate_coco(gt, "ground truth")
    data = {k: copy.deepcopy(data[k]) for k in ("images", "annotations", "categories")}
    for new_id, ann in enumerate(data["annotations"], start=1):
        # The evaluator uses annotation id 0 as "unmatched" and keys by id: renumber so that
        # 0-based or duplicated ids in a dataset cannot skew the matching.
        ann["id"] = new_id
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        ann.setdefault("iscrowd", 0)
    return data


def _numbers(det: dict, i: int) -> tuple[list[float], float]:
    """Detection `i`'s bbox and score as floats, or the error that names what is wrong with them."""
    try:
        bbox, score = [float(v) for v in det["bbox"]], float(det["score"])
    except (TypeError, ValueError):
        bbox, score = [math.nan], math.nan
    if not all(map(math.isfinite, [*bbox, score])):
        raise SparsedetError(
            f"detection {i} has a non-finite or non-numeric bbox/score "
            f"(bbox={det['bbox']!r}, score={det['score']!r}); {_RESULTS_HINT}"
        )
    if len(bbox) != 4 or bbox[2] < 0 or bbox[3] < 0:
        raise SparsedetError(
            f"detection {i} has bbox {det['bbox']!r}; it must be [x, y, width, height] in pixels "
            "with width, height >= 0 (convert xyxy boxes to xywh)"
        )
    return bbox, score


def _clean_detections(detections: Iterable[dict], image_ids: dict, category_ids: dict) -> list[dict]:
    """Validated copies holding only the four result keys (extra keys such as file_name are dropped).

    `image_ids` / `category_ids` map each ground-truth id to itself, so that an equal value of
    another type (3.0 for 3) is replaced by the ground truth's own id.
    """
    clean, bad_images, bad_categories = [], {}, {}
    for i, det in enumerate(detections):
        if not isinstance(det, dict):
            raise SparsedetError(f"detection {i} is a {type(det).__name__}, not a dict; {_RESULTS_HINT}")
        missing = [k for k in _RESULT_KEYS if k not in det]
        if missing:
            raise SparsedetError(f"detection {i} is missing {', '.join(map(repr, missing))}; {_RESULTS_HINT}")
        bbox, score = _numbers(det, i)
        image_id, category_id = det["image_id"], det["category_id"]
        if image_id not in image_ids:
            bad_images.setdefault(image_id, i)
        if category_id not in category_ids:
            bad_categories[category_id] = bad_categories.get(category_id, 0) + 1
        if not bad_images and not bad_categories:
            clean.append({"image_id": image_ids[image_id], "category_id": category_ids[category_id],
                          "bbox": bbox, "score": score})
    if bad_categories:
        counts = ", ".join(f"{c!r} (in {n} detection{'s' * (n > 1)})" for c, n in list(bad_categories.items())[:5])
        counts += f" and {len(bad_categories) - 5} more" if len(bad_categories) > 5 else ""
        raise SparsedetError(
            f"category_id {counts} {'is' if len(bad_categories) == 1 else 'are'} not in the ground truth "
            f"(known ids: {sorted(category_ids)}); "
            "the model's classes must match the dataset's categories, so evaluate with a model "
            "trained on this dataset or fix its class list"
        )
    if bad_images:
        image_id, i = next(iter(bad_images.items()))
        raise SparsedetError(
            f"detection {i} is on image_id {image_id!r}, which is not in the ground truth "
            f"({len(bad_images)} unknown image ids in all); evaluate against the annotation file "
            "the detections were made for"
        )
    return clean


def _undefined_mean(values: np.ndarray) -> float:
    """Mean over defined entries (> -1), or -1 when there are none, as pycocotools summarises."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else -1.0


def _accumulate(gt: dict | str | Path, detections: list[dict], quiet: bool = True) -> tuple[COCOeval_faster, dict]:
    """The evaluated, accumulated and summarised COCOeval of ``detections`` against ``gt``, and the
    private ground-truth copy it scored against."""
    data = _ground_truth(gt)
    image_ids = {img["id"]: img["id"] for img in data["images"]}
    category_ids = {cat["id"]: cat["id"] for cat in data["categories"]}
    results = _clean_detections(detections, image_ids, category_ids)

    say = print if not quiet else (lambda *args, **kwargs: None)
    coco_gt = COCO(data, print_function=say)
    coco_dt = coco_gt.loadRes(results)
    evaluation = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=say)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return evaluation, data


def evaluate_coco(
    gt: dict | str | Path, detections: list[dict], *, per_class: bool = True, quiet: bool = True
) -> dict:
    """COCO box metrics of `detections` (results format, xywh pixels) against ground truth `gt`.

    `gt` is a COCO dict or a path to one. Returns the 12 pycocotools ``stats`` under `STAT_NAMES`
    and, when `per_class`, ``"per_class": {category name: AP@[.50:.95]}`` (-1 = no ground truth).
    """
    evaluation, data = _accumulate(gt, detections, quiet)
    metrics: dict = {name: float(v) for name, v in zip(STAT_NAMES, evaluation.stats[: len(STAT_NAMES)])}
    if per_class:
        precision = np.asarray(evaluation.eval["precision"])  # [IoU, recall, class, area, maxDets]
        names = _class_names(data, evaluation.params.catIds)
        metrics["per_class"] = {name: _undefined_mean(precision[:, :, k, 0, -1]) for k, name in enumerate(names)}
    return metrics


def _class_names(data: dict, category_ids: list[int]) -> list[str]:
    """The category names in ``category_ids`` order; a name two categories share gets its id: "car (3)"."""
    names = {cat["id"]: str(cat.get("name", cat["id"])) for cat in data["categories"]}
    repeated = {name for name, n in Counter(names.values()).items() if n > 1}
    return [f"{names[c]} ({c})" if names[c] in repeated else names[c] for c in category_ids]


@dataclass
class PrecisionRecall:
    """Interpolated precision at COCO's 101 recall points, area "all", at most 100 detections per image.

    ``recall`` [R]; ``precision`` [T, R, K] at ``iou_thresholds`` [T] (0.50, 0.55, ..., 0.95) for
    ``classes`` [K] (category names in id order); -1 for a class without ground truth.
    """

    recall: np.ndarray
    iou_thresholds: np.ndarray
    precision: np.ndarray
    classes: list[str]

    def curves(self, iou: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(per-class precision [K, R], its mean over the classes with ground truth [R]) at the IoU
        threshold ``iou`` (one of ``iou_thresholds``), or averaged over all of them when None, whose
        mean over recall is AP@[.50:.95]. Classes without ground truth are NaN rows."""
        if iou is None:
            chosen = self.precision
        else:
            hits = np.flatnonzero(np.isclose(self.iou_thresholds, iou))
            if not hits.size:
                raise SparsedetError(f"IoU {iou} is not one of the evaluated thresholds "
                                     f"{[round(float(t), 2) for t in self.iou_thresholds]}")
            chosen = self.precision[hits[:1]]
        defined = (chosen > -1).all(axis=(0, 1))  # [K]: the class has ground truth
        per_class = np.full((chosen.shape[2], chosen.shape[1]), np.nan)
        per_class[defined] = chosen[:, :, defined].mean(axis=0).T
        overall = per_class[defined].mean(axis=0) if defined.any() else np.full(chosen.shape[1], np.nan)
        return per_class, overall


def precision_recall(gt: dict | str | Path, detections: list[dict]) -> PrecisionRecall:
    """The precision-recall curves behind `evaluate_coco`'s AP (same ground truth, same detections)."""
    evaluation, data = _accumulate(gt, detections)
    params = evaluation.params
    precision = np.asarray(evaluation.eval["precision"])[:, :, :, 0, -1]
    return PrecisionRecall(np.asarray(params.recThrs, dtype=float), np.asarray(params.iouThrs, dtype=float),
                           precision, _class_names(data, params.catIds))


class Evaluator:
    """Collects a model's detections over an evaluation pass and scores them with `evaluate_coco`.

    `category_ids[i]` is the original COCO category id of the model's label ``i``, or None for a
    column that predicts no category (its detections are dropped; see ``data.categories``).
    An image updated twice (e.g. the padding a distributed sampler adds) counts once: the last wins.
    """

    def __init__(self, gt: dict, category_ids: list[int | None]):
        self.gt = gt
        known = {cat["id"] for cat in gt.get("categories", [])}
        unknown = [c for c in category_ids if c is not None and c not in known]
        if unknown:
            raise SparsedetError(
                f"the model's category ids {unknown} are not in the ground truth (known ids: {sorted(known)}); "
                "the model's classes must match the dataset's categories"
            )
        self.category_ids = list(category_ids)
        self._image_ids = {img["id"] for img in gt.get("images", [])}
        self.per_image: dict[int, list[dict]] = {}

    def update(self, image_ids: list[int], detections: list[dict]) -> None:
        """Add one batch. Each detection: "boxes" [n,4] xyxy in original pixels, "scores" [n], "labels" [n]."""
        if len(image_ids) != len(detections):
            raise ValueError(f"{len(image_ids)} image ids for {len(detections)} detection dicts")
        for image_id, det in zip(image_ids, detections):
            image_id = int(image_id)
            if image_id not in self._image_ids:
                raise SparsedetError(f"image_id {image_id} is not in the ground truth; the data loader and "
                                     "the annotation file must describe the same images")
            labels = det["labels"].reshape(-1)
            bad = labels[(labels < 0) | (labels >= len(self.category_ids))].tolist()
            if bad:
                raise SparsedetError(
                    f"label {bad[0]} on image {image_id} is outside the model's {len(self.category_ids)} classes; "
                    "the model's classes must match the dataset's categories"
                )
            self.per_image[image_id] = coco_results(image_id, det, self.category_ids)

    def results(self) -> list[dict]:
        """All detections so far in the COCO results format (xywh pixels, original category ids)."""
        return [entry for entries in self.per_image.values() for entry in entries]

    def merge(self, parts: list[dict[int, list[dict]]]) -> None:
        """Add the ``per_image`` detections other evaluators collected (other processes' shares)."""
        for part in parts:
            self.per_image.update(part)

    def compute(self, per_class: bool = True) -> dict:
        """COCO metrics of everything collected so far (see `evaluate_coco`)."""
        return evaluate_coco(self.gt, self.results(), per_class=per_class)


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 8, progress: bool = True,
             ctx: Context = Context(), precision: str = "fp32", corr: bool = False) -> tuple[dict, list[dict]]:
    """COCO metrics of ``model`` on ``dataset`` (a ``data.protocol.DetectionDataset``; boxes rescaled
    to each file's original size) and the detections in the COCO results format, the model run in ``precision``
    ("fp32", "bf16" or "fp16" on CUDA). Under torchrun every process evaluates its share of the
    images and every process gets the metrics of all of them. ``model`` may also be an
    ``OnnxDetector`` (an exported file, fp32 only). ``corr``: also ``metrics["corr"]``, the share of the
    decoder's attention on the tokens the encoder kept (``engine.corr``; PyTorch multi-level models)."""
    in_torch = isinstance(model, torch.nn.Module)
    device = next(model.parameters()).device if in_torch else torch.device("cpu")
    dtype = resolve_precision(precision, device)
    if not in_torch:
        model.check_precision(precision)
    tracker = CorrTracker.for_model(model) if corr else None  # an undefined Corr fails before the pass
    m = model.config
    evaluator = Evaluator(dataset.coco, column_categories(m.classes, m.category_ids) or dataset.category_ids)
    shard = range(ctx.rank, len(dataset), ctx.world_size)
    # Batches of like shapes: less padding to compute (the results do not depend on it).
    sizes = getattr(dataset, "image_sizes", None)
    batches = (shape_batches(sizes, shard, batch_size) if sizes is not None else
               [list(shard[start:start + batch_size]) for start in range(0, len(shard), batch_size)])
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate)
    with inference_precision(model, dtype) if in_torch else nullcontext():
        for batch, targets, _ in tqdm(loader, desc="eval", disable=not (progress and ctx.is_main), leave=False):
            if batch is None:
                continue
            sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
            ids = [t["image_id"] for t in targets]
            dets = (tracker.detect(model, batch.to(device), sizes, ids) if tracker is not None else
                    model.detect(batch.to(device), sizes))
            evaluator.update(ids, [{k: v.cpu() for k, v in d.items()} for d in dets])
    if ctx.distributed:
        evaluator.merge(gather_objects(evaluator.per_image, ctx))
        if tracker is not None:
            tracker.merge(gather_objects(tracker.per_image, ctx))
    metrics = evaluator.compute()
    if tracker is not None:
        metrics["corr"] = tracker.result()
    return metrics, evaluator.results()


def format_metrics(metrics: dict) -> str:
    """An aligned terminal table: the 12 COCO stats, then per-class AP. Undefined (-1) shows as n/a."""

    def show(value: float) -> str:
        return "  n/a" if value < 0 else f"{value:.3f}"

    lines = [f"{'metric':<6}  {'value':>5}  setting"]
    lines += [f"{name:<6}  {show(metrics[name]):>5}  {meaning}"
              for name, meaning in zip(STAT_NAMES, _STAT_MEANINGS) if name in metrics]
    per_class = metrics.get("per_class") or {}
    if per_class:
        width = max(len("class"), *(len(name) for name in per_class))
        lines += ["", f"{'class':<{width}}  {'AP':>5}"]
        lines += [f"{name:<{width}}  {show(ap):>5}" for name, ap in per_class.items()]
    return "\n".join(lines)
