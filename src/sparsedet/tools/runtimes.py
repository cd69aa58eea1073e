"""The runtimes an exported .onnx file runs in: onnxruntime (the default, what ``export`` checks
against) and OpenVINO. ``open_session`` gives both one small interface: ``run(feeds)`` returns the
outputs in ``export.OUTPUTS`` order, ``label`` says what computes them (version, device, inference
precision, threads) and ``metadata`` holds the file's metadata_props.

OpenVINO is held to what onnxruntime computes. Its CPU plugin runs in bf16 by default on a CPU with
native bf16 (on the demo model's file, scores then moved by 0.006 and the top 100 reordered), so
sessions ask for f32 and say so in their label; and its TopK breaks ties by the lower index, as
ONNX's does, only when asked. Each runtime is imported only when a session asks for it.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch

from ..errors import SparsedetError
from .export import OUTPUTS, onnxruntime_session

RUNTIMES = ("onnxruntime", "openvino")
EXTRAS = {"onnxruntime": "export", "openvino": "openvino"}


def check_runtime(runtime: str | None) -> None:
    """Refuse an unknown runtime name (``resolve.ModelRef.check_runtime`` refuses one for a model
    that runs in PyTorch)."""
    if runtime is not None:
        _check_name(runtime)


def open_session(path: str | Path, runtime: str = "onnxruntime", threads: int | None = None):
    """The file ``path`` loaded in ``runtime`` on the CPU, on ``threads`` (default PyTorch's count):
    an ``OnnxruntimeSession`` or an ``OpenvinoSession``."""
    _check_name(runtime)
    module = _import(runtime)
    threads = threads or torch.get_num_threads()
    opener = OnnxruntimeSession if runtime == "onnxruntime" else OpenvinoSession
    try:
        return opener(module, path, threads)
    except Exception as e:  # each runtime raises its own exception types for a file it cannot load
        raise SparsedetError(f"{runtime} cannot load {path}: {_reason(e, runtime)}") from None


def _check_name(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise SparsedetError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


def _import(runtime: str):
    """The runtime's module, or an error naming the extra that installs it."""
    try:
        return importlib.import_module(runtime)
    except ImportError as e:
        raise SparsedetError(f"running an .onnx file in {runtime} needs {runtime}: pip install "
                             f"'sparsedet[{EXTRAS[runtime]}]' ({e})") from None


def _reason(error: Exception, runtime: str) -> str:
    """One line of a runtime's message: onnxruntime's first line says why; OpenVINO's messages start
    with the places in its sources that raised and end with why."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[-1] if runtime == "openvino" else lines[0]


class OnnxruntimeSession:
    """onnxruntime's CPU session (``export.onnxruntime_session``); it computes in the file's own
    precision."""

    runtime = "onnxruntime"

    def __init__(self, ort, path: str | Path, threads: int):
        self.session = onnxruntime_session(path, threads)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.label = (f"onnxruntime {ort.__version__} (CPU, {_file_precision(self.metadata)} file, "
                      f"{_threads(threads)})")

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(OUTPUTS, feeds)


class OpenvinoSession:
    """The file compiled by OpenVINO for the CPU with f32 inference precision (never its bf16
    default), ``threads`` threads and the latency hint; inputs of any shape the file allows."""

    runtime = "openvino"

    def __init__(self, ov, path: str | Path, threads: int):
        core = ov.Core()
        model = core.read_model(str(path))
        self.metadata = _openvino_metadata(model)
        _stable_top_k(model)
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                     "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
        self.outputs = [compiled.output(name) for name in OUTPUTS]
        self.request = compiled.create_infer_request()
        precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        used = compiled.get_property("INFERENCE_NUM_THREADS")
        self.label = (f"openvino {ov.__version__.split('-')[0]} (CPU, {_file_precision(self.metadata)} file, "
                      f"{precision} inference precision, {_threads(used)})")

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer(feeds)  # copies the outputs: the next call does not overwrite them
        return [results[output] for output in self.outputs]


def _stable_top_k(model) -> None:
    """ONNX's TopK puts the lower index first among equal values, and the export's stable sorts (the
    top-k of tokens and of detections) rely on it; OpenVINO's TopK keeps that order only when asked."""
    for node in model.get_ordered_ops():
        if node.get_type_name() == "TopK":
            node.set_attribute("stable", True)


def _openvino_metadata(model) -> dict[str, str]:
    """The file's metadata_props, which OpenVINO keeps in the model's rt_info under "framework"."""
    info = model.get_rt_info()
    return {key: value.astype(str) for key, value in info["framework"].items()} if "framework" in info else {}


def _file_precision(metadata: dict[str, str]) -> str:
    """What the file computes in: "fp32", "fp16", or "int8" (its quantised layers; the rest float)."""
    return metadata.get("precision", "fp32")


def _threads(count: int) -> str:
    return f"{count} thread" + ("" if count == 1 else "s")
