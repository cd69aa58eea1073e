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
