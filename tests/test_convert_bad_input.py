"""Every source, one style: a file from another source, a truncated file and one whose shapes do not
fit give ONE SparsedetError naming the file, the source it was read as and the first offending keys."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network, before transformers is imported

import re  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from released import (  # noqa: E402
    SMALL_CONDITIONAL,
    SMALL_DEFORMABLE,
    conditional_detr_layout,
    deformable_detr_layout,
    hf_conditional_detr,
    hf_deformable_detr,
    official_fixture_file,
    save_conditional_detr,
    save_deformable_detr,
)
from safetensors.torch import load_file, save_file  # noqa: E402

from sparsedet import Detector  # noqa: E402
from sparsedet.errors import SparsedetError  # noqa: E402
from sparsedet.tools.convert import SOURCES, convert  # noqa: E402

FIXTURES = {"official-dino": "dino", "official-sparse-detr": "sparse_detr", "official-focus-detr": "focus_detr",
            "official-salience-detr": "salience_detr", "official-sam-detr": "sam_detr"}
# A file of the source on the right, given to the source on the left.
FOREIGN = {"official-deformable-detr": "official-conditional-detr", "official-conditional-detr": "official-sam-detr",
           "official-dino": "official-deformable-detr", "official-sparse-detr": "official-dino",
           "official-focus-detr": "official-salience-detr", "official-salience-detr": "official-sparse-detr",
           "official-sam-detr": "official-deformable-detr", "hf-deformable-detr": "hf-conditional-detr",
           "hf-conditional-detr": "hf-deformable-detr"}


def released(source: str, request, folder) -> "os.PathLike":
    """A valid file (an HF folder for hf-*) of ``source``, built under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if source in FIXTURES:
        official, shared_dir = request.getfixturevalue("official"), request.getfixturevalue("shared_dir")
        return official_fixture_file(FIXTURES[source], official, shared_dir, folder)[0]
    if source == "official-deformable-detr":
        ours = Detector.from_preset("deformable_detr_r50", **SMALL_DEFORMABLE).state_dict()
        return save_deformable_detr(folder, deformable_detr_layout(ours, 2, False, False), num_queries=30)
    if source == "official-conditional-detr":
        ours = Detector.from_preset("conditional_detr_r50", **SMALL_CONDITIONAL).state_dict()
        return save_conditional_detr(folder, conditional_detr_layout(ours))
    pytest.importorskip("transformers")
    if source == "hf-deformable-detr":
        hf_deformable_detr(folder / "hf", 18, False, False, 2, 20)
    else:
        hf_conditional_detr(folder / "hf", 18, 1, 20)
    return folder / "hf"


def _fails_clearly(source, path, *words):
    with pytest.raises(SparsedetError) as error:
        convert(source, path)
    message = str(error.value)
    for word in (path.name, source, *words):
        assert word in message, f"{word!r} not in: {message}"
    return message


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_a_file_from_another_source(source, request, tmp_path):
    other = FOREIGN[source]
    path = released(other, request, tmp_path / other)
    message = _fails_clearly(source, path)
    # names keys: the file's own, not ours
    assert re.search(r"(backbone|transformer|model|class_embed|query_embed|input_proj|neck)\.\S+", message), message


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_a_truncated_file(source, request, tmp_path):
    path = released(source, request, tmp_path / "ok")
    weights = path / "model.safetensors" if path.is_dir() else path
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _fails_clearly(source, path, "could not read")


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_a_tensor_of_another_shape(source, request, tmp_path):
    path = released(source, request, tmp_path / "ok")
    odd = tmp_path / "odd"
    if path.is_dir():
        shutil.copytree(path, odd)
        packed = state = load_file(path / "model.safetensors")
    else:
        odd.mkdir()
        odd = odd / path.name
        packed = torch.load(path, weights_only=False)  # our own file: keep its container (args etc.)
        state = packed.get("model", packed)
    key = next(k for k in sorted(state) if re.search(r"decoder\.layers\.0\..*norm[\w.]*\.weight$", k))
    state[key] = torch.ones(state[key].shape[0] + 1)
    save_file(packed, odd / "model.safetensors") if path.is_dir() else torch.save(packed, odd)
    _fails_clearly(source, odd, key)
