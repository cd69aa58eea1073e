import importlib
import os
import warnings
from pathlib import Path

import pytest
import torch

from sparsedet.data.synthetic import write_synthetic

# Two cores: one thread per xdist worker (scripts/test.sh runs two), both threads otherwise.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# The longest tests (tens of seconds each) start first, so that the two workers end together
# instead of one finishing a long test alone at the end.
LONG_FIRST = ("test_overfit.py", "test_export.py", "test_training.py", "test_openvino.py")


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)
    items.sort(key=rank)  # stable: the order within each group stays


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the tests marked ``gpu`` run their models and ops: $SPARSEDET_TEST_DEVICE, default cpu.
    ``SPARSEDET_TEST_DEVICE=cuda pytest -m gpu`` repeats them on a GPU (benchmarks/gpu_check.sh)."""
    from sparsedet.engine.device import resolve_device
    return resolve_device(os.environ.get("SPARSEDET_TEST_DEVICE", "cpu"), fix="SPARSEDET_TEST_DEVICE=cpu")


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> dict:
    """A small synthetic COCO dataset shared by the tests (8 train, 4 val images of 128 px)."""
    root = tmp_path_factory.mktemp("synth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_synthetic(root, n_train=8, n_val=4, size=128, seed=3)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """An untrained tiny DINO run folder for format tests. Its class table is indexed by category id,
    as released COCO models' are: columns 0, 4 and 6 (named N/A) predict nothing; the others are the
    synthetic dataset's categories 1, 2, 3, 5, 7."""
    from sparsedet import Detector
    from sparsedet.data.categories import UNUSED
    from sparsedet.data.synthetic import CATEGORIES
    names = dict(CATEGORIES)
    torch.manual_seed(0)
    model = Detector.from_preset("dino_tiny", classes=[names.get(i, UNUSED) for i in range(8)],
                                 category_ids=list(range(8)), hidden_dim=64, ffn_dim=64, num_encoder_layers=1,
                                 num_decoder_layers=1, num_queries=10, dn_queries=4, eval_size=64, eval_max_size=96,
                                 **{"backbone.width": 8})
    path = tmp_path_factory.mktemp("tiny") / "run"
    model.save_pretrained(path)
    return path


SHARED = Path(__file__).resolve().parents[2] / "shared"


def _skip_or_fail(message: str) -> None:
    """Skip on a user's machine; fail in CI (CI=true), where a skip would hide the problem. Called
    at a module's top, it skips or fails the whole module."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{message}; CI=true, so the test fails instead of skipping", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_module(name: str, extra: str):
    """``pytest.importorskip(name)`` for an optional runtime that CI installs ([dev] holds ``extra``):
    absent, the test (or module) is skipped, and fails in CI (CI=true)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        _skip_or_fail(f"{name} is not installed ({e}); pip install 'sparsedet[{extra}]'")


def require_shared(path: Path) -> Path:
    """``path`` under ../shared, which ships beside the repository in CI but not with a user's
    clone: absent, the test is skipped there and fails in CI (CI=true), where a skip would hide it."""
    if not path.exists():
        _skip_or_fail(f"{path} is absent (it ships with the project's CI, not with a user's clone)")
    return path


def require_kernel() -> None:
    """The native deformable-attention kernel, built here: without a C compiler ``backend="cpu"``
    quietly runs ``reference``, so a test comparing the two would compare the reference with
    itself. Absent, the test is skipped, and fails in CI (CI=true)."""
    from sparsedet.ops import deform_attn_kernel
    if not deform_attn_kernel.available():
        _skip_or_fail(f"the native deformable-attention kernel is unavailable ({deform_attn_kernel.failure()})")


@pytest.fixture
def shared_dir() -> Path:
    return require_shared(SHARED)


class StoredFeatures(torch.nn.Module):
    """Stands in for the backbone: returns the features an official model consumed."""

    def __init__(self, features):
        super().__init__()
        self.features = features

    def forward(self, x, padding=None):
        return self.features


@pytest.fixture
def official(shared_dir):
    """Reads ../shared/fixtures/official/<name>: (rebuilt state dict, inputs, outputs, manifest)."""
    import importlib.util
    import json

    from safetensors.torch import load_file
    folder = shared_dir / "fixtures" / "official"
    spec = importlib.util.spec_from_file_location("fixture_state_dict", folder / "state_dict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def read(name):
        return (module.official_state_dict(str(folder / name)), load_file(str(folder / name / "inputs.safetensors")),
                load_file(str(folder / name / "outputs.safetensors")),
                json.loads((folder / name / "manifest.json").read_text()))

    return read


def detectron2_names(state: dict) -> dict:
    """A torchvision-named ResNet state dict under detectron2's names, renamed as detectron2's
    convert-torchvision-to-d2 script does (stem., layerN -> resN+1, bnN -> convN.norm, shortcut)."""
    out = {}
    for key, value in state.items():
        key = key if "layer" in key else "stem." + key
        for t in (1, 2, 3, 4):
            key = key.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            key = key.replace(f"bn{t}", f"conv{t}.norm")
        out[key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")] = value
    return out
