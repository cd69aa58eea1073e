"""What "a model" names wherever a user gives one (``--weights``, a verb's target,
``Detector.from_pretrained``, ``load_detector``): a run folder, a preset name, a zoo name (a
released checkpoint, downloaded and converted on first use) or an exported .onnx file.
``resolve_model`` tells which, refusing what the verb does not take, and touches no network;
``api.load_ref`` builds the model (in api.py, beside the ``Detector`` it builds, which resolves
names here). This is the one place that tells an .onnx file by its name.

>>> ref = resolve_model("dino_r50_12ep", "predict")   # ModelRef(kind='zoo', name='dino_r50_12ep')
>>> model = load_ref(ref, device="cpu")                # (api.py) downloads and converts it the first time
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import SparsedetError, close_names
from .plugins import load_plugins

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
    if name not in PRESETS and name not in ZOO:
        load_plugins()  # a third-party package's preset registers when it is imported
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
