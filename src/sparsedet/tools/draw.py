"""Drawing detections on images (PIL only)."""
from __future__ import annotations

from PIL import Image, ImageDraw

from ..ops.boxes import batched_nms

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
PAD = 1  # pixels between a label's text and the edge of its background


def draw_detections(image: Image.Image, detections: dict, classes: list[str]) -> Image.Image:
    """Boxes (xyxy pixels) with 'name score' labels (just 'name' without "scores": ground truth),
    coloured by class; labels stay inside the image and off each other where ``place_labels`` can."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    boxes = detections["boxes"].tolist()
    labels = detections["labels"].tolist()
    scores = detections["scores"].tolist() if "scores" in detections else [None] * len(labels)
    texts = [f"{classes[label] if label < len(classes) else label}" + ("" if score is None else f" {score:.2f}")
             for label, score in zip(labels, scores)]
    extents = [draw.textbbox((0, 0), text) for text in texts]  # (left, top, right, bottom) of the glyphs
    sizes = [(r - left + 2 * PAD, b - t + 2 * PAD) for left, t, r, b in extents]
    for box, label in zip(boxes, labels):
        draw.rectangle(box, outline=PALETTE[label % len(PALETTE)], width=2)
    # Labels after every box: no later box's outline crosses an earlier label.
    for (x, y), (w, h), (left, top, _, _), text, label in zip(place_labels(boxes, sizes, out.size), sizes, extents,
                                                             texts, labels):
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=PALETTE[label % len(PALETTE)])
        draw.text((x + PAD - left, y + PAD - top), text, fill=(0, 0, 0))
    return out


def place_labels(boxes: list[list[float]], sizes: list[tuple[float, float]],
                 image_size: tuple[int, int]) -> list[tuple[float, float]]:
    """Top-left corner of each box's label. ``boxes``: xyxy pixels; ``sizes``: each label's (width,
    height); ``image_size``: (width, height). Each label tries four spots at its box's left edge,
    moved inside the image: above the box, inside its top, below it, inside its bottom; it takes the
    first that overlaps no earlier label, else the one that overlaps them least (earlier boxes, the
    higher-scoring ones, choose first)."""
    width, height = image_size
    placed: list[tuple[float, float, float, float]] = []
    for (x0, y0, _, y1), (w, h) in zip(boxes, sizes):
        x = min(max(x0, 0), max(width - w, 0))
        spots = [(x, min(max(y, 0), max(height - h, 0))) for y in (y0 - h, y0, y1, y1 - h)]
        best = min(spots, key=lambda s: sum(_overlap((s[0], s[1], s[0] + w, s[1] + h), r) for r in placed))
        placed.append((best[0], best[1], best[0] + w, best[1] + h))
    return [(x, y) for x, y, _, _ in placed]


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Area two xyxy rectangles share."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


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
