"""The demo's last step: predictions on a few val images drawn beside their ground truth, at the
run's recorded threshold or, without one, at a threshold that shows something even after a short
training run (and says when it was lowered)."""
from __future__ import annotations

from pathlib import Path

import torch

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


def show_predictions(model, val_json: Path, images_root: Path, out: Path, count: int = 8) -> str:
    """Draws ``count`` val images as (ground truth | predictions) pairs into ``out/predictions.png``
    (each image's own drawing and predictions.json in ``out/predictions``); returns what was drawn."""
    coco = read_coco_json(val_json)
    infos = sorted(coco["images"], key=lambda i: i["id"])[:count]
    files = [images_root / info["file_name"] for info in infos]
    dets = model.predict([load_image(f) for f in files], threshold=0.0)
    scores = [d["scores"] for d in dets]
    recorded = model.config.score_threshold
    threshold = recorded if recorded is not None else pick_threshold(scores, wanted=len(files))
    drawn = predict_to_folder(model, files, out / "predictions", threshold, None, max_drawn=DRAWN_PER_IMAGE).drawn
    pairs = []
    for info, file, picture in zip(infos, files, drawn):
        truth = ground_truth(coco, info["id"], list(model.category_ids))
        pairs += [caption(draw_detections(load_image(file), truth, model.classes), "ground truth"),
                  caption(picture, "predictions")]
    grid(pairs).save(out / "predictions.png")
    shown = sum(len(for_display(keep_above(d, threshold), DRAWN_PER_IMAGE)["scores"]) for d in dets)
    origin = "the run's, chosen on its val split" if recorded is not None else "the drawing's"
    message = (f"drew {shown} detections (score > {threshold:.3g}: {origin}; at most {DRAWN_PER_IMAGE} per image "
               f"after class-wise NMS) on {len(files)} val images, each beside its ground truth: "
               f"{out / 'predictions.png'}")
    if recorded is None and threshold < THRESHOLDS[0]:
        best = max((float(s.max()) for s in scores if s.numel()), default=0.0)
        message += (f"\n      only {sum(int((s > THRESHOLDS[0]).sum()) for s in scores)} scored above "
                    f"{THRESHOLDS[0]:g}, so the drawing uses {threshold:g} (best score {best:.2f}); a longer "
                    "run (--minutes) gives surer boxes")
    return message
