"""The demo's last step: predictions on a few val images drawn beside their ground truth, at the
run's recorded threshold or, without one, at a threshold that shows something even after a short
training run (and says when it was lowered). The end-of-training report draws the same pairs."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..data.coco import load_image
from ..data.coco_json import read_coco_json
from ..engine.thresholds import keep_above
from .draw import caption, draw_detections, for_display, grid
from .predict import predict_to_folder

DRAWN_PER_IMAGE = 10  # boxes drawn per image at most, after class-wise NMS: a weak run's boxes stay readable
# Tried in order: the first at which the images get at least one detection each on average.
THRESHOLDS = (0.3, 0.2, 0.1, 0.05)


def ground_truth(coco: dict, image_id: int, category_ids: list[int]) -> dict:
    """One image's boxes as a detections dict without scores (xyxy pixels, column labels)."""
    anns = [a for a in coco["annotations"] if a["image_id"] == image_id and not a.get("iscrowd", 0)]
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).view(-1, 4)
    return {"boxes": boxes, "labels": torch.tensor([category_ids.index(a["category_id"]) for a in anns])}


def pick_threshold(scores: list[torch.Tensor], wanted: int) -> float:
    """The highest of ``THRESHOLDS`` at which at least ``wanted`` detections pass (else the lowest)."""
    for threshold in THRESHOLDS:
        if sum(int((s > threshold).sum()) for s in scores) >= wanted:
            return threshold
    return THRESHOLDS[-1]


def first_images(coco: dict, count: int) -> list[dict]:
    """The image entries of the ``count`` lowest image ids."""
    return sorted(coco["images"], key=lambda i: i["id"])[:count]


def prediction_pairs(model, coco: dict, images_root: Path, count: int = 8) -> tuple[Image.Image, float, list[dict]]:
    """The ``count`` images of lowest id of the COCO dict ``coco`` (files under ``images_root``), each
    drawn as a ("ground truth" | "predictions") pair, tiled into one picture. Predictions scored above
    the run's recorded threshold, else the highest of ``THRESHOLDS`` that shows some
    (`pick_threshold`); at most ``DRAWN_PER_IMAGE`` per image after class-wise NMS. Returns
    (picture, threshold, every image's detections at threshold 0)."""
    infos = first_images(coco, count)
    images = [load_image(images_root / info["file_name"]) for info in infos]
    dets = model.predict(images, threshold=0.0)
    recorded = model.config.score_threshold
    threshold = recorded if recorded is not None else pick_threshold([d["scores"] for d in dets], len(images))
    pairs = []
    for info, image, det in zip(infos, images, dets):
        truth = ground_truth(coco, info["id"], list(model.category_ids))
        shown = for_display(keep_above(det, threshold), DRAWN_PER_IMAGE)
        pairs += [caption(draw_detections(image, truth, model.classes), "ground truth"),
                  caption(draw_detections(image, shown, model.classes), "predictions")]
    return grid(pairs), threshold, dets


def show_predictions(model, val_json: Path, images_root: Path, out: Path, count: int = 8) -> str:
    """Draws ``count`` val images as (ground truth | predictions) pairs into ``out/predictions.png``
    (each image's own drawing and predictions.json in ``out/predictions``); returns what was drawn."""
    coco = read_coco_json(val_json)
    picture, threshold, dets = prediction_pairs(model, coco, images_root, count)
    files = [images_root / info["file_name"] for info in first_images(coco, count)]
    predict_to_folder(model, files, out / "predictions", threshold, None, max_drawn=DRAWN_PER_IMAGE)
    picture.save(out / "predictions.png")
    scores = [d["scores"] for d in dets]
    shown = sum(len(for_display(keep_above(d, threshold), DRAWN_PER_IMAGE)["scores"]) for d in dets)
    recorded = model.config.score_threshold is not None
    origin = "the run's, chosen on its val split" if recorded else "the drawing's"
    message = (f"drew {shown} detections (score > {threshold:.3g}: {origin}; at most {DRAWN_PER_IMAGE} per image "
               f"after class-wise NMS) on {len(files)} val images, each beside its ground truth: "
               f"{out / 'predictions.png'}")
    if not recorded and threshold < THRESHOLDS[0]:
        best = max((float(s.max()) for s in scores if s.numel()), default=0.0)
        message += (f"\n      only {sum(int((s > THRESHOLDS[0]).sum()) for s in scores)} scored above "
                    f"{THRESHOLDS[0]:g}, so the drawing uses {threshold:g} (best score {best:.2f}); a longer "
                    "run (--minutes) gives surer boxes")
    return message
