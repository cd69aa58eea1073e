"""Swin-backbone checkpoints of DINO, Sparse DETR, Focus-DETR and Salience DETR: the fixture's official
transformer with a tiny Swin (16 channels, Swin-T's blocks, window 3) under each repository's names
converts with the backbone read from the keys (variant, width, window, stages, output norms) and its
weights unchanged; a Swin the model cannot build is refused naming what it found."""
import pytest
import torch
from released import official_fixture_file, official_swin

from sparsedet.errors import SparsedetError
from sparsedet.nn.swin import SwinTransformer
from sparsedet.tools.convert import convert

# source: (fixture, where the repository keeps its Swin, torchvision's names, output norms)
CASES = {
    "official-dino": ("dino", "backbone.0.", False, True),
    "official-sparse-detr": ("sparse_detr", "backbone.0.body.", False, True),
    "official-focus-detr": ("focus_detr", "backbone.", False, True),
    "official-salience-detr": ("salience_detr", "backbone.0.", True, False),
}


def tiny_swin(output_norms: bool) -> SwinTransformer:
    """Swin-T's blocks at 16 channels (1/1/2/4 heads), window 3, every tensor random (norms too)."""
    torch.manual_seed(0)
    swin = SwinTransformer("T", embed_dim=16, window=3, output_norms=output_norms)
    with torch.no_grad():
        for p in swin.parameters():
            p.copy_(torch.randn_like(p))
    return swin


def swin_file(source: str, official, shared_dir, tmp_path, drop: str = ""):
    """The source's fixture file with the tiny Swin (its keys under ``prefix + drop`` left out) and the
    input projections resized from ResNet-50's channels to the Swin's: (path, swin, projections)."""
    name, prefix, torchvision, norms = CASES[source]
    swin = tiny_swin(norms)
    backbone = {k: v for k, v in official_swin(swin, prefix, torchvision).items()
                if not drop or not k.startswith(prefix + drop)}
    widths = dict(zip((512, 1024, 2048), swin.out_channels))
    fixture = official(name)
    projections = {k: torch.randn(v.shape[0], widths[v.shape[1]], *v.shape[2:]) for k, v in fixture[0].items()
                   if v.dim() == 4 and v.shape[1] in widths and not k.startswith("transformer.")}
    path, *_ = official_fixture_file(name, lambda _: fixture, shared_dir, tmp_path, backbone | projections)
    return path, swin, projections


@pytest.mark.parametrize("source", list(CASES))
def test_swin_checkpoint_converts_with_its_backbone_read_from_the_keys(source, official, shared_dir, tmp_path):
    path, swin, projections = swin_file(source, official, shared_dir, tmp_path)
    model, config = convert(source, path)
    b = config.model.backbone
    assert (b.kind, b.variant, b.embed_dim, b.window_size, b.return_layers, b.output_norms) == \
        ("swin", "T", 16, 3, [2, 3, 4], CASES[source][3])
    got, expected = model.backbone.state_dict(), swin.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    # The input projections follow the Swin's channels (192/384/768 for the real Swin-T; 32/64/128 here).
    ours = sorted((tuple(v.shape) for k, v in model.state_dict().items()
                   if k.startswith("neck.input_proj.") and k.endswith(".0.weight")), key=str)
    assert ours == sorted((tuple(v.shape) for v in projections.values()), key=str)
    assert all(any(torch.equal(v, p) for p in projections.values()) for k, v in model.state_dict().items()
               if k.startswith("neck.input_proj.") and k.endswith(".0.weight"))


def test_a_swin_of_no_known_variant_is_refused(official, shared_dir, tmp_path):
    path, *_ = swin_file("official-dino", official, shared_dir, tmp_path, drop="layers.2.blocks.5.")
    path.rename(short := tmp_path / "short_stage.pth")
    # Stage 3 keeps 5 of Swin-T's 6 blocks: no variant has that many; the message says what it found.
    with pytest.raises(SparsedetError, match=r"official-dino: .*short_stage.pth: a Swin backbone with \[2, 2, 5, 2\] "
                                             r"blocks per stage is none of Swin-T/S/B/L"):
        convert("official-dino", short)


def test_five_scale_returns_every_stage():
    """DINO's 5-scale Swin-L returns stage 1 too (out_indices 0-3, norm0..norm3): the 1x1 input
    projections' channels say which stages, the 3x3 one is the extra level."""
    from sparsedet.tools.convert.swin import swin_overrides

    swin = SwinTransformer("L", embed_dim=16, window=3, return_layers=(1, 2, 3, 4))
    state = {f"backbone.{k}": v for k, v in swin.state_dict().items()}
    state.update({f"neck.input_proj.{i}.0.weight": torch.zeros(8, c, 1, 1) for i, c in enumerate(swin.out_channels)})
    state["neck.input_proj.4.0.weight"] = torch.zeros(8, swin.out_channels[-1], 3, 3)
    assert swin_overrides(state) == {"model.backbone.kind": "swin", "model.backbone.variant": "S",
                                     "model.backbone.window_size": 3, "model.backbone.return_layers": [1, 2, 3, 4],
                                     "model.backbone.output_norms": True, "model.backbone.embed_dim": 16}


def test_converted_swin_run_reloads_as_it_was_converted(official, shared_dir, tmp_path):
    """The run folder records the Swin fields (here without output norms), so it rebuilds the same model."""
    from sparsedet import Detector
    from sparsedet.tools.convert import convert_to_run

    path, swin, _ = swin_file("official-salience-detr", official, shared_dir, tmp_path)
    convert_to_run("official-salience-detr", path, tmp_path / "run")
    model = Detector.from_pretrained(tmp_path / "run")
    got, expected = model.backbone.state_dict(), swin.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert not model.config.backbone.output_norms and model.config.backbone.window_size == 3
