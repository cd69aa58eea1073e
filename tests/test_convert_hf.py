"""Hugging Face Deformable DETR -> sparsedet conversion: layout, backbone parity, errors, end-to-end parity."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network, before transformers is imported

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from hf_parity import compare, padded_batch  # noqa: E402
from released import hf_deformable_detr  # noqa: E402

from sparsedet.errors import SparsedetError  # noqa: E402
from sparsedet.tools.convert import convert  # noqa: E402
from sparsedet.tools.convert.hf_deformable_detr import convert_hf_deformable_detr  # noqa: E402

NUM_CLASSES, LAYERS, QUERIES = 5, 2, 100


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """Two-stage, box-refining, ResNet-50, 2 + 2 layers, 100 queries: (HF model, saved directory)."""
    directory = tmp_path_factory.mktemp("hf") / "deformable"
    return hf_deformable_detr(directory, 50, True, True, LAYERS, QUERIES), directory


@pytest.fixture(scope="module")
def converted(hf_model):
    return convert_hf_deformable_detr(hf_model[1])


def test_config_overrides(converted):
    _, overrides = converted
    assert overrides == {
        "model.num_classes": NUM_CLASSES, "model.hidden_dim": 256, "model.ffn_dim": 1024, "model.num_heads": 8,
        "model.num_encoder_layers": LAYERS, "model.num_decoder_layers": LAYERS, "model.num_queries": QUERIES,
        "model.num_levels": 4, "model.enc_points": 4, "model.dec_points": 4, "model.two_stage": True,
        "model.box_refine": True, "model.backbone.depth": 50,
        "classes": [f"thing{i}" for i in range(NUM_CLASSES)], "category_ids": list(range(NUM_CLASSES)),
    }


def test_keys_follow_our_layout(hf_model, converted):
    hf, _ = hf_model
    sd, _ = converted
    layer_ids = {part: {int(k.split(".")[2]) for k in sd if k.startswith(f"{part}.layers.")}
                 for part in ("encoder", "decoder")}
    assert layer_ids == {"encoder": {0, 1}, "decoder": {0, 1}}
    assert {k.split(".")[0] for k in sd} == {"backbone", "neck", "encoder", "decoder", "queries", "heads"}
    # Two-stage with refinement: unshared heads per decoder layer, index L is the proposal head.
    assert {k for k in sd if k.startswith("heads.class_embed.")} == {
        f"heads.class_embed.{k}.{p}" for k in range(LAYERS) for p in ("weight", "bias")}
    torch.testing.assert_close(sd["heads.class_embed.1.weight"], hf.class_embed[1].weight, rtol=0, atol=0)
    torch.testing.assert_close(sd["queries.class_head.weight"], hf.class_embed[LAYERS].weight, rtol=0, atol=0)
    torch.testing.assert_close(sd["queries.box_head.layers.2.bias"], hf.bbox_embed[LAYERS].layers[2].bias,
                               rtol=0, atol=0)
    assert not torch.equal(sd["heads.class_embed.0.weight"], sd["heads.class_embed.1.weight"])
    # Decoder self-attention fused into torch MultiheadAttention's in_proj (q, k, v).
    attn = hf.model.decoder.layers[1].self_attn
    torch.testing.assert_close(sd["decoder.layers.1.self_attn.in_proj_weight"],
                               torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                               rtol=0, atol=0)
    torch.testing.assert_close(sd["decoder.layers.1.norm2.weight"],
                               hf.model.decoder.layers[1].self_attn_layer_norm.weight, rtol=0, atol=0)
    torch.testing.assert_close(sd["decoder.layers.1.norm1.weight"],
                               hf.model.decoder.layers[1].encoder_attn_layer_norm.weight, rtol=0, atol=0)
    shapes = {
        "backbone.conv1.weight": (64, 3, 7, 7), "backbone.layer3.5.conv3.weight": (1024, 256, 1, 1),
        "backbone.layer2.0.downsample.0.weight": (512, 256, 1, 1), "backbone.layer4.2.bn2.running_var": (512,),
        "neck.input_proj.3.0.weight": (256, 2048, 3, 3), "neck.input_proj.2.1.weight": (256,),
        "neck.level_embed": (4, 256), "encoder.layers.1.self_attn.sampling_offsets.weight": (256, 256),
        "encoder.layers.0.linear1.weight": (1024, 256), "decoder.layers.1.self_attn.in_proj_bias": (768,),
        "decoder.layers.0.cross_attn.attention_weights.weight": (128, 256), "decoder.layers.0.norm3.bias": (256,),
        "queries.pos_trans.weight": (512, 512), "queries.enc_output_norm.weight": (256,),
        "queries.class_head.weight": (NUM_CLASSES, 256), "heads.box_embed.1.layers.2.weight": (4, 256),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert not any("num_batches_tracked" in k or "query_embed" in k or "reference_points" in k for k in sd)


def test_backbone_matches_hf(hf_model, converted):
    from sparsedet.nn.backbone import ResNet

    hf, _ = hf_model
    sd, _ = converted
    ours = ResNet(depth=50).eval()
    ours.load_state_dict({k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")})
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf.model.backbone.model(x).feature_maps
        got = ours(x)
    assert len(got) == len(expected) == 3
    # The stride-16 map reaches about 115 here: float32 rounding, which differs between CPUs' conv
    # kernels (and our frozen norms are folded into the convolutions), scales with it.
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def _copy_config(src, dst):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")


def test_not_deformable_detr_is_a_clear_error(hf_model, tmp_path):
    _, directory = hf_model
    bad = tmp_path / "detr"
    _copy_config(directory, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "detr"}))
    with pytest.raises(SparsedetError, match="not 'deformable_detr'"):
        convert_hf_deformable_detr(bad)
    with pytest.raises(SparsedetError, match="not a directory"):
        convert_hf_deformable_detr(tmp_path / "missing")
    no_weights = tmp_path / "no_weights"
    _copy_config(directory, no_weights)
    with pytest.raises(SparsedetError, match="no weights in"):
        convert_hf_deformable_detr(no_weights)


def test_unknown_and_missing_keys_are_listed(hf_model, tmp_path):
    _, directory = hf_model
    state = load_file(directory / "model.safetensors")
    state.pop("model.level_embed")
    state["model.mask_head.weight"] = torch.zeros(2)
    bad = tmp_path / "odd"
    _copy_config(directory, bad)
    save_file(state, bad / "model.safetensors")
    with pytest.raises(SparsedetError) as err:  # the layout is checked against the model the config builds
        convert("hf-deformable-detr", bad)
    message = str(err.value)
    assert "model.mask_head.weight" in message and "neck.level_embed" in message
    assert str(bad / "model.safetensors") in message


def test_transformers4_hub_layout_converts(hf_model, converted, tmp_path):
    """Hub checkpoints: timm backbone (torchvision names), legacy prefix, heads stored twice."""
    _, directory = hf_model
    sd, _ = converted
    state = {k: v for k, v in load_file(directory / "model.safetensors").items() if ".backbone." not in k}
    for key, value in sd.items():
        if key.startswith("backbone."):
            state["model.backbone.conv_encoder.model." + key.removeprefix("backbone.")] = value.clone()
    state["model.backbone.conv_encoder.model.layer1.0.downsample.1.num_batches_tracked"] = torch.tensor(0)
    for key in [k for k in state if k.startswith("model.decoder.") and "_embed." in k]:
        state[key.removeprefix("model.decoder.")] = state[key].clone()
    legacy = tmp_path / "hub"
    legacy.mkdir()
    config = json.loads((directory / "config.json").read_text())
    config.update(backbone_config=None, use_timm_backbone=True, backbone="resnet50")
    (legacy / "config.json").write_text(json.dumps(config))
    torch.save(state, legacy / "pytorch_model.bin")
    got, overrides = convert_hf_deformable_detr(legacy)
    assert overrides["model.backbone.depth"] == 50
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_differing_duplicate_heads_are_an_error(hf_model, tmp_path):
    _, directory = hf_model
    state = load_file(directory / "model.safetensors")
    state["class_embed.0.weight"] = state["model.decoder.class_embed.0.weight"] + 1.0
    state["class_embed.0.bias"] = state["model.decoder.class_embed.0.bias"].clone()
    bad = tmp_path / "dup"
    _copy_config(directory, bad)
    save_file(state, bad / "model.safetensors")
    with pytest.raises(SparsedetError, match="differ"):
        convert_hf_deformable_detr(bad)


def _our_model(preset: str, converted):
    from sparsedet import Detector

    sd, overrides = converted
    # As `convert` builds it: the official handling of a padded batch.
    model = Detector.from_preset(preset, **overrides, mask_padding=False).eval()
    model.load_state_dict(sd)
    return model


@pytest.fixture(scope="module")
def our_model(converted):
    return _our_model("deformable_detr_r50_two_stage", converted)


def test_outputs_match_hf(hf_model, our_model):
    images = torch.rand(1, 3, 128, 160, generator=torch.Generator().manual_seed(3))
    compare(hf_model[0], our_model, images, torch.zeros(1, 128, 160, dtype=torch.bool))


def test_padded_batch_matches_hf(hf_model, our_model):
    compare(hf_model[0], our_model, *padded_batch(4))


@pytest.mark.parametrize("box_refine", [False, True])
def test_single_stage_matches_hf(tmp_path, box_refine):
    """Shared heads (plain) and per-layer heads (refinement; transformers 5 stores class_embed.0 only)."""
    hf = hf_deformable_detr(tmp_path / "hf", 18, False, box_refine, layers=2, queries=30)
    sd, overrides = converted = convert_hf_deformable_detr(tmp_path / "hf")
    assert overrides["model.backbone.depth"] == 18 and overrides["model.num_queries"] == 30
    assert ("heads.class_embed.1.weight" in sd) == box_refine and "queries.query_embed.weight" in sd
    compare(hf, _our_model("deformable_detr_r50", converted), *padded_batch(5))


def test_cli_convert_writes_a_run_that_predicts_like_hf(hf_model, tmp_path):
    """`sparsedet convert --from hf-deformable-detr` gives a run folder that loads and matches HF."""
    from sparsedet import Detector
    from sparsedet.cli import main

    run = tmp_path / "run"
    assert main(["convert", "--from", "hf-deformable-detr", str(hf_model[1]), "--out", str(run)]) == 0
    model = Detector.from_pretrained(run)
    assert model.classes == [f"thing{i}" for i in range(NUM_CLASSES)]
    images = torch.rand(1, 3, 128, 160, generator=torch.Generator().manual_seed(5))
    compare(hf_model[0], model, images, torch.zeros(1, 128, 160, dtype=torch.bool))
