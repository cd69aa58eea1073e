import warnings
from pathlib import Path

import pytest
import torch
from scipy.optimize import linear_sum_assignment

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


def in_fixture_order(select, expected_logits):
    """Query selection ranks tokens by logits; two tokens whose best logits agree to ~1e-6 may swap
    places between two correct implementations (float rounding), and the learned content query of
    each slot then meets the other box. This wrapper keeps our selected set, checks it is the
    fixture's, and orders it as the fixture did, so that everything downstream can be compared."""

    def wrapped(logits, k):
        top = select(logits, k)
        ordered = []
        for b in range(top.shape[0]):
            ours = logits[b, top[b]]
            dist = (expected_logits[b][:, None, :] - ours[None]).abs().amax(-1)  # [k expected, k ours]
            # Padding tokens share identical logits, so match one-to-one rather than nearest-first.
            rows, cols = linear_sum_assignment(dist.numpy())
            assert dist[rows, cols].max() < 1e-4, "our selected tokens are not the fixture's"
            ordered.append(top[b, torch.as_tensor(cols)])
        return torch.stack(ordered)

    return wrapped


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
