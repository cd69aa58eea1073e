"""The Swin backbone: features equal transformers' SwinBackbone under the official names, the
official key layout, ImageNet files (skipped tensors, resized bias tables), padding and masks, the
Swin presets' sizes against the papers, and a few training steps."""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsedet import Detector
from sparsedet.cli import main
from sparsedet.config import BackboneConfig, apply_overrides
from sparsedet.data.batch import Batch
from sparsedet.errors import SparsedetError
from sparsedet.models.backbones import build_backbone
from sparsedet.nn.swin import SwinTransformer, shift_mask
from sparsedet.presets import get_preset
from tiny import TINY

DATA = Path(__file__).parent / "data"


def _official_from_transformers(state: dict) -> dict:
    """transformers' SwinBackbone names -> the official release's (q/k/v fused into qkv in that
    order; ``hidden_states_norms.stage{i}`` is the detection code's ``norm{i-1}``)."""
    rename = [("swin.", ""), ("embeddings.patch_embeddings.projection", "patch_embed.proj"),
              ("embeddings.norm", "patch_embed.norm"), ("encoder.layers", "layers"), ("layernorm_before", "norm1"),
              ("layernorm_after", "norm2"), ("attention.relative_position_bias.", "attn."),
              ("attention.o_proj", "attn.proj")]
    out = {}
    for key, value in state.items():
        for old, new in rename:
            key = key.replace(old, new)
        if key.startswith("layernorm."):  # SwinModel's classification norm: unused by the backbone
            continue
        if m := re.fullmatch(r"hidden_states_norms\.stage(\d)\.(\w+)", key):
            key = f"norm{int(m.group(1)) - 1}.{m.group(2)}"
        out[key] = value
    for key in [k for k in out if ".attention.q_proj." in k]:
        block, leaf = key.split(".attention.q_proj.")
        out[f"{block}.attn.qkv.{leaf}"] = torch.cat([out.pop(f"{block}.attention.{p}_proj.{leaf}") for p in "qkv"])
    return out


@pytest.mark.parametrize("size", [(100, 140), (77, 131)])  # no side a multiple of the window at any stage
def test_features_equal_transformers_swin_backbone(size):
    from transformers import SwinBackbone, SwinConfig
    torch.manual_seed(0)
    # Swin-T's blocks at 32 channels (one head per 32, as every official variant), window 3.
    config = SwinConfig(embed_dim=32, depths=[2, 2, 6, 2], num_heads=[1, 2, 4, 8], window_size=3,
                        out_features=["stage2", "stage3", "stage4"], drop_path_rate=0.0)
    theirs = SwinBackbone(config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():  # not their init: every tensor matters
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.2)
    ours = SwinTransformer("T", embed_dim=32, window=3, drop_path=0.0, return_layers=(2, 3, 4)).eval()
    ours.load_state_dict(_official_from_transformers(theirs.state_dict()), strict=True)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected, got = theirs(x).feature_maps, ours(x)
    assert [tuple(f.shape[1:]) for f in got] == [(64 * 2 ** i, -(-size[0] // s), -(-size[1] // s))
                                                  for i, s in enumerate((8, 16, 32))]
    for e, g in zip(expected, got):
        assert (e - g).abs().max() < 1e-4 and e.abs().max() > 0.5


@pytest.mark.parametrize("variant,file", [("T", "swin_t_official_keys.json"), ("B", "swin_b_official_keys.json")])
def test_state_dict_has_the_official_detection_layout(variant, file):
    # The official detection backbone's state dict (out_indices 1-3) in order; we derive the
    # relative_position_index buffers instead of saving them.
    official = [k for k in json.loads((DATA / file).read_text()) if not k.endswith(".relative_position_index")]
    with torch.device("meta"):
        ours = SwinTransformer(variant, window=12 if variant == "B" else 7)
    assert list(ours.state_dict()) == official


def _imagenet_file(model: SwinTransformer, path: Path) -> dict:
    """An official-looking ImageNet file of ``model``'s tensors: no detection norms, plus the
    classifier, its norm and the buffers the official code saves."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not re.match(r"norm\d\.", k)}
    last = model.channels[-1]
    state.update({"norm.weight": torch.ones(last), "norm.bias": torch.zeros(last), "head.weight": torch.zeros(10, last),
                  "head.bias": torch.zeros(10),
                  "layers.0.blocks.0.attn.relative_position_index": torch.zeros(9, 9).long(),
                  "layers.0.blocks.1.attn_mask": torch.zeros(4, 9, 9)})
    torch.save({"model": state}, path)
    return state


def test_loads_an_official_imagenet_file_and_resizes_bias_tables(tmp_path):
    torch.manual_seed(0)
    source = SwinTransformer("T", embed_dim=32, window=3)
    state = _imagenet_file(source, tmp_path / "swin.pth")
    same = SwinTransformer("T", embed_dim=32, window=3)
    same.load_weights(tmp_path / "swin.pth")
    assert all(torch.equal(v, state[k]) for k, v in same.state_dict().items() if k in state)
    # Another window: a table whose (2w-1) x (2w-1) grid is a plane stays that plane, resampled.
    table = "layers.2.blocks.1.attn.relative_position_bias_table"
    ramp = torch.arange(5.0).repeat(5)[:, None] * torch.tensor([1.0, -2.0, 0.5, 3.0])  # 4 heads, grows along x
    state[table] = ramp
    torch.save({"model": state}, tmp_path / "swin.pth")
    wider = SwinTransformer("T", embed_dim=32, window=5)
    wider.load_weights(tmp_path / "swin.pth")
    grid = wider.state_dict()[table].T.reshape(4, 9, 9)
    assert torch.allclose(grid[:, 0], grid[:, 8]) and torch.all(grid[0, :, 1:] > grid[0, :, :-1])  # rows equal, x rises
    # The centre (relative offset 0) stays on the old centre's value, 2 x each head's slope.
    assert torch.allclose(grid[:, :, 4], torch.tensor([2.0, -4.0, 1.0, 6.0])[:, None].expand(4, 9))
    # A file of another variant is refused with what it expected.
    with pytest.raises(SparsedetError, match="do not fit Swin-B"):
        SwinTransformer("B", embed_dim=32, window=3).load_weights(tmp_path / "swin.pth")


def test_imagenet_names_pick_the_official_release_file(tmp_path, monkeypatch):
    from sparsedet.tools import imagenet
    monkeypatch.setenv("SPARSEDET_HOME", str(tmp_path))
    monkeypatch.delenv("SPARSEDET_MIRROR", raising=False)
    cached = tmp_path / "downloads"
    cached.mkdir()
    for (variant, window, name), release_file in imagenet.SWIN_FILES.items():
        file = release_file.split("/")[-1]
        (cached / file).write_bytes(b"weights")  # in the cache: nothing is downloaded
        assert imagenet.swin_weights_path(name, variant, window) == str(cached / file)
        assert f"patch4_window{window}_{224 if window == 7 else 384}" in file
        assert ("22k" in file) == (name != "imagenet")
    assert imagenet.SWIN_FILES["T", 7, "imagenet"] == "v1.0.0/swin_tiny_patch4_window7_224.pth"
    with pytest.raises(SparsedetError, match="no imagenet file for Swin-L with window 7"):
        imagenet.swin_weights_path("imagenet", "L", 7)
    with pytest.raises(SparsedetError, match="embed_dim 32: pass a file of that width"):
        imagenet.swin_weights_path("imagenet", "T", 7, embed_dim=32)
    # A path goes through the detector's builder into the backbone.
    torch.manual_seed(0)
    state = _imagenet_file(SwinTransformer("T", embed_dim=32, window=3), tmp_path / "swin.pth")
    swin = {"backbone.kind": "swin", "backbone.embed_dim": 32, "backbone.window_size": 3}
    model = Detector.from_preset("dino_tiny", **swin, **{"backbone.weights": str(tmp_path / "swin.pth")})
    key = "layers.2.blocks.5.mlp.fc1.weight"
    assert torch.equal(model.backbone.state_dict()[key], state[key])


def test_window_attention_and_swin_t_costs_are_counted():
    from sparsedet.nn.swin import WindowAttention
    from sparsedet.ops.flops import count_macs
    attn = WindowAttention(64, 4, 2)  # 2 images x 3 windows of 16 tokens, 64 channels
    n, c = 16, 64
    assert count_macs(lambda: attn(torch.randn(2, 3, n, c)))["total"] == 2 * 3 * (4 * n * c * c + 2 * n * n * c)
    with torch.device("meta"):  # shapes are all the counter needs
        swin_t = SwinTransformer("T", return_layers=(4,), output_norms=False)
        macs = count_macs(lambda: swin_t(torch.empty(1, 3, 224, 224)))["total"]
    assert macs / 1e9 == pytest.approx(4.5, rel=0.01)  # the official Swin-T: 4.5 GFLOPs at 224 px


def test_frozen_stages_and_stochastic_depth_follow_the_official_rules():
    with torch.device("meta"):
        swin = SwinTransformer("T", frozen_stages=1, drop_path=0.2)
    frozen = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("layers") else "")
              for n, p in swin.named_parameters() if not p.requires_grad}
    assert frozen == {"patch_embed", "layers.0"}  # stage 1 with its patch merging (mmdet frozen_stages=2)
    rates = [b.drop_path.p for stage in swin.layers for b in stage.blocks]
    assert rates[:2] == [0.0, 0.0] and rates[-1] == pytest.approx(0.2) and rates[2] == pytest.approx(0.2 * 2 / 11)


def test_shift_mask_separates_the_wrapped_regions():
    mask = shift_mask(6, 6, 3, 1, torch.device("cpu"))  # 4 windows of 9 tokens
    assert mask.shape == (4, 9, 9) and mask[0].abs().sum() == 0  # the top-left window holds one region
    last = mask[3] == 0  # bottom-right window: 2 x 2 regions of 4, 2, 2 and 1 tokens
    assert sorted(last.sum(1).tolist()) == [1, 2, 2, 2, 2, 4, 4, 4, 4]


def _tiny_swin_detector(**overrides) -> Detector:
    cfg = get_preset("dino_tiny")
    apply_overrides(cfg, {"backbone.kind": "swin", "backbone.embed_dim": 32, "backbone.window_size": 4,
                          "backbone.frozen_stages": -1, "hidden_dim": 32, "ffn_dim": 32, "num_encoder_layers": 1,
                          "num_decoder_layers": 1, "num_queries": 10, "dn_queries": 4, "num_classes": 3, **overrides})
    torch.manual_seed(0)
    return Detector.from_config(cfg).eval()


def test_padding_masks_per_level_and_features_away_from_the_padding():
    model = _tiny_swin_detector()
    image = torch.rand(3, 128, 192)
    padded = model.features(Batch.from_images([image, torch.rand(3, 256, 256)]))
    assert padded.shapes == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert torch.allclose(padded.valid_ratios[0], torch.tensor([[0.75, 0.5]] * 4))
    for (h, w), pad in zip(padded.shapes, padded.padding[0].split([h * w for h, w in padded.shapes])):
        pad = pad.view(h, w)  # the image covers the top-left 1/2 x 3/4 of every level
        assert not pad[:h // 2, :w * 3 // 4].any() and pad[h // 2:].all() and pad[:, w * 3 // 4:].all()
    # Backbone maps: windows away from the bottom/right edge see no padding, so the stride-8 map
    # equals the unpadded image's there (the deeper maps of a 128 px image are all within a
    # shifted window of the edge: padding reaches them, as in the official code).
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        alone, padded = model.backbone(x)[0], model.backbone(F.pad(x, (0, 64, 0, 128)))[0]
    h, w = alone.shape[-2:]
    assert padded.shape[-2:] == (32, 32) and (h, w) == (16, 24)
    far = 2 * model.backbone.window  # two windows from the edge
    assert torch.allclose(alone[..., :h - far, :w - far], padded[..., :h - far, :w - far], atol=1e-5)
    assert not torch.allclose(alone[..., h - 1, :], padded[..., h - 1, :w], atol=1e-3)  # the edge does differ


# The papers' parameter counts (classes as their models: 91 COCO ids, 80 for the detrex ones):
# Sparse DETR's table (Swin-T), Focus-DETR's paper.
PAPER_PARAMS_M = {"deformable_detr_swin_t": 40.3, "sparse_detr_swin_t": 41.4, "focus_detr_swin_t": 49.0,
                  "focus_detr_swin_b": 109.0}


@pytest.mark.parametrize("preset", sorted(PAPER_PARAMS_M))
def test_parameter_counts_match_the_papers(preset):
    with torch.device("meta"):
        model = Detector.from_preset(preset)
    assert model.num_classes == (80 if preset.startswith("focus") else 91)
    # Sparse DETR's encoder heads are the decoder's last heads under another name (aliases,
    # counted once); ours are separate tensors.
    count = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("encoder.aux_heads."))
    assert abs(count / 1e6 / PAPER_PARAMS_M[preset] - 1) < 0.02, count


T_CHANNELS = [192, 384, 768]
SWIN_PRESETS = {"deformable_detr_swin_t": ("T", 7, 1, T_CHANNELS), "sparse_detr_swin_t": ("T", 7, 1, T_CHANNELS),
                "focus_detr_swin_t": ("T", 7, -1, T_CHANNELS), "focus_detr_swin_b": ("B", 12, -1, [256, 512, 1024]),
                "salience_detr_swin_l": ("L", 7, 1, [384, 768, 1536]), "dino_swin_t": ("T", 7, -1, T_CHANNELS),
                "dino_swin_l": ("L", 12, -1, [384, 768, 1536])}


@pytest.mark.parametrize("preset", sorted(SWIN_PRESETS))
def test_swin_presets_build_with_four_levels(preset):
    variant, window, frozen, channels = SWIN_PRESETS[preset]
    cfg = get_preset(preset)
    b = cfg.model.backbone
    assert (b.kind, b.variant, b.window_size, b.frozen_stages) == ("swin", variant, window, frozen)
    assert b.weights in ("imagenet", "imagenet-22k") and cfg.model.num_levels == 4
    with torch.device("meta"):
        model = Detector.from_config(cfg)
    assert model.backbone.out_channels == channels and model.backbone.out_strides == [8, 16, 32]
    assert len(model.neck.input_proj) == 4  # the fourth level: a stride-2 conv on the last map


def test_backbone_kind_defaults_to_resnet_and_refuses_fields_of_the_other_kind():
    from sparsedet.config import Config
    from sparsedet.nn.backbone import ResNet
    # A config.json from before backbone.kind: a ResNet with the keys it always had.
    old = get_preset("dino_tiny").to_dict()
    for key in ("kind", "variant", "embed_dim", "window_size", "drop_path", "output_norms"):
        del old["model"]["backbone"][key]
    with torch.device("meta"):
        backbone = build_backbone(Config.from_dict(old).model.backbone)
        assert isinstance(backbone, ResNet)
        assert list(backbone.state_dict()) == list(ResNet(18, 32, norm="bn", frozen_stages=-1).state_dict())
    with pytest.raises(SparsedetError, match="only the swin backbone reads it"):
        apply_overrides(get_preset("dino_r50"), {"backbone.window_size": 12})
    with pytest.raises(SparsedetError, match="only the resnet backbone reads it"):
        apply_overrides(get_preset("dino_swin_t"), {"backbone.depth": 101})
    with pytest.raises(SparsedetError, match="unknown model.backbone.kind"):
        build_backbone(BackboneConfig(kind="vit"))


def test_tiny_swin_detector_trains_a_few_steps(synth, tmp_path):
    run = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("model.backbone.width")]
    assert main(["train", "--preset", "dino_tiny", "--train", synth["train"], "--no-progress", "--out", str(run),
                 *tiny, "model.backbone.kind=swin", "model.backbone.embed_dim=32", "model.backbone.window_size=4",
                 "model.backbone.drop_path=0.1", "train.max_steps=3", "train.log_every=1", "train.eval_every=-1",
                 "train.seed=1"]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    reloaded = Detector.from_pretrained(run)
    assert reloaded.config.backbone.kind == "swin" and reloaded.backbone.window == 4
