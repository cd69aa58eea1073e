"""Detection on a list of image files: batched forwards, results as COCO entries in
``predictions.json`` plus one drawn PNG per image (what ``sparsedet predict`` and the demo write)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from ..data.coco import load_image
from ..engine.evaluator import coco_results
from ..errors import SparsedetError
from .draw import draw_detections

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders searched recursively (sorted)."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise SparsedetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise SparsedetError(f"image or folder not found: {path}")
    return files


def predict_to_folder(model, files: list[Path], out: Path, threshold: float, top_k: int | None,
                      precision: str = "fp32", batch_size: int = 4) -> list:
    """Run ``model`` on files, ``batch_size`` images per forward; write predictions.json and one drawn
    PNG per image. Two worker threads decode the next batch and draw and save the last one while the
    model runs (image decoding and PNG encoding release the GIL). Returns the drawn pictures."""
    if batch_size < 1:
        raise SparsedetError(f"--batch-size must be at least 1, got {batch_size}")
    out.mkdir(parents=True, exist_ok=True)
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]

    def load(chunk: list[Path]) -> list:
        return [load_image(p) for p in chunk]

    def draw(path: Path, image, det):
        picture = draw_detections(image, det, model.classes)
        picture.save(out / f"{path.stem}_pred.png")
        return picture

    entries, drawings = [], []
    with ThreadPoolExecutor(2) as pool, tqdm(total=len(files), desc="predict", disable=len(files) < 4) as bar:
        loading = pool.submit(load, chunks[0]) if chunks else None
        for c, chunk in enumerate(chunks):
            images = loading.result()
            if c + 1 < len(chunks):
                loading = pool.submit(load, chunks[c + 1])
            dets = model.predict(images, threshold=threshold, top_k=top_k, precision=precision, batch_size=batch_size)
            for j, (path, image, det) in enumerate(zip(chunk, images, dets)):
                entries += [{"file_name": str(path), **entry, "score": round(entry["score"], 5)}
                            for entry in coco_results(c * batch_size + j, det, model.category_ids)]
                drawings.append(pool.submit(draw, path, image, det))
            bar.update(len(chunk))
        drawn = [d.result() for d in drawings]
    (out / "predictions.json").write_text(json.dumps(entries, indent=1))
    return drawn
