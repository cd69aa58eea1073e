"""The user-facing ``Detector``: presets, pretrained run folders and ``predict`` on raw images."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .config import Config, apply_overrides
from .data.batch import Batch
from .data.images import ImageLike, predict_in_shape_batches, preprocess_images
from .engine.checkpoint import load_run, save_run
from .engine.device import resolve_device
from .engine.precision import inference_precision, resolve_precision
from .engine.thresholds import PREDICT_DEFAULT, Threshold
from .errors import SparsedetError
from .models.detector import DetectionTransformer
from .models.postprocess import check_top_k, with_names
from .presets import get_preset
from .resolve import ModelRef, resolve_model


class Detector(DetectionTransformer):
    """A detection transformer with loading, saving and prediction.

    >>> model = Detector.from_preset("dino_tiny", num_classes=5)
    >>> model.save_pretrained("run")
    >>> model = Detector.from_pretrained("run")
    >>> model.predict("image.png")[0]["boxes"]   # xyxy, original pixels; the run's threshold (else 0.5)
    """

    @classmethod
    def from_config(cls, config: Config, backbone_weights: bool = False) -> "Detector":
        """The model ``config`` describes. Nothing is read from disk, unless ``backbone_weights``:
        then the ImageNet file that ``model.backbone.weights`` names (a path, or ``imagenet`` /
        ``imagenet-detectron2`` / Swin's ``imagenet-22k``: downloaded once into the cache) is loaded
        into the backbone (a training from scratch)."""
        model = cls(config.model, run_config=config)
        b = config.model.backbone
        if backbone_weights and b.weights:
            from .tools.imagenet import backbone_file  # a name (imagenet) is downloaded once
            model.backbone.load_weights(backbone_file(b))
        return model

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "Detector":
        """Build a randomly initialised model; overrides are model config fields (``num_classes=5``,
        ``backbone.depth=18``). The backbone loads ImageNet weights when the overrides name them
        (``**{"backbone.weights": "imagenet"}`` or a file); the R50 presets' default ``imagenet`` is
        read by ``sparsedet train`` only. Training and data settings (``train.*``, ``data.*``) belong to
        ``sparsedet train`` or the Config given to a Trainer: here they are refused."""
        config = apply_overrides(get_preset(name), _model_overrides(overrides, "from_preset"))
        if config.model.classes:
            config.model.num_classes = len(config.model.classes)
        named = any(k.removeprefix("model.") == "backbone.weights" for k in overrides)
        return cls.from_config(config, backbone_weights=named)

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, map_location: str = "cpu", ema: bool = False,
                        **overrides: Any) -> "Detector":
        """Load a run folder written by ``save_pretrained``, ``sparsedet train`` or ``convert`` (its EMA
        weights with ``ema=True``), or a released checkpoint by its zoo name (``dino_r50_12ep``:
        downloaded and converted on first use, see ``sparsedet zoo``); overrides change what the
        weights do not fix (``encoder.keep_ratio=0.2``)."""
        device = resolve_device(map_location, fix="map_location='cpu'")
        run_dir = resolve_model(run_dir, "from_pretrained").path()  # a zoo name: its cached run folder
        config, state = load_run(run_dir, ema=ema)
        apply_overrides(config, _model_overrides(overrides, "from_pretrained"))
        model = cls.from_config(config)  # the run's weights hold the backbone
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SparsedetError(
                f"weights in {run_dir} do not fit its config (missing: {missing[:5]}, unexpected: {unexpected[:5]})")
        return model.to(device).eval()

    @classmethod
    def for_finetuning(cls, run_dir: str | Path, config: Config) -> "Detector":
        """A model built from ``config`` (its classes may differ from the run's) that starts from the
        weights in ``run_dir``: every tensor whose name and shape match is kept. When the class table
        differs, the class-dependent tensors (class heads, denoising label table) start fresh, with a
        warning that lists them. Any other mismatch is an error."""
        old_config, state = load_run(run_dir)
        model = cls.from_config(config)  # the run's weights hold the backbone
        new_state = model.state_dict()
        same_classes = (list(old_config.model.category_ids) == list(config.model.category_ids)
                        and list(old_config.model.classes) == list(config.model.classes))
        fresh = set() if same_classes else class_dependent_keys(config)
        misfits = [k for k in new_state if k not in fresh and (k not in state or state[k].shape != new_state[k].shape)]
        unexpected = [k for k in state if k not in new_state]
        if misfits or unexpected:
            raise SparsedetError(f"weights in {run_dir} do not fit the training config (missing or reshaped: "
                                 f"{misfits[:5]}, unexpected: {unexpected[:5]}); change only the data and "
                                 "training settings when fine-tuning")
        model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
        if fresh:
            warnings.warn(f"{run_dir} was trained on another class set ({len(old_config.model.classes)} classes): "
                          f"kept every other weight, reinitialised the {len(fresh)} class-dependent tensors "
                          f"({', '.join(sorted(fresh)[:4])}{', ...' if len(fresh) > 4 else ''})")
        return model

    def to(self, *args, **kwargs) -> "Detector":
        """``nn.Module.to``, with a device this machine has (else a SparsedetError that says what to use)."""
        device = kwargs.get("device", args[0] if args else None)
        if isinstance(device, (str, int, torch.device)) and not isinstance(device, bool):
            resolved = resolve_device(device, fix=".to('cpu')")
            if "device" in kwargs:
                kwargs["device"] = resolved
            else:
                args = (resolved, *args[1:])
        return super().to(*args, **kwargs)

    def cuda(self, device: int | torch.device | None = None) -> "Detector":
        resolve_device("cuda" if device is None else device, fix=".to('cpu')")
        return super().cuda(device)

    def export_onnx(self, path: str | Path, size: tuple[int, int] | None = None, opset: int = 18,
                    top_k: int | None = None, precision: str = "fp32") -> dict:
        """Write the model as ONNX for inputs of any size (or of ``size`` (height, width) only) with
        post-processing inside, in ``precision`` "fp32" or "fp16", and check it in onnxruntime
        against PyTorch (``sparsedet.tools.export``). Returns the comparison; raises when they disagree."""
        from .tools.export import export_onnx
        return export_onnx(self, path, size, opset, top_k, precision)

    def save_pretrained(self, run_dir: str | Path) -> None:
        save_run(run_dir, self.state_dict(), self.run_config)

    @property
    def classes(self) -> list[str]:
        return self.config.classes or [str(i) for i in range(self.config.num_classes)]

    @property
    def category_ids(self) -> list[int]:
        """Each class column's category id (the column index where the run names none)."""
        return list(self.config.category_ids or range(self.config.num_classes))

    @torch.no_grad()
    def predict(self, images: ImageLike | list[ImageLike], threshold: float | None = None, top_k: int | None = None,
                batch_size: int = 4, precision: str = "fp32") -> list[dict[str, torch.Tensor]]:
        """Detect objects.

        ``images``: one or a list of paths, PIL images, RGB (H, W, 3) arrays (uint8, or float in
        [0, 1]; reverse OpenCV's BGR first: ``image[..., ::-1]``) or RGB (3, H, W) float tensors in
        [0, 1]. ``threshold``: minimum score, in [0, 1]; None: the run's recorded
        ``config.score_threshold``, else 0.5. ``top_k``: at most this many detections per
        image (default ``config.top_k``). ``precision``: "fp32", "bf16" or "fp16" (CUDA only) for the
        forward pass.

        Returns per image {"boxes": [n, 4] xyxy in original pixels, clipped to the image, "scores": [n]
        (both fp32 in any precision), "labels": [n] (column index into ``classes``), "names": [n] (the
        labels' class names, a list of str)}, sorted by score.
        """
        threshold = Threshold.of(threshold, self.config, PREDICT_DEFAULT).value
        check_top_k(top_k)
        if not isinstance(images, (list, tuple)):
            images = [images]
        device = next(self.parameters()).device
        dtype = resolve_precision(precision, device)
        with inference_precision(self, dtype):
            results = predict_in_shape_batches(
                images, batch_size, self.preprocess,
                lambda batch, sizes: self.detect(batch.to(device), sizes.to(device), threshold, top_k))
        return with_names(results, self.classes)

    def preprocess(self, images: list[ImageLike]) -> tuple[Batch, torch.Tensor, list[Image.Image]]:
        """Images -> (padded batch at the model's eval size, original (height, width) [B, 2], the
        resized images the batch holds)."""
        return preprocess_images(images, self.config.eval_size, self.config.eval_max_size)


def load_detector(weights: str | Path, ema: bool = False, device: str | None = None, runtime: str | None = None):
    """What ``--weights`` names: a run folder or a zoo name (a ``Detector``, on ``device``: default
    cuda when available, else cpu) or an exported ``.onnx`` file (an ``OnnxDetector``, run on the
    CPU in ``runtime``: "onnxruntime", the default, or "openvino"; the others run in PyTorch)."""
    return load_ref(resolve_model(weights, "load_detector"), device=device, runtime=runtime, ema=ema)


def load_ref(ref: ModelRef, device: str | None = None, runtime: str | None = None, ema: bool = False,
             overrides: dict[str, Any] | None = None):
    """The model ``ref`` (``resolve.resolve_model``) names: a ``Detector`` in eval mode on ``device``
    (default cuda when available, else cpu; a preset's weights are random, a run's its EMA ones with
    ``ema``), or for an .onnx file an ``OnnxDetector`` on the CPU in ``runtime`` (default
    onnxruntime). ``overrides`` are model settings the weights do not fix (``encoder.keep_ratio``).
    Here, not in resolve.py, because ``Detector.from_pretrained`` resolves its name there."""
    ref.check_runtime(runtime)
    overrides = overrides or {}
    if ref.kind == "exported":
        return _load_exported(ref, device, runtime, ema, overrides)
    if ema and ref.kind == "preset":
        raise SparsedetError(f"--ema picks a run folder's EMA weights; {ref.name} is a preset: leave it out")
    where = resolve_device(device or "auto", fix="--device cpu")
    if ref.kind == "preset":
        return Detector.from_preset(ref.name, **overrides).to(where).eval()
    return Detector.from_pretrained(ref.path(), map_location=where, ema=ema, **overrides)


def _load_exported(ref: ModelRef, device, runtime, ema, overrides):
    if overrides:
        raise SparsedetError(f"an .onnx file computes what it was exported with; leave out the overrides "
                             f"({', '.join(overrides)})")
    if ema:
        raise SparsedetError("--ema picks a run folder's EMA weights; an .onnx file holds one set: leave it out")
    if device not in (None, "cpu"):
        raise SparsedetError(f"an .onnx file runs on the CPU (in onnxruntime or OpenVINO); leave out --device "
                             f"{device}")
    from .tools.onnx_model import OnnxDetector
    return OnnxDetector(ref.name, runtime=runtime or "onnxruntime")


def class_dependent_keys(config: Config) -> set[str]:
    """State-dict keys whose shape follows the number of classes (found by building the model for
    two class counts on the meta device, which allocates nothing)."""
    shapes = []
    for extra in (0, 1):
        model_config = copy.deepcopy(config.model)
        model_config.num_classes += extra
        model_config.classes, model_config.category_ids = [], []
        with torch.device("meta"):
            shapes.append({k: v.shape for k, v in DetectionTransformer(model_config).state_dict().items()})
    return {k for k, shape in shapes[0].items() if shapes[1][k] != shape}


def _model_overrides(overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """Refuse training and data settings: a Detector is a model, they would have no effect."""
    for key in overrides:
        if key.split(".")[0] in ("train", "data"):
            raise SparsedetError(f"Detector.{where} takes model settings only; {key} is a "
                                 f"{'training' if key.startswith('train') else 'data'} setting and would have no "
                                 f"effect here: give it to `sparsedet train ... {key}=VALUE` (or set it in the "
                                 "Config a Trainer gets)")
    return overrides
