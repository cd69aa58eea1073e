"""Hugging Face Conditional DETR -> sparsedet: end-to-end parity (random R50 model, no download),
names of both transformers generations, CLI, and bad input."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network, before transformers is imported

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")

from hf_parity import compare, padded_batch  # noqa: E402
from released import hf_conditional_detr  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from sparsedet.errors import SparsedetError  # noqa: E402
from sparsedet.tools.convert import convert  # noqa: E402

NUM_CLASSES, LAYERS, QUERIES = 5, 2, 50


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A random transformers Conditional DETR (ResNet-50, C5), saved: (model, dir)."""
    directory = tmp_path_factory.mktemp("hf") / "conditional"
    return hf_conditional_detr(directory, 50, LAYERS, QUERIES, NUM_CLASSES), directory


@pytest.fixture(scope="module")
def converted(hf_model):
    return convert("hf-conditional-detr", hf_model[1])


def test_outputs_match_hf(hf_model, converted):
    model, config = converted
    m = config.model
    assert (m.kind, m.num_queries, m.num_encoder_layers, m.num_decoder_layers, m.backbone.depth) == (
        "conditional", QUERIES, LAYERS, LAYERS, 50)
    assert config.model.classes == [f"thing{i}" for i in range(NUM_CLASSES)]
    images = torch.rand(1, 3, 128, 160, generator=torch.Generator().manual_seed(3))
    compare(hf_model[0], model, images, torch.zeros(1, 128, 160, dtype=torch.bool))
    compare(hf_model[0], model, *padded_batch(4))


def test_transformers4_names_convert_to_the_same_weights(hf_model, converted, tmp_path):
    """Hub files written by transformers 4 use the official sa_*/ca_* names and fc1/fc2."""
    _, directory = hf_model
    v4 = {}
    for key, value in load_file(directory / "model.safetensors").items():
        key = key.replace(".mlp.fc", ".fc")
        for attn, prefix in (("self_attn", "sa"), ("encoder_attn", "ca")):
            for part in ("q_content", "q_pos", "k_content", "k_pos", "v", "q_pos_sine"):
                if ".decoder.layers." in key and f".{attn}.{part}_proj." in key:
                    key = key.replace(f".{attn}.{part}_proj.", f".{prefix}_{part.replace('_', '')}_proj.")
        v4[key.replace(".o_proj.", ".out_proj.")] = value
    assert "model.decoder.layers.0.ca_qpos_sine_proj.weight" in v4
    legacy = tmp_path / "v4"
    legacy.mkdir()
    (legacy / "config.json").write_text((directory / "config.json").read_text())
    save_file(v4, legacy / "model.safetensors")
    model, _ = convert("hf-conditional-detr", legacy)
    ours = converted[0].state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())


def test_cli_convert_writes_a_run(hf_model, tmp_path):
    from sparsedet import Detector
    from sparsedet.cli import main

    run = tmp_path / "run"
    assert main(["convert", "--from", "hf-conditional-detr", str(hf_model[1]), "--out", str(run)]) == 0
    compare(hf_model[0], Detector.from_pretrained(run), *padded_batch(5))


def test_bad_input_is_a_clear_error(hf_model, tmp_path):
    _, directory = hf_model
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    config = json.loads((directory / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "model_type": "deformable_detr"}))
    with pytest.raises(SparsedetError, match="not 'conditional_detr'"):
        convert("hf-conditional-detr", wrong)
    state = load_file(directory / "model.safetensors")
    state.pop("model.decoder.query_scale.layers.0.weight")
    state["model.mask_head.weight"] = torch.zeros(2)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text((directory / "config.json").read_text())
    save_file(state, odd / "model.safetensors")
    with pytest.raises(SparsedetError, match="model.mask_head.weight"):
        convert("hf-conditional-detr", odd)
    state.pop("model.mask_head.weight")
    save_file(state, odd / "model.safetensors")
    with pytest.raises(SparsedetError, match="decoder.query_scale.layers.0.weight"):
        convert("hf-conditional-detr", odd)
