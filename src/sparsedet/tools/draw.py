"""Drawing detections on images (PIL only)."""
from __future__ import annotations

from PIL import Image, ImageDraw

from ..ops.boxes import batched_nms

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def draw_detections(image: Image.Image, detections: dict, classes: list[str]) -> Image.Image:
    """Boxes (xyxy pixels) with 'name score' labels (just 'name' without "scores": ground truth),
    coloured by class."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    labels = detections["labels"].tolist()
    scores = detections["scores"].tolist() if "scores" in detections else [None] * len(labels)
    for box, score, label in zip(detections["boxes"].tolist(), scores, labels):
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle(box, outline=colour, width=2)
        text = f"{classes[label] if label < len(classes) else label}" + ("" if score is None else f" {score:.2f}")
        x, y = box[0], max(0, box[1] - 11)
        draw.rectangle([x, y, x + 6 * len(text) + 2, y + 11], fill=colour)
        draw.text((x + 1, y), text, fill=(0, 0, 0))
    return out


def for_display(detections: dict, limit: int, iou: float = 0.5) -> dict:
    """The detections a picture shows: class-wise NMS at ``iou``, then the ``limit`` best (the
    results written beside the picture keep them all)."""
    keep = batched_nms(detections["boxes"], detections["scores"], detections["labels"], iou)[:limit]
    return {k: v[keep] for k, v in detections.items() if k in ("boxes", "scores", "labels")}


def caption(image: Image.Image, text: str) -> Image.Image:
    """A copy of ``image`` with ``text`` white on black in its top-left corner."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    draw.rectangle([0, 0, 6 * len(text) + 4, 12], fill=(0, 0, 0))
    draw.text((2, 0), text, fill=(255, 255, 255))
    return out


def grid(images: list[Image.Image], columns: int = 4, cell: int = 256) -> Image.Image:
    """Tile images (each fitted into a cell x cell square) into one picture."""
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for i, im in enumerate(images):
        im = im.copy()
        im.thumbnail((cell, cell))
        canvas.paste(im, ((i % columns) * cell, (i // columns) * cell))
    return canvas
