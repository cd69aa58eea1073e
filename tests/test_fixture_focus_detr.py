"""Parity with the official Focus-DETR (huawei-noah / detrex projects/focus_detr), from ../shared/fixtures."""
import torch
from conftest import StoredFeatures
from released import official_fixture_file
from ties import best_class, follow_fixture, picks_by_value

from sparsedet.data.batch import Batch
from sparsedet.tools.convert import convert


def test_official_focus_detr_fixture_matches(official, shared_dir, tmp_path):
    path, inputs, expected, manifest = official_fixture_file("focus_detr", official, shared_dir, tmp_path)

    model, config = convert("official-focus-detr", path)
    m = config.model
    assert (len(m.category_ids), m.category_ids[-1], m.classes[-1]) == (80, 90, "toothbrush")  # detectron2's
    assert (m.num_encoder_layers, m.num_decoder_layers, m.num_classes, m.num_queries) == (6, 6, 80, 900)
    model.backbone = StoredFeatures([inputs[f"features.res{i}"].float() for i in (3, 4, 5)])
    B, _, h, w = inputs["features.res3"].shape
    mask = torch.zeros(B, h * 8, w * 8, dtype=torch.bool)
    model.queries.select = follow_fixture(model.queries.select, picks_by_value(expected["enc.pred_logits"], best_class),
                                         best_class)
    with torch.no_grad():
        out = model(Batch(torch.zeros(B, 3, h * 8, w * 8), mask))

    def close(ours, key, atol=1e-4):
        torch.testing.assert_close(ours, expected[key], atol=atol, rtol=0)

    close(out.selection.token_logits[..., None], "foreground_logits")
    close(out.enc.logits, "enc.pred_logits")
    close(out.enc.boxes, "enc.pred_boxes")
    # Float32 rounding grows about 2x per decoder layer here: this model's own float32 and float64
    # final logits differ by 2.0e-4 (measured), so the six-layer decoder cannot agree to 1e-4 with
    # any float32 run; its first layers still do.
    for i, aux in enumerate(out.aux):
        close(aux.logits, f"aux.{i}.pred_logits", 1e-4 if i < 2 else 4e-4)
        close(aux.boxes, f"aux.{i}.pred_boxes")
    close(out.logits, "pred_logits", 4e-4)
    close(out.boxes, "pred_boxes")
