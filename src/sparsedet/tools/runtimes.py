"""The runtimes an exported .onnx file runs in: onnxruntime (the default, what ``export`` checks
against) and OpenVINO. A runtime is one session class registered with ``@register_runtime(name)``
(here, or in a plug-in's module): ``cls(module, path, threads)`` loads the file, ``run(feeds)``
returns the outputs in ``export.OUTPUTS`` order, ``label`` says what computes them (version,
device, inference precision, threads) and ``metadata`` holds the file's metadata_props; the class
declares what ``--runtime`` (choices and help), ``serve`` and the error messages say of it.

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
from ..plugins import not_found_hint
from .export import OUTPUTS, onnxruntime_session

DEFAULT_RUNTIME = "onnxruntime"
RUNTIMES: dict[str, type[Session]] = {}  # --runtime NAME -> its session class (register_runtime adds one)


class Session:
    """What a runtime's session class declares besides loading and running a file."""

    title = ""                   # how messages name the runtime ("OpenVINO")
    module = ""                  # the Python module it imports
    extra = ""                   # the sparsedet extra that installs that module
    about = ""                   # what --help says of it besides how to install it
    one_batch_at_a_time = False  # one inference at a time per loaded file: ``serve`` runs one worker
    runtime = ""                 # its name (set by register_runtime)
    label: str                   # what computes the outputs: version, device, precision, threads
    metadata: dict[str, str]     # the file's metadata_props

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    @staticmethod
    def reason(error: Exception) -> str:
        """The one line of the runtime's message that says why it cannot load a file (its first)."""
        return _lines(error)[0]


def register_runtime(name: str):
    """Class decorator: ``--runtime NAME`` runs exported files in the decorated ``Session`` class."""
    def add(cls: type[Session]) -> type[Session]:
        if name in RUNTIMES and RUNTIMES[name] is not cls:
            raise SparsedetError(f"runtime {name!r} is already {RUNTIMES[name].__name__}")
        cls.runtime = name
        RUNTIMES[name] = cls
        return cls
    return add


def runtime_class(name: str) -> type[Session]:
    """The session class of runtime ``name``; an unknown name is a SparsedetError (``resolve.ModelRef
    .check_runtime`` refuses a runtime for a model that runs in PyTorch)."""
    if name not in RUNTIMES:
        hint = not_found_hint()  # loads the installed plugins, which may register the runtime
        if name not in RUNTIMES:
            raise SparsedetError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}{hint}")
    return RUNTIMES[name]


def check_runtime(runtime: str | None) -> None:
    """Refuse an unknown runtime name (None: the default)."""
    if runtime is not None:
        runtime_class(runtime)


def runtime_help() -> str:
    """What --help says of --runtime: each runtime, how to install one that is not the default's."""
    described = [f"{name} (default)" if name == DEFAULT_RUNTIME else
                 f"{name} (pip install 'sparsedet[{cls.extra}]'" + (f"; {cls.about})" if cls.about else ")")
                 for name, cls in RUNTIMES.items()]
    return "what runs an exported .onnx file (the others run in PyTorch): " + " or ".join(described)


def open_session(path: str | Path, runtime: str = DEFAULT_RUNTIME, threads: int | None = None) -> Session:
    """The file ``path`` loaded in ``runtime`` on the CPU, on ``threads`` (default PyTorch's count)."""
    cls = runtime_class(runtime)
    module = _import(cls)
    threads = threads or torch.get_num_threads()
    try:
        return cls(module, path, threads)
    except Exception as e:  # each runtime raises its own exception types for a file it cannot load
        raise SparsedetError(f"{runtime} cannot load {path}: {cls.reason(e)}") from None


def _import(cls: type[Session]):
    """The runtime's module, or an error naming the extra that installs it."""
    try:
        return importlib.import_module(cls.module)
    except ImportError as e:
        raise SparsedetError(f"running an .onnx file in {cls.runtime} needs {cls.module}: pip install "
                             f"'sparsedet[{cls.extra}]' ({e})") from None


def _lines(error: Exception) -> list[str]:
    return [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]


@register_runtime("onnxruntime")
class OnnxruntimeSession(Session):
    """onnxruntime's CPU session (``export.onnxruntime_session``); it computes in the file's own
    precision."""

    title = module = "onnxruntime"
    extra = "export"

    def __init__(self, ort, path: str | Path, threads: int):
        self.session = onnxruntime_session(path, threads)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.label = (f"onnxruntime {ort.__version__} (CPU, {_file_precision(self.metadata)} file, "
                      f"{_threads(threads)})")

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(OUTPUTS, feeds)


@register_runtime("openvino")
class OpenvinoSession(Session):
    """The file compiled by OpenVINO for the CPU with f32 inference precision (never its bf16
    default), ``threads`` threads and the latency hint; inputs of any shape the file allows. It
    keeps one infer request, so it runs one batch at a time."""

    title, module = "OpenVINO", "openvino"
    extra = "openvino"
    about = "CPU, f32 inference precision"
    one_batch_at_a_time = True

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

    @staticmethod
    def reason(error: Exception) -> str:
        return _lines(error)[-1]  # its messages start with the places in its sources that raised

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
