"""Detection on image files, videos and streams: batched forwards, results as COCO entries in
``predictions.json``, one drawn PNG per image, one drawn video per video, and optionally YOLO label
files (what ``sparsedet predict`` and the demo write)."""
from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from ..data.categories import column_categories
from ..data.coco import load_image
from ..engine.evaluator import coco_results
from ..engine.thresholds import PREDICT_DEFAULT, Threshold, keep_above
from ..errors import SparsedetError
from ..filewrite import atomic_write
from .draw import draw_detections, for_display
from .video import VIDEO_SUFFIXES, VideoReader, VideoWriter, is_stream, require_av, source_name

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def collect_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """(image files, videos) named by ``inputs``: files as given (a video by its suffix, see
    ``VIDEO_SUFFIXES``), folders searched recursively (sorted), stream URLs and webcams (``0``,
    ``/dev/video0``) as videos."""
    images, videos = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
            if not found:
                raise SparsedetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) or videos "
                                     f"({', '.join(sorted(VIDEO_SUFFIXES))}) in folder {path}")
            images += [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
            videos += [str(p) for p in found if p.suffix.lower() in VIDEO_SUFFIXES]
        elif path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
            videos.append(item)
        elif path.is_file():
            images.append(path)
        elif is_stream(item):
            videos.append(item)
        else:
            raise SparsedetError(f"image, video or folder not found: {path}")
    return images, videos


class _Recorder:
    """Turns one image's detections into predictions.json entries and, with ``save_txt``, a YOLO
    label file ``out/labels/NAME.txt``: one line ``class cx cy w h score`` per detection, the centre
    and size as fractions of the image width and height, ``class`` the detection's index among the
    model's classes that predict a category (unused columns skipped). For a model trained on a YOLO
    dataset whose ``names`` are a list, that is its class index (``data/yolo.py`` reads category ids
    as class indices); for a COCO dataset, the index ``write_yolo`` gives the category. ``data/yolo.py``
    reads such files (the score column is ignored)."""

    def __init__(self, model, out: Path, save_txt: bool):
        self.classes = model.classes
        self.category_ids = column_categories(model.classes, model.category_ids)
        used = [c for c, cid in enumerate(self.category_ids) if cid is not None]
        self.yolo_class = {column: k for k, column in enumerate(used)}
        self.labels = out / "labels" if save_txt else None
        if self.labels is not None:
            self.labels.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict] = []
        self.images = 0  # images and frames recorded so far: the next one's image_id

    def add(self, det: dict, size: tuple[int, int], name: str, where: dict) -> None:
        """Record ``det`` (as ``predict`` returns it) of the next image, of (width, height) ``size``;
        ``where`` leads each entry (``file_name``, for a video also ``frame``)."""
        self.entries += [{**where, **entry, "score": round(entry["score"], 5)}
                         for entry in coco_results(self.images, det, self.category_ids, self.classes)]
        self.images += 1
        if self.labels is not None:
            width, height = size
            lines = []
            for (x1, y1, x2, y2), score, label in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                                      det["labels"].tolist()):
                if label in self.yolo_class:
                    box = ((x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height)
                    lines.append(" ".join([str(self.yolo_class[label]), *(f"{v:.6f}" for v in box), f"{score:.5f}"]))
            text = "".join(line + "\n" for line in lines)
            atomic_write(self.labels / f"{name}.txt", lambda p: Path(p).write_text(text), "YOLO labels")


@dataclass
class Predicted:
    """What `predict_to_folder` did: the score threshold, the drawn pictures of the image files, the
    images and frames seen and the detections that passed, the best score of any detection (None:
    the model returned none), the seconds the image files took in all and in the model's forwards,
    and the unreadable files it skipped."""

    threshold: Threshold
    drawn: list = field(default_factory=list)
    images: int = 0
    detections: int = 0
    best_score: float | None = None
    seconds: float = 0.0
    model_seconds: float = 0.0
    skipped: list[Path] = field(default_factory=list)

    def keep(self, det: dict) -> dict:
        """Count one image's detections (as ``predict`` returns them at threshold 0); those that pass."""
        if det["scores"].numel():
            self.best_score = max(self.best_score or 0.0, float(det["scores"].max()))
        det = keep_above(det, self.threshold.value)
        self.images, self.detections = self.images + 1, self.detections + len(det["scores"])
        return det

    def total(self) -> str:
        """One line: images and frames, detections and times."""
        per_image = 1000 * self.model_seconds / max(self.images, 1)
        return (f"{self.images} images, {self.detections} detections in {self.seconds:.1f} s "
                f"({per_image:.1f} ms per image in the model)")


def describe_detections(det: dict, classes: list[str]) -> str:
    """The count per class of one image's detections, in class order: "2 circle, 1 square"."""
    counts = Counter(det["labels"].tolist())
    return ", ".join(f"{counts[c]} {classes[c]}" for c in sorted(counts)) or "no detections"


def predict_to_folder(model, files: list[Path], out: Path, threshold: float | None, top_k: int | None,
                      precision: str = "fp32", batch_size: int = 4, *, videos: list[str] = (),
                      save_txt: bool = False, max_frames: int | None = None,
                      max_drawn: int | None = None, verbose: bool = False) -> Predicted:
    """Run ``model`` on image ``files`` and ``videos``, ``batch_size`` images or frames per forward;
    write predictions.json, one drawn PNG per image, one drawn ``NAME_pred.mp4`` per video and, with
    ``save_txt``, YOLO label files (see `_Recorder`). Entries of a video frame carry ``frame`` (from
    0) beside ``file_name``; image ids count the images, then the frames. ``threshold``: minimum
    score; None: the run's recorded one, else 0.5. ``max_frames`` stops each video there (a live
    stream also stops at Ctrl-C); ``max_drawn``: at most this many boxes drawn per image, after
    class-wise NMS (the results keep them all). Two worker threads decode the next batch of images
    and draw and save the last one while the model runs (image decoding and PNG encoding release
    the GIL). An unreadable image file is skipped with a warning (SparsedetError when no file reads
    and there is no video). ``verbose``: a line per image, its detections counted by class and its
    share of its batch's forward in ms."""
    if batch_size < 1:
        raise SparsedetError(f"--batch-size must be at least 1, got {batch_size}")
    if max_frames is not None and max_frames < 1:
        raise SparsedetError(f"--max-frames must be at least 1, got {max_frames}")
    if videos:
        require_av()
    out.mkdir(parents=True, exist_ok=True)
    recorder = _Recorder(model, out, save_txt)
    # Predicted at threshold 0 and filtered here, so that an empty result can name the best score.
    seen = Predicted(Threshold.of(threshold, model.config, PREDICT_DEFAULT))
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    start = time.perf_counter()

    def load(chunk: list[Path]) -> tuple[list[Path], list, list[tuple[Path, SparsedetError]]]:
        """(readable paths, their images, (path, error) of the others)."""
        paths, images, failed = [], [], []
        for path in chunk:
            try:
                images.append(load_image(path))
                paths.append(path)
            except SparsedetError as err:
                failed.append((path, err))
        return paths, images, failed

    def draw(path: Path, image, det):
        picture = draw_detections(image, for_display(det, max_drawn) if max_drawn else det, model.classes)
        atomic_write(out / f"{path.stem}_pred.png", lambda p: picture.save(p, format="PNG"), "drawn predictions")
        return picture

    drawings = []
    with ThreadPoolExecutor(2) as pool, tqdm(total=len(files), desc="predict", disable=len(files) < 4) as bar:
        loading = pool.submit(load, chunks[0]) if chunks else None
        for c, chunk in enumerate(chunks):
            paths, images, failed = loading.result()
            if c + 1 < len(chunks):
                loading = pool.submit(load, chunks[c + 1])
            for path, err in failed:
                warnings.warn(f"skipping an unreadable file: {err}")
                seen.skipped.append(path)
            forward = time.perf_counter()
            dets = _on_host(model.predict(images, threshold=0.0, top_k=top_k, precision=precision,
                                          batch_size=batch_size) if images else [])
            forward = time.perf_counter() - forward  # a GPU's work included: the copy to the host waited for it
            seen.model_seconds += forward
            for path, image, det in zip(paths, images, map(seen.keep, dets)):
                recorder.add(det, image.size, path.stem, {"file_name": str(path)})
                drawings.append(pool.submit(draw, path, image, det))
                if verbose:
                    tqdm.write(f"{path}: {describe_detections(det, model.classes)} "
                               f"({1000 * forward / len(images):.1f} ms)")
            bar.update(len(chunk))
        seen.drawn = [d.result() for d in drawings]
    seen.seconds = time.perf_counter() - start
    if files and not seen.images and not videos:
        raise SparsedetError(f"none of the {len(files)} image files could be read (see the warnings above)")
    for video in videos:
        _predict_video(model, video, out, recorder, seen, dict(threshold=0.0, top_k=top_k, precision=precision,
                                                               batch_size=batch_size), max_frames)
    text = json.dumps(recorder.entries, indent=1)
    atomic_write(out / "predictions.json", lambda p: Path(p).write_text(text), "predictions")
    return seen


def _on_host(dets: list[dict]) -> list[dict]:
    """``predict``'s detections with their tensors on the CPU (from a GPU: one copy each, instead of
    a transfer per number while they are counted, written and drawn)."""
    return [{k: v.cpu() if hasattr(v, "cpu") else v for k, v in det.items()} for det in dets]


def _frames_to_read(reader: VideoReader, max_frames: int | None) -> int | None:
    """The frames the container states or ``max_frames``, the fewer; None when neither is known."""
    return min((n for n in (reader.frames, max_frames) if n), default=None)


def _predict_video(model, source: str, out: Path, recorder: _Recorder, seen: Predicted, options: dict,
                   max_frames: int | None) -> None:
    """Detect on every frame of ``source`` (``options`` go to ``model.predict``), keep those that pass
    ``seen``'s threshold, record them and write the drawn frames into ``out/NAME_pred.mp4`` at the
    source's frame rate."""
    name = source_name(source)
    writer, frame = None, 0
    with VideoReader(source) as reader, tqdm(desc=name, unit="frame", leave=False,
                                             total=_frames_to_read(reader, max_frames)) as bar:
        try:
            frames = islice(reader, max_frames)
            while batch := list(islice(frames, options["batch_size"])):
                for image, det in zip(batch, map(seen.keep, _on_host(model.predict(batch, **options)))):
                    recorder.add(det, image.size, f"{name}_{frame:06d}", {"file_name": source, "frame": frame})
                    writer = writer or VideoWriter(out / f"{name}_pred.mp4", reader.fps)
                    writer.write(draw_detections(image, det, model.classes))
                    frame += 1
                bar.update(len(batch))
        except KeyboardInterrupt:  # how a webcam or live stream ends: keep what was seen
            if not is_stream(source):
                raise
        finally:
            if writer is not None:
                writer.close()
    if frame == 0:
        raise SparsedetError(f"{source} holds no video frames")
