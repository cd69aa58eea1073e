"""Corr (engine/corr.py): the decoder attention map's share on the encoder's kept tokens, by hand,
for dense and sparse models, through `eval --corr`, and refused where it is undefined."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sparsedet.api import Detector
from sparsedet.cli import main
from sparsedet.data.coco import CocoDetection
from sparsedet.data.transforms import build_transforms
from sparsedet.engine.corr import CorrTracker, output_corr
from sparsedet.engine.evaluator import evaluate
from sparsedet.models.detector import DetectorOutput
from sparsedet.models.encoders.scoring import LayerSelection, TokenSelection
from sparsedet.tools.bench import plot_ap_vs_gflops
from sparsedet.tools.viz import PANEL, visualize

SMALL = {"hidden_dim": 64, "ffn_dim": 64, "num_decoder_layers": 2, "num_queries": 20, "dn_queries": 4,
         "eval_size": 96, "eval_max_size": 128, "backbone.width": 8}


def _model(preset: str, synth: dict) -> Detector:
    torch.manual_seed(0)
    return Detector.from_preset(preset, classes=synth["classes"], category_ids=[1, 2, 3, 5, 7], **SMALL)


def _val(model: Detector, synth: dict) -> CocoDetection:
    m = model.config
    return CocoDetection(synth["val"], transforms=build_transforms(False, [m.eval_size], m.eval_max_size))


def test_corr_by_hand():
    """Two levels (2x3 and 1x2), four sampling points, two images; every number worked out by hand."""
    shapes = [(2, 3), (1, 2)]  # flat tokens: 0-5 level 0 (row-major), 6-7 level 1
    # (x, y) in [0, 1]; the splat point is (x * W, y * H) in cells, no half-cell shift.
    locations = torch.tensor([[[0.5, 0.25], [0.0, 0.0]],     # level 0: (1.5, 0.5) and (0, 0)
                              [[0.75, 0.5], [0.25, 0.0]]])   # level 1: (1.5, 0.5) and (0.5, 0)
    weights = torch.tensor([[0.4, 0.2], [0.4, 0.6]])
    # Point (1.5, 0.5) on 2x3 gives a quarter of 0.4 to tokens 1, 2, 4, 5; (0, 0) all of 0.2 to token 0.
    # On 1x2, (1.5, 0.5) keeps only its top-left quarter (token 7: 0.1), the rest falls off the grid;
    # (0.5, 0) halves 0.6 between tokens 6 and 7. DAM = [.2, .1, .1, 0, .1, .1, .3, .4], sum 1.3.
    # Image 1 has the same sampling with three times the weights.
    loc = locations.expand(2, 1, 1, 1, 2, 2, 2)                               # [B, layers, Q, heads, L, P, 2]
    w = torch.stack([weights, 3 * weights]).view(2, 1, 1, 1, 2, 2)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[0, [2, 5]] = True  # image 0: level 0's last column is padding (0.2 of its mass)
    layers = [LayerSelection(torch.tensor([[6, 0, 1], [7, 3, 4]]), torch.zeros(2, 3), torch.tensor([3, 1])),
              LayerSelection(torch.tensor([[6, 0], [7, 3]]), torch.zeros(2, 2), torch.tensor([1, 1]))]
    selection = TokenSelection(torch.zeros(2, 8), layers, shapes, padding)
    out = DetectorOutput(torch.zeros(2, 1, 3), torch.zeros(2, 1, 4), selection=selection, sampling=(loc, w))

    # Image 0: valid mass 1.3 - 0.2 = 1.1; layer 0 keeps 6, 0, 1 (0.6), layer 1 keeps 6 (0.3).
    # Image 1: valid mass 3.9; both layers write back token 7 only (1.2); 3 and 4 are past its count.
    expected = [[6 / 11, 3 / 11], [4 / 13, 4 / 13]]
    corr, kept = output_corr(out, 2)
    torch.testing.assert_close(corr, torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(kept, torch.tensor([[3 / 6, 1 / 6], [1 / 8, 1 / 8]]))  # of 6 and 8 valid tokens

    tracker = CorrTracker(2)
    tracker.update([10, 11], out)
    result = tracker.result()
    # The mean over images of per-image ratios, not the pooled ratio ((0.6 + 1.2) / (1.1 + 3.9) = 0.36).
    assert result["per_layer"] == pytest.approx([(6 / 11 + 4 / 13) / 2, (3 / 11 + 4 / 13) / 2], abs=1e-6)
    assert result["mean"] == pytest.approx((6 / 11 + 3 / 11 + 8 / 13) / 4, abs=1e-6) and result["images"] == 2
    assert result["kept_per_layer"] == pytest.approx([(1 / 2 + 1 / 8) / 2, (1 / 6 + 1 / 8) / 2])
    tracker.update([10], DetectorOutput(out.logits[:1], out.boxes[:1], selection=TokenSelection(
        torch.zeros(1, 8), [LayerSelection(torch.tensor([[6]]), torch.zeros(1, 1), torch.tensor([1]))] * 2, shapes,
        padding[:1]), sampling=(loc[:1], w[:1])))
    assert tracker.result()["per_layer"][0] == pytest.approx((3 / 11 + 4 / 13) / 2, abs=1e-6)  # image 10 replaced


def test_dense_encoder_corr_is_one(synth):
    model = _model("deformable_detr_tiny", synth)
    metrics, _ = evaluate(model, _val(model, synth), batch_size=4, progress=False, corr=True)
    assert metrics["corr"] == {"mean": 1.0, "per_layer": [1.0] * 3, "kept_per_layer": [1.0] * 3, "images": 4}


def test_sparse_corr_in_eval_and_metrics_json(synth, tmp_path, capsys):
    """Focus-DETR's cascade keeps nested sets, so its per-image Corr cannot grow with depth."""
    model = _model("focus_detr_tiny", synth)
    run = tmp_path / "focus"
    model.save_pretrained(run)
    assert main(["eval", "--weights", str(run), "--val", synth["val"], "--corr", "--out", str(run)]) == 0
    assert "Corr" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    per_layer = metrics["corr"]["per_layer"]
    assert len(per_layer) == 3 and metrics["corr"]["images"] == 4 and 0 <= metrics["AP"] <= 1
    assert all(0 < v <= 1 for v in per_layer) and per_layer[0] >= per_layer[1] >= per_layer[2]
    assert per_layer[2] < 1  # a fifth of the first layer's tokens cannot hold all the attention
    kept = metrics["corr"]["kept_per_layer"]
    assert 0 < kept[2] < kept[1] < kept[0] < 1
    assert metrics["corr"]["mean"] == pytest.approx(sum(per_layer) / 3)


def test_corr_is_refused_where_undefined(synth, tmp_path, capsys):
    """Single-level kinds have no sampling points: --corr is an error before any work, naming why."""
    run = tmp_path / "sam"
    _model("sam_detr_tiny", synth).save_pretrained(run)
    assert main(["eval", "--weights", str(run), "--val", synth["val"], "--corr", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "Corr is undefined for kind='sam'" in err and "sampling points" in err
    assert not (tmp_path / "e").exists()
    det = tmp_path / "det.json"
    det.write_text("[]")
    assert main(["eval", "--results", str(det), "--val", synth["val"], "--corr"]) == 2
    assert "--corr" in capsys.readouterr().err


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("corr") / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("preset", ["sparse_detr_tiny", "deformable_detr_tiny", "conditional_detr_tiny"])
def test_viz_draws_the_attention_map_and_the_image_corr(preset, image_path, tmp_path, synth):
    """viz.json's Corr is eval's for the same image; dense encoders' computed Corr is 1; Sparse DETR
    updates one set in every layer, so its layers agree; the single-level decoders draw no map and
    say null."""
    model = _model(preset, synth).eval()
    facts = visualize(model, image_path, tmp_path)
    if preset == "conditional_detr_tiny":
        assert facts["corr"] is None and not (tmp_path / "dam.png").exists()
        return
    assert Image.open(tmp_path / "dam.png").size == (PANEL * model.config.num_levels, PANEL)
    batch, _, _ = model.preprocess([image_path])
    with torch.no_grad():
        expected = output_corr(model(batch, record_sampling=True), 3)[0][0]
    torch.testing.assert_close(torch.tensor(facts["corr"]["per_layer"]), expected, atol=1e-5, rtol=0)
    if preset == "deformable_detr_tiny":
        assert facts["corr"]["mean"] == pytest.approx(1.0, abs=1e-5)
    else:
        assert 0 < facts["corr"]["mean"] < 1 and facts["corr"]["per_layer"] == [facts["corr"]["mean"]] * 3


def test_bench_plot_draws_corr_beside_ap(tmp_path):
    """A run whose metrics.json has Corr adds the per-layer panel; without any, one panel as before."""
    corr = {"mean": 0.4, "per_layer": [0.5, 0.4, 0.3], "images": 4}
    plot_ap_vs_gflops([("dense", 2.0, 0.25, None)], tmp_path / "ap.png")
    assert Image.open(tmp_path / "ap.png").size == (600, 480)
    plot_ap_vs_gflops([("dense", 2.0, 0.25, None), ("sparse", 1.0, 0.2, corr)], tmp_path / "ap.png")
    assert Image.open(tmp_path / "ap.png").size == (1080, 480)
