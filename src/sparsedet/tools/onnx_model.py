"""An exported model (``sparsedet export``) as a first-class detector: ``OnnxDetector`` runs the
file in onnxruntime or OpenVINO (``runtimes.open_session``) behind the interface that ``predict``,
``eval`` and ``bench`` use for a ``Detector`` (``config``, ``classes``, ``preprocess``, ``detect``,
``predict``). The run's config travels in the file's metadata, so resizing and the class table are
the run's own."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..config import Config
from ..data.batch import Batch
from ..data.images import ImageLike, predict_in_shape_batches, preprocess_images
from ..errors import SparsedetError
from ..engine.thresholds import PREDICT_DEFAULT, Threshold
from ..models.postprocess import above_threshold, check_top_k, with_names
from .export import inputs
from .runtimes import open_session


class OnnxDetector:
    """``OnnxDetector("model.onnx").predict("photo.jpg")``: detections as ``Detector.predict``
    returns them, computed on the CPU with PyTorch's thread count by ``runtime`` ("onnxruntime" or
    "openvino"; ``session.label`` says which version, in which precision, on how many threads)."""

    def __init__(self, path: str | Path, threads: int | None = None, runtime: str = "onnxruntime"):
        path = Path(path)
        if not path.is_file():
            raise SparsedetError(f"ONNX file not found: {path}")
        self.threads = threads or torch.get_num_threads()
        self.runtime = runtime
        self.session = open_session(path, runtime, self.threads)
        meta = self.session.metadata
        if "config" not in meta:
            raise SparsedetError(f"{path} was not written by `sparsedet export` (its metadata has no run config); "
                                 "export the run again")
        self.path = path
        self.run_config = Config.from_dict(json.loads(meta["config"]))
        self.config = self.run_config.model
        self.exported_top_k = int(meta["top_k"])
        self.precision = meta.get("precision", "fp32")
        fixed = meta.get("input_size", "any")
        self.input_size = None if fixed == "any" else tuple(int(v) for v in fixed.split("x"))
        self._column = {cid: i for i, cid in enumerate(self.category_ids)}

    @property
    def num_weights(self) -> int:
        """Values stored in the file's initializers (weights, buffers and constants)."""
        import onnx
        graph = onnx.load(str(self.path), load_external_data=False).graph
        return sum(int(np.prod(t.dims)) for t in graph.initializer)

    @property
    def classes(self) -> list[str]:
        return self.config.classes or [str(i) for i in range(self.config.num_classes)]

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def category_ids(self) -> list[int]:
        return list(self.config.category_ids or range(self.config.num_classes))

    def check_precision(self, precision: str) -> None:
        """The file computes in the precision it was exported in; "fp32", the default everywhere,
        stands for "as exported"."""
        if precision not in ("fp32", self.precision):
            raise SparsedetError(f"an .onnx file runs in the precision it was exported in ({self.precision}); "
                                 f"leave out --precision {precision}")

    def preprocess(self, images: list[ImageLike]) -> tuple[Batch, Tensor, list]:
        return preprocess_images(images, self.config.eval_size, self.config.eval_max_size)

    def detect(self, batch: Batch, sizes: Tensor, threshold: float = 0.0, top_k: int | None = None) -> list[dict]:
        """The file's top-k detections of a padded batch, scored above ``threshold``, at most
        ``top_k`` (no more than the export's); labels as column indices, like ``Detector.detect``."""
        k = min(top_k or self.config.top_k, self.exported_top_k)
        boxes, scores, labels = self.session.run(inputs(batch, sizes.cpu(), self.input_size))
        columns = np.vectorize(self._column.__getitem__, otypes=[np.int64])(labels) if labels.size else labels
        return above_threshold(torch.from_numpy(boxes[:, :k]), torch.from_numpy(scores[:, :k]),
                               torch.from_numpy(columns[:, :k]), threshold)

    def predict(self, images: ImageLike | list[ImageLike], threshold: float | None = None, top_k: int | None = None,
                batch_size: int = 4, precision: str = "fp32") -> list[dict[str, Tensor]]:
        """``Detector.predict`` through the file's runtime, in the precision the file was exported in
        (``precision`` may only name that one, or be left at "fp32"); ``threshold`` None: the run's
        recorded one, which the file's config carries, else 0.5."""
        threshold = Threshold.of(threshold, self.config, PREDICT_DEFAULT).value
        check_top_k(top_k)
        self.check_precision(precision)
        if not isinstance(images, (list, tuple)):
            images = [images]
        results = predict_in_shape_batches(images, batch_size, self.preprocess,
                                           lambda batch, sizes: self.detect(batch, sizes, threshold, top_k))
        return with_names(results, self.classes)
