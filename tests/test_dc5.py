"""DC5 (layer4 dilated, stride 16): the backbone's geometry, the official and Hugging Face DC5
files converting with the dilation on, parity with transformers' Conditional DETR-DC5, the presets."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network, before transformers is imported

import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from released import (conditional_detr_layout, hf_conditional_detr_dc5, sam_detr_layout,  # noqa: E402
                      save_conditional_detr, save_sam_detr)

from sparsedet import Detector  # noqa: E402
from sparsedet.cli import main  # noqa: E402
from sparsedet.errors import SparsedetError  # noqa: E402
from sparsedet.nn.backbone import ResNet  # noqa: E402
from sparsedet.presets import get_preset  # noqa: E402
from sparsedet.tools.convert import convert  # noqa: E402
from sparsedet.tools.convert.hf_conditional_detr import read_config  # noqa: E402

# An R50 of width 8 (the converters read the depth from the keys; the width is passed).
SMALL = {"backbone.depth": 50, "backbone.width": 8, "backbone.weights": None, "num_encoder_layers": 1,
         "num_decoder_layers": 2, "ffn_dim": 64, "num_queries": 30}
WIDTH = {"model.backbone.width": 8}


def _resnets(**kwargs) -> tuple[ResNet, ResNet]:
    """The same random weights as a C5 and a DC5 ResNet-50 of width 8 (eval, frozen batch norm)."""
    torch.manual_seed(0)
    c5 = ResNet(50, 8, **kwargs).eval()
    with torch.no_grad():  # batch norm off the identity (convolutions keep their init: the maps keep structure)
        for name, t in c5.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(1 + torch.rand_like(t))
            elif name.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
                t.copy_(0.5 + 0.5 * torch.rand_like(t))
            elif t.dim() == 1:
                t.copy_(torch.randn_like(t) * 0.1)
    dc5 = ResNet(50, 8, dilation=True, **kwargs).eval()
    dc5.load_state_dict(c5.state_dict())
    return c5, dc5


def test_dc5_is_stride_16_and_the_c5_map_is_its_every_second_cell():
    """At 100x140 (no multiple of 32) C5 is 4x5 and DC5 7x9 = ceil(size / 16). With the same weights
    the C5 map is the DC5 map's every second cell (a trous): true only if layer4's first block keeps
    dilation 1 and the later 3x3 convolutions dilate by 2, as torchvision and timm build DC5."""
    c5, dc5 = _resnets(return_layers=(2, 3, 4))
    assert c5.out_strides == [8, 16, 32] and dc5.out_strides == [8, 16, 16]
    assert dc5.out_channels == c5.out_channels == [64, 128, 256]
    x = torch.rand(1, 3, 100, 140, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (c3, c4, c5_map), (d3, d4, dc5_map) = c5(x), dc5(x)
    assert c5_map.shape[-2:] == (math.ceil(100 / 32), math.ceil(140 / 32)) == (4, 5)
    assert dc5_map.shape[-2:] == d4.shape[-2:] == (math.ceil(100 / 16), math.ceil(140 / 16)) == (7, 9)
    assert torch.equal(d3, c3) and torch.equal(d4, c4)
    # Measured 4e-7; a dilated first block or an undilated last one misses by 5e-2.
    torch.testing.assert_close(dc5_map[..., ::2, ::2], c5_map, rtol=1e-5, atol=1e-5)
    assert (dc5_map[..., 1::2, :] - dc5_map[..., 0:-1:2, :]).abs().max() > 0.1  # the cells in between are new


def test_dc5_needs_bottleneck_blocks_and_a_built_layer4():
    with pytest.raises(SparsedetError, match="ResNet-50 or -101"):
        ResNet(18, 8, return_layers=(4,), dilation=True)
    with pytest.raises(SparsedetError, match="changes layer4"):
        ResNet(50, 8, return_layers=(3,), dilation=True)


def test_official_conditional_detr_dc5_converts_bit_exactly_with_the_dilation_on(tmp_path):
    torch.manual_seed(0)
    ours = Detector.from_preset("conditional_detr_dc5_r50", **SMALL).state_dict()
    path = save_conditional_detr(tmp_path, conditional_detr_layout(ours), dilation=True)
    converted, config = convert("official-conditional-detr", path, WIDTH)
    assert config.model.backbone.dilation and config.model.backbone.depth == 50
    assert converted.backbone.out_strides == [16]
    got = converted.state_dict()
    assert got.keys() == ours.keys() and all(torch.equal(got[k], ours[k]) for k in ours)


def test_zoo_dc5_releases_convert_dilated_even_from_a_file_without_args(tmp_path):
    from sparsedet.tools.zoo import ZOO

    dc5 = {name: r for name, r in ZOO.items() if "_dc5_" in name}
    assert sorted(dc5) == ["conditional_detr_dc5_r50_50ep", "sam_detr_dc5_r50_12ep", "sam_detr_dc5_r50_50ep",
                           "sam_detr_smca_dc5_r50_12ep", "sam_detr_smca_dc5_r50_50ep"]
    torch.manual_seed(0)
    path = tmp_path / "bare.pth"  # the weights alone: nothing in the file tells DC5
    torch.save({"model": conditional_detr_layout(Detector.from_preset("conditional_detr_dc5_r50", **SMALL).state_dict())},
               path)
    for release in dc5.values():
        assert release.source in ("official-conditional-detr", "official-sam-detr")
        assert "backbone.dilation=true" in release.overrides
    _, config = convert("official-conditional-detr", path, [*dc5["conditional_detr_dc5_r50_50ep"].overrides,
                                                             "backbone.width=8"])
    assert config.model.backbone.dilation


@pytest.mark.parametrize("preset", ["sam_detr_dc5_r50", "sam_detr_smca_dc5_r50"])
def test_official_sam_detr_dc5_converts_bit_exactly_with_the_dilation_on(tmp_path, preset):
    torch.manual_seed(0)
    ours = Detector.from_preset(preset, **SMALL).state_dict()
    smca = preset == "sam_detr_smca_dc5_r50"
    converted, config = convert("official-sam-detr", save_sam_detr(tmp_path, sam_detr_layout(ours), True, smca), WIDTH)
    m = config.model
    assert (m.backbone.dilation, m.decoder.smca, m.input_norm, m.num_decoder_layers) == (True, smca, False, 2)
    got = converted.state_dict()
    assert got.keys() == ours.keys() and all(torch.equal(got[k], ours[k]) for k in ours)


@pytest.fixture(scope="module")
def hf_dc5(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "conditional_dc5"
    return hf_conditional_detr_dc5(directory, layers=2, queries=20), directory


def test_hf_conditional_detr_dc5_matches_transformers(hf_dc5):
    from hf_parity import compare, padded_batch

    hf, directory = hf_dc5
    model, config = convert("hf-conditional-detr", directory)
    assert config.model.backbone.dilation and model.backbone.out_strides == [16]
    compare(hf, model, *padded_batch(4))  # 128x160 and 96x112 padded: masks and positions at stride 16


def test_hf_config_tells_dc5_as_transformers_builds_it(hf_dc5, tmp_path):
    """transformers 4 files say ``dilation`` with a timm ResNet named at the top level; transformers'
    own ResNet ignores ``dilation`` (the model runs, and converts, undilated, with a warning)."""
    config = json.loads((hf_dc5[1] / "config.json").read_text())
    config_v4 = {k: v for k, v in config.items() if k != "backbone_config"}
    for case, cfg, dilated in (("v5", config, True), ("v4", {**config_v4, "use_timm_backbone": True}, True),
                               ("v4_c5", {**config_v4, "dilation": False}, False)):
        (tmp_path / case).mkdir()
        (tmp_path / case / "config.json").write_text(json.dumps(cfg))
        assert read_config(tmp_path / case)["model.backbone.dilation"] is dilated, case
    native = {**config, "backbone_config": {"model_type": "resnet", "depths": [3, 4, 6, 3],
                                            "hidden_sizes": [256, 512, 1024, 2048], "out_features": ["stage4"]}}
    (tmp_path / "native").mkdir()
    (tmp_path / "native" / "config.json").write_text(json.dumps(native))
    with pytest.warns(UserWarning, match="ignores it"):
        assert read_config(tmp_path / "native")["model.backbone.dilation"] is False


def test_dc5_presets_follow_their_c5_presets():
    for name, c5_name in (("conditional_detr_dc5_r50", "conditional_detr_r50"), ("sam_detr_dc5_r50", "sam_detr_r50"),
                          ("sam_detr_smca_dc5_r50", "sam_detr_smca_r50")):
        dc5, c5 = get_preset(name), get_preset(c5_name)
        assert dc5.model.backbone.dilation and not c5.model.backbone.dilation
        assert dc5.train.batch_size == 1  # the official DC5 runs: one image per GPU
        dc5.model.backbone.dilation, dc5.train.batch_size, dc5.preset = False, c5.train.batch_size, c5.preset
        assert dc5 == c5, name
        with torch.device("meta"):
            model = Detector.from_config(get_preset(name))
        assert model.backbone.out_strides == [16] and model.backbone.layer4[1].conv2.dilation == (2, 2)


def test_tiny_dc5_conditional_detr_trains(synth, tmp_path):
    from tiny import TINY

    run = tmp_path / "run"
    assert main(["train", "--preset", "conditional_detr_dc5_r50", "--train", synth["train"], "--out", str(run),
                 "--no-progress", *TINY, "model.backbone.weights=null", "train.seed=3", "train.log_every=1"]) == 0
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    model = Detector.from_pretrained(run)
    assert model.run_config.model.backbone.dilation and model.backbone.out_strides == [16]
