import warnings
from pathlib import Path

import pytest
import torch

from sparsedet.data.synthetic import write_synthetic

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> dict:
    """A small synthetic COCO dataset shared by the tests (8 train, 4 val images of 128 px)."""
    root = tmp_path_factory.mktemp("synth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_synthetic(root, n_train=8, n_val=4, size=128, seed=3)


@pytest.fixture
def shared_dir() -> Path:
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        pytest.skip(f"{path} is absent (it ships with the project's CI, not with a user's clone)")
    return path


class StoredFeatures(torch.nn.Module):
    """Stands in for the backbone: returns the features an official model consumed."""

    def __init__(self, features):
        super().__init__()
        self.features = features

    def forward(self, x):
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
