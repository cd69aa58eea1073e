"""`sparsedet viz`: drawn tokens are the model's own selection, every encoder and decoder kind draws."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sparsedet.api import Detector
from sparsedet.cli import main
from sparsedet.models.encoders.scoring import LayerSelection
from sparsedet.tools.viz import cell_boxes, token_cells, visualize


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("viz") / "scene.png"
    Image.fromarray(rng.integers(0, 255, (120, 150, 3), dtype=np.uint8)).save(path)
    return path


def _tiny(preset):
    torch.manual_seed(0)
    return Detector.from_preset(preset, num_classes=3, eval_size=128, eval_max_size=160).eval()


def test_token_cells_and_boxes_by_hand():
    shapes = [(2, 3), (1, 2)]  # flat indices 0-5 on level 0, 6-7 on level 1
    cells = token_cells(torch.tensor([0, 4, 6, 7]), shapes)
    assert cells[0].tolist() == [[0, 0], [1, 1]] and cells[1].tolist() == [[0, 0], [0, 1]]
    # A 16x24 input: level 0 has stride 8, level 1 stride 16 (rows) x 12 (columns).
    assert cell_boxes(cells[0], shapes[0], (16, 24)) == [(0, 0, 8, 8), (8, 8, 16, 16)]
    assert cell_boxes(cells[1], shapes[1], (16, 24)) == [(0, 0, 12, 16), (12, 0, 24, 16)]


def test_drawn_tokens_are_the_selection_facts(image_path, tmp_path):
    """Replace the encoder's selection with a hand-made one: the figure must draw exactly it."""
    model = _tiny("focus_detr_tiny")
    chosen = torch.tensor([[0, 5, 17]])

    def hand_made(module, args, encoded):
        for t, layer in enumerate(encoded.selection.layers):
            encoded.selection.layers[t] = LayerSelection(chosen, layer.scores[:, :3], torch.tensor([3]))

    model.encoder.register_forward_hook(hand_made)
    facts = visualize(model, image_path, tmp_path)
    shapes = [tuple(s) for s in facts["levels"]]
    w0 = shapes[0][1]
    sy, sx = facts["padded_size"][0] / shapes[0][0], facts["padded_size"][1] / w0
    expected = [(c * sx, r * sy, (c + 1) * sx, (r + 1) * sy) for r, c in ((0, 0), (0, 5), (17 // w0, 17 % w0))]
    assert [tuple(b) for b in facts["token_boxes_layer0"][0]] == expected
    assert facts["tokens_per_layer"] == [3] * 3 and sum(facts["tokens_per_level_layer0"]) == 3
    # The first level's panel is coloured exactly on those cells: compare with the raw input.
    panel = np.asarray(Image.open(tmp_path / "tokens_per_level.png").convert("RGB")).astype(int)
    raw = model.preprocess([image_path])[2][0]
    scale = min(384 / raw.width, 384 / raw.height)
    for x0, y0, x1, y1 in expected:
        x, y = int((x0 + x1) / 2 * scale), int((y0 + y1) / 2 * scale)
        source = np.asarray(raw.resize((round(raw.width * scale), round(raw.height * scale))))[y, x].astype(int)
        assert np.abs(panel[y, x] - source).sum() > 30, (x, y)


@pytest.mark.parametrize("preset", ["deformable_detr_tiny", "sparse_detr_tiny", "salience_detr_tiny", "sam_detr_tiny"])
def test_every_kind_draws(preset, image_path, tmp_path):
    model = _tiny(preset)
    facts = visualize(model, image_path, tmp_path)
    for name in ("tokens_per_level", "tokens_per_layer", "decoder_query", "detections"):
        assert Image.open(tmp_path / f"{name}.png").size[0] > 0
    total = sum(h * w for h, w in facts["levels"])
    if preset in ("deformable_detr_tiny", "sam_detr_tiny"):  # dense: every token (one image: no padding)
        assert facts["tokens_per_layer"] == [total] * model.config.num_encoder_layers
    else:
        assert max(facts["tokens_per_layer"]) < total
    if preset == "sam_detr_tiny":
        assert "attention_peak_token" in facts["decoder"]
    else:
        c = model.config
        assert len(facts["decoder"]["points"]) == c.num_heads * c.num_levels * c.dec_points
        assert sum(p["weight"] for p in facts["decoder"]["points"]) == pytest.approx(c.num_heads, rel=1e-4)


def test_cli_viz_and_its_errors(image_path, tmp_path, capsys):
    with pytest.warns(UserWarning, match=r"no detection passed the score threshold 0.3 \(the default: none "
                      r"recorded\) on .*scene.png; the best score was 0.0\d\d, so --threshold 0.0\d would show some"):
        assert main(["viz", "dino_tiny", str(image_path), "--out", str(tmp_path), "--set", "num_classes=2",
                     "--query", "3", "--layer", "0"]) == 0
    facts = json.loads((tmp_path / "viz.json").read_text())
    assert facts["decoder"]["query"] == 3 and facts["decoder"]["layer"] == 0
    assert (facts["detections"], facts["threshold"]) == (0, 0.3) and 0 < facts["best_score"] < 0.3
    assert main(["viz", "dino_tiny", str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 2
    assert main(["viz", "no_such_preset", str(image_path), "--out", str(tmp_path)]) == 2
    assert main(["viz", "dino_tiny", str(image_path), "--out", str(tmp_path), "--query", "5000"]) == 2
    assert "out of range" in capsys.readouterr().err
