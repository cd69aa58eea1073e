"""What "a model" names wherever a user gives one (``--weights``, a verb's target,
``Detector.from_pretrained``, ``load_detector``): a run folder, a preset name, a zoo name (a
released checkpoint, downloaded and converted on first use) or an exported .onnx file.
``resolve_model`` tells which, refusing what the verb does not take, and touches no network;
``ModelRef.load`` builds the model. This is the one place that tells an .onnx file by its name.

>>> ref = resolve_model("dino_r50_12ep", "predict")   # ModelRef(kind='zoo', name='dino_r50_12ep')
>>> model = ref.load(device="cpu")                     # downloads and converts it the first time
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SparsedetError, close_names

KINDS = ("run", "preset", "zoo", "exported")
_NOUNS = {"run": "a run folder", "preset": "a preset name", "zoo": "a zoo name", "exported": "an ONNX file"}


@dataclass(frozen=True)
class Verb:
    """What one verb takes as its model, and how it says it."""
    label: str                    # how messages name the verb
    kinds: tuple[str, ...]
    why: tuple[tuple[str, str], ...] = ()   # (kind, what a refusal says of it instead of "is <noun>")

    def takes(self) -> str:
        nouns = [_NOUNS[k] for k in self.kinds]
        return nouns[0] if len(nouns) == 1 else f"{', '.join(nouns[:-1])} or {nouns[-1]}"


_NO_TRAINING = ("preset", "is a preset name, with random weights: train it first (sparsedet train --preset)")
_FROM_WEIGHTS = ("run", "zoo", "exported")
# Every verb that takes a model, and what it takes.
VERBS: dict[str, Verb] = {
    "eval": Verb("eval --weights", _FROM_WEIGHTS, (_NO_TRAINING,)),
    "predict": Verb("predict --weights", _FROM_WEIGHTS, (_NO_TRAINING,)),
    "serve": Verb("serve --weights", _FROM_WEIGHTS, (_NO_TRAINING,)),
    "load_detector": Verb("load_detector", _FROM_WEIGHTS, (("preset", "is a preset name (Detector.from_preset "
                                                           "builds it, with random weights)"),)),
    "train": Verb("train --weights", ("run", "zoo"), (
        ("preset", "is a preset name: start from it with --preset, not --weights"),
        ("exported", "is an ONNX file, which holds no trainable weights"))),
    "from_pretrained": Verb("Detector.from_pretrained", ("run", "zoo"), (
        ("preset", "is a preset name (Detector.from_preset builds it, with random weights)"),
        ("exported", "is an ONNX file (OnnxDetector or load_detector runs it)"))),
    "export": Verb("export", ("run", "preset", "zoo"),
                   (("exported", "is already an ONNX file (export quantises an fp32 one with --int8)"),)),
    "export --int8": Verb("export --int8", KINDS),
    "bench": Verb("bench", KINDS),
    "viz": Verb("viz", ("run", "preset", "zoo"),
                (("exported", "is an ONNX file, which keeps no tokens or sampling points to draw"),)),
}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: ``kind`` in KINDS and ``name`` as the user gave it (a path for "run" and
    "exported", else the preset or zoo name). A "run" names a folder that may still turn out
    missing or incomplete: loading it says what is wrong."""
    kind: str
    name: str

    def path(self) -> Path:
        """The run folder or file: a zoo name's cached run folder (downloaded and converted on first
        use, so call this after every check that can refuse)."""
        if self.kind == "zoo":
            from .tools import zoo  # looked up at call time: tests replace pretrained_run
            return zoo.pretrained_run(self.name)
        if self.kind == "preset":
            raise SparsedetError(f"{self.name} is a preset name: it has no run folder or file")
        return Path(self.name)

    def check_runtime(self, runtime: str | None) -> None:
        """Refuse an unknown runtime, and a runtime other than the default for a model that runs in
        PyTorch (before a zoo name downloads)."""
        if runtime is None:
            return
        from .tools.runtimes import check_runtime
        check_runtime(runtime)
        if runtime != "onnxruntime" and self.kind != "exported":
            raise SparsedetError(f"--runtime applies to exported .onnx files, and {self.name} is a run folder, "
                                 "preset or zoo name, which runs in PyTorch; export it first (sparsedet export "
                                 f"{self.name} --out model.onnx) or leave out --runtime {runtime}")

    def load(self, device: str | None = None, runtime: str | None = None, ema: bool = False,
             overrides: dict[str, Any] | None = None):
        """The model: a ``Detector`` in eval mode on ``device`` (default cuda when available, else
        cpu; a preset's weights are random, a run's its EMA ones with ``ema``), or for an .onnx file
        an ``OnnxDetector`` on the CPU in ``runtime`` (default onnxruntime). ``overrides`` are model
        settings the weights do not fix (``encoder.keep_ratio``)."""
        self.check_runtime(runtime)
        overrides = overrides or {}
        if self.kind == "exported":
            return self._load_exported(device, runtime, ema, overrides)
        from .api import Detector
        from .engine.device import resolve_device
        if ema and self.kind == "preset":
            raise SparsedetError(f"--ema picks a run folder's EMA weights; {self.name} is a preset: leave it out")
        where = resolve_device(device or "auto", fix="--device cpu")
        if self.kind == "preset":
            return Detector.from_preset(self.name, **overrides).to(where).eval()
        return Detector.from_pretrained(self.path(), map_location=where, ema=ema, **overrides)

    def _load_exported(self, device, runtime, ema, overrides):
        if overrides:
            raise SparsedetError(f"an .onnx file computes what it was exported with; leave out the overrides "
                                 f"({', '.join(overrides)})")
        if ema:
            raise SparsedetError("--ema picks a run folder's EMA weights; an .onnx file holds one set: leave it out")
        if device not in (None, "cpu"):
            raise SparsedetError(f"an .onnx file runs on the CPU (in onnxruntime or OpenVINO); leave out --device "
                                 f"{device}")
        from .tools.onnx_model import OnnxDetector
        return OnnxDetector(self.name, runtime=runtime or "onnxruntime")


def resolve_model(target: str | Path, verb: str) -> ModelRef:
    """What ``target`` names, for ``verb`` (a key of VERBS): a ModelRef of a kind the verb takes,
    else a SparsedetError that says what it takes (with "did you mean" for a mistyped name)."""
    accepts = VERBS[verb]
    name = str(target)
    kind = _kind(name)
    if kind is None:
        kind = _unknown(name, accepts)
    if kind not in accepts.kinds:
        why = dict(accepts.why).get(kind, f"is {_NOUNS[kind]}")
        raise SparsedetError(f"{name} {why}; {accepts.label} takes {accepts.takes()}")
    return ModelRef(kind, name)


def _kind(name: str) -> str | None:
    """The kind ``name`` is, by its form alone; None when it is none of them."""
    from .presets import PRESETS
    from .tools.zoo import ZOO
    if name.lower().endswith(".onnx"):
        return "exported"
    if Path(name).is_dir():
        return "run"
    if name in PRESETS:
        return "preset"
    if name in ZOO:
        return "zoo"
    return None


def _unknown(name: str, accepts: Verb) -> str:
    """A name that is no folder, file or known name: a mistyped preset or zoo name where one is
    close (or where the verb takes presets, whose names are bare words), else a run folder that
    loading will report missing."""
    from .presets import PRESETS
    from .tools.zoo import ZOO
    names = [*(PRESETS if "preset" in accepts.kinds else ()), *(ZOO if "zoo" in accepts.kinds else ())]
    close = close_names(name, names)
    if "preset" in accepts.kinds:
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SparsedetError(f"{name!r} is neither a run folder nor a preset name{hint} (see `sparsedet presets`; "
                             "`sparsedet zoo` lists the released checkpoints)")
    if close:
        raise SparsedetError(f"{name!r} is neither a run folder nor a zoo name; did you mean {', '.join(close)}? "
                             "(`sparsedet zoo` lists them)")
    return "run"
