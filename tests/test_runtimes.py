"""A runtime of exported files is one registered session class (tools/runtimes.py): --runtime's
choices and help, the error for an unknown name, loading and serve's worker plan all read the
table. Nothing here loads a real .onnx file (test_openvino.py and test_export.py do)."""
import argparse

import numpy as np
import pytest

from sparsedet.cli_parser import build_parser
from sparsedet.cli_serve import _plan
from sparsedet.errors import SparsedetError
from sparsedet.tools import runtimes
from sparsedet.tools.runtimes import Session, open_session, register_runtime, runtime_help


class EchoSession(Session):
    """Runs nothing: gives its feeds back."""

    title, module, extra, about = "Echo", "json", "echo", "for tests"
    one_batch_at_a_time = True

    def __init__(self, module, path, threads):
        if str(path).endswith("bad.onnx"):
            raise ValueError("where it failed\nwhy it failed")
        self.label, self.metadata = f"echo ({threads} threads)", {}

    def run(self, feeds):
        return list(feeds.values())


def _serve_args(runtime: str, workers: int | None = None) -> argparse.Namespace:
    return argparse.Namespace(device=None, runtime=runtime, workers=workers, threads=None, max_batch=None)


def test_the_built_in_runtimes_are_described_as_before():
    assert runtime_help() == ("what runs an exported .onnx file (the others run in PyTorch): onnxruntime (default) or "
                              "openvino (pip install 'sparsedet[openvino]'; CPU, f32 inference precision)")
    with pytest.raises(SparsedetError, match="--workers 2: OpenVINO runs one batch at a time here"):
        _plan(_serve_args("openvino", 2), onnx=True)
    assert _plan(_serve_args("onnxruntime"), onnx=True)[0] >= 1
    with pytest.raises(SparsedetError, match="unknown runtime 'tensorrt'; choose one of onnxruntime, openvino; "
                                             "a kind from a third-party package"):
        open_session("model.onnx", "tensorrt")


def test_a_runtime_is_one_registered_class(monkeypatch):
    monkeypatch.setitem(runtimes.RUNTIMES, "echo", EchoSession)  # taken out again after the test
    register_runtime("echo")(EchoSession)
    assert runtime_help().endswith(" or echo (pip install 'sparsedet[echo]'; for tests)")
    args = build_parser().parse_args(["predict", "--weights", "m.onnx", "x.png", "--out", "o", "--runtime", "echo"])
    assert args.runtime == "echo"
    session = open_session("model.onnx", "echo", threads=3)
    assert session.label == "echo (3 threads)" and session.runtime == "echo"
    assert session.run({"images": np.ones(2)})[0].tolist() == [1.0, 1.0]
    with pytest.raises(SparsedetError, match=r"^echo cannot load bad\.onnx: where it failed$"):
        open_session("bad.onnx", "echo")
    assert _plan(_serve_args("echo"), onnx=True)[0] == 1  # one batch at a time: one worker
    with pytest.raises(SparsedetError, match="runtime 'echo' is already EchoSession"):
        register_runtime("echo")(type("Other", (EchoSession,), {}))
