"""A deterministic shapes dataset written as COCO json + PNG images.

Five classes (circle, square, triangle, cross, ring) with non-contiguous category
ids, hue-jittered fills (colour helps but is not decisive: hues of neighbouring
classes overlap and some objects get a random hue), textured backgrounds, 1-8
objects per image with partial occlusion. A box is the extent of the visible part of
a shape; placements that would hide more than 70% of an earlier shape are rejected,
so every drawn shape is annotated.

Object sizes run from 8 px to half the shorter image side. The log-size is drawn with
a density rising towards large sizes (median about 57 px at 256 px images, a quarter
of objects under 32 px) so that a small detector learns quickly yet small objects
still appear.

All randomness comes from ``numpy.random.Generator`` seeded per split: the same seed
gives byte-identical files.
"""
from __future__ import annotations

import colorsys
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import SparsedetError

CATEGORIES = [(1, "circle"), (2, "square"), (3, "triangle"), (5, "cross"), (7, "ring")]
BASE_HUE = {"circle": 0.0, "square": 0.6, "triangle": 0.15, "cross": 0.35, "ring": 0.8}
HUE_JITTER = 0.12  # classes are 0.2 apart in hue: neighbours overlap
RANDOM_HUE_P = 0.15
MIN_OBJECT = 8
MIN_VISIBLE = 0.3  # fraction of a shape that must stay visible
MIN_PIXELS = 12


def _polygon(kind: str, cx: float, cy: float, sx: float, sy: float, angle: float) -> list[list[tuple]]:
    """Outline(s) of a shape of nominal size (sx, sy) centred at (cx, cy), rotated by angle.

    The first polygon is filled, any further ones are cut out (the ring's hole).
    """
    def place(points: np.ndarray) -> list[tuple]:
        c, s = math.cos(angle), math.sin(angle)
        xs = cx + (points[:, 0] * c - points[:, 1] * s) * sx / 2
        ys = cy + (points[:, 0] * s + points[:, 1] * c) * sy / 2
        return list(zip(xs.tolist(), ys.tolist()))

    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], axis=1)
    if kind in ("circle", "ring"):
        return [place(circle)] + ([place(circle * 0.5)] if kind == "ring" else [])
    if kind == "square":
        return [place(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float))]
    if kind == "triangle":
        a = -math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        return [place(np.stack([np.cos(a), np.sin(a)], axis=1))]
    k = 0.34  # cross: arm half-thickness relative to half-size
    cross = [(-k, -1), (k, -1), (k, -k), (1, -k), (1, k), (k, k), (k, 1), (-k, 1), (-k, k), (-1, k),
             (-1, -k), (-k, -k)]
    return [place(np.array(cross, dtype=float))]


def _mask(polygons: list[list[tuple]], height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for i, poly in enumerate(polygons):
        draw.polygon(poly, fill=255 if i == 0 else 0)
    return np.asarray(canvas) > 0


def _colour(rng: np.random.Generator, hue: float, sat: tuple[float, float],
            val: tuple[float, float]) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(*sat), rng.uniform(*val))
    return np.array(rgb, dtype=np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-saturation gradient, plus stripes or blotches half of the time. Float [H, W, 3] in [0, 1]."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    low_sat, any_val = (0.0, 0.35), (0.2, 0.9)
    c1, c2 = _colour(rng, rng.random(), low_sat, any_val), _colour(rng, rng.random(), low_sat, any_val)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = xx * math.cos(angle) + yy * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    bg = c1 + (c2 - c1) * ramp[..., None]
    texture = rng.integers(3)
    if texture == 0:  # stripes
        phi, period = rng.uniform(0, math.pi), rng.uniform(6, 40)
        wave = np.sin(2 * math.pi * (xx * math.cos(phi) + yy * math.sin(phi)) / period + rng.uniform(0, 6.3))
        bg = bg + rng.uniform(0.04, 0.12) * wave[..., None] * rng.choice([-1.0, 1.0], size=3)
    elif texture == 1:  # blotches: a coarse random grid upsampled, desaturated
        cells = int(rng.integers(3, 11))
        grid = Image.fromarray((rng.random((cells, cells, 3)) * 255).astype(np.uint8))
        blot = np.asarray(grid.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) / 255
        blot = blot.mean(axis=2, keepdims=True) * 0.7 + blot * 0.3
        mix = rng.uniform(0.2, 0.5)
        bg = bg * (1 - mix) + blot * mix
    return bg.astype(np.float32)


def _image_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(height, width): square most of the time, else one side shortened by up to 25%."""
    height = width = size
    if rng.random() < 0.3:
        short = int(round(size * rng.uniform(0.75, 1.0)))
        height, width = (short, size) if rng.random() < 0.5 else (size, short)
    return height, width


def _render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, list[int], int]]]:
    """One image (uint8 [H, W, 3]) and its objects as (class index, [x, y, w, h], visible pixels)."""
    height, width = _image_size(rng, size)
    image = _background(rng, height, width)
    owner = np.full((height, width), -1, dtype=np.int16)
    kinds: list[int] = []
    visible: list[int] = []  # pixels of each shape still visible
    areas: list[int] = []  # full pixel area of each shape
    wanted = int(rng.integers(1, 9))
    max_object = min(height, width) / 2
    for _ in range(wanted * 6):
        if len(kinds) == wanted:
            break
        kind = int(rng.integers(len(CATEGORIES)))
        name = CATEGORIES[kind][1]
        span = math.log(max_object / MIN_OBJECT)
        extent = MIN_OBJECT * math.exp(span * math.sqrt(rng.random()))
        aspect = math.exp(rng.uniform(-0.2, 0.2))
        sx, sy = extent * aspect, extent / aspect
        angle = rng.uniform(-0.5, 0.5) if name in ("square", "cross") else rng.uniform(0, 2 * math.pi)
        # Keep the whole shape inside the image (rotated corners reach sqrt(2) further).
        reach = 0.5 * max(sx, sy) * (math.sqrt(2) if name in ("square", "cross") else 1.0)
        if 2 * reach >= min(height, width):
            continue
        cx, cy = rng.uniform(reach, width - reach), rng.uniform(reach, height - reach)
        mask = _mask(_polygon(name, cx, cy, sx, sy, angle), height, width)
        area = int(mask.sum())
        if area < MIN_PIXELS:
            continue
        covered = owner[mask]
        hidden = np.bincount(covered[covered >= 0], minlength=len(kinds))
        after = np.asarray(visible, dtype=np.int64) - hidden
        if np.any(after < MIN_VISIBLE * np.asarray(areas)):
            continue
        hue = BASE_HUE[name] + rng.uniform(-HUE_JITTER, HUE_JITTER)
        hue = rng.random() if rng.random() < RANDOM_HUE_P else hue
        colour = _colour(rng, hue, (0.5, 1.0), (0.5, 1.0))
        # Gentle shading across the shape so fills are not flat.
        ys, xs = np.nonzero(mask)
        tilt = rng.uniform(0, 2 * math.pi)
        shade = 1.0 + 0.15 * ((xs - cx) * math.cos(tilt) + (ys - cy) * math.sin(tilt)) / max(sx, sy)
        image[ys, xs] = colour[None, :] * shade[:, None].astype(np.float32)
        owner[mask] = len(kinds)
        visible = [*after.tolist(), area]
        areas.append(area)
        kinds.append(kind)
    noise = rng.normal(0.0, rng.uniform(0.01, 0.03), size=image.shape).astype(np.float32)
    pixels = (np.clip(image + noise, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    objects = []
    for k, kind in enumerate(kinds):
        ys, xs = np.nonzero(owner == k)
        x0, y0 = int(xs.min()), int(ys.min())
        objects.append((kind, [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], int(xs.size)))
    return pixels, objects


def _write_split(out_dir: Path, split: str, count: int, size: int, seed: int, split_index: int) -> dict:
    rng = np.random.default_rng([seed, split_index])
    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        pixels, objects = _render(rng, size)
        file_name = f"images/{split}/{image_id:06d}.png"
        # Fast compression: the pixel noise makes higher levels slow for little gain.
        Image.fromarray(pixels).save(out_dir / file_name, format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": file_name,
                       "width": pixels.shape[1], "height": pixels.shape[0]})
        for kind, bbox, area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": CATEGORIES[kind][0], "bbox": bbox,
                                "area": area, "iscrowd": 0})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": cid, "name": name} for cid, name in CATEGORIES]}
    (out_dir / f"{split}.json").write_text(json.dumps(data))
    return data


def write_synthetic(out_dir: str | Path, n_train: int = 400, n_val: int = 100, size: int = 256,
                    seed: int = 0, format: str = "coco") -> dict:
    """Write ``out_dir/{train,val}.json`` and ``out_dir/images/{train,val}/*.png``.

    File names in the json are relative to ``out_dir``. Images are ``size`` x ``size``
    pixels, or have one side up to 25% shorter. Returns a summary with the json paths,
    class names and image/annotation counts per split. ``format="yolo"`` also writes a
    YOLO copy of both splits to ``out_dir/yolo/`` (its data.yaml path is ``summary["yolo"]``).
    """
    # Named as the API and `sparsedet synth` spell them: both reach here.
    for name, flag, value, low in (("n_train", "--train", n_train, 1), ("n_val", "--val", n_val, 0),
                                   ("size", "--size", size, 4 * MIN_OBJECT)):
        if value < low:
            raise SparsedetError(f"{name} (synth {flag}) must be at least {low}, got {value}")
    if format not in ("coco", "yolo"):
        raise SparsedetError(f"format (synth --format) must be 'coco' or 'yolo', not {format!r}")
    out_dir = Path(out_dir)
    summary: dict = {"root": str(out_dir), "classes": [name for _, name in CATEGORIES],
                     "num_images": {}, "num_annotations": {}}
    for split_index, (split, count) in enumerate((("train", n_train), ("val", n_val))):
        data = _write_split(out_dir, split, count, size, seed, split_index)
        summary[split] = str(out_dir / f"{split}.json")
        summary["num_images"][split] = len(data["images"])
        summary["num_annotations"][split] = len(data["annotations"])
    if format == "yolo":
        from .yolo import write_yolo  # lazily: it pulls in torch via the COCO dataset
        for split in ("train", "val"):
            summary["yolo"] = str(write_yolo(out_dir / f"{split}.json", out_dir / "yolo"))
    return summary
