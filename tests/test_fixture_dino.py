"""Parity with the official DINO implementation (IDEA-Research/DINO), from ../shared/fixtures."""
import torch
from conftest import StoredFeatures
from released import official_fixture_file
from ties import best_class, follow_fixture, picks_by_value

from sparsedet.data.batch import Batch
from sparsedet.tools.convert import convert


def test_official_dino_fixture_matches(official, shared_dir, tmp_path):
    path, inputs, expected, _ = official_fixture_file("dino", official, shared_dir, tmp_path)

    model, config = convert("official-dino", path)
    assert (config.model.num_encoder_layers, config.model.num_decoder_layers, config.model.num_queries) == (2, 2, 900)
    model.backbone = StoredFeatures([inputs[f"features.{i}"].float() for i in (1, 2, 3)])
    mask = inputs["image_mask"]
    model.queries.select = follow_fixture(model.queries.select, picks_by_value(expected["enc.pred_logits"], best_class),
                                         best_class)
    with torch.no_grad():
        out = model(Batch(torch.zeros(mask.shape[0], 3, *mask.shape[1:]), mask))
    torch.testing.assert_close(out.logits, expected["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.boxes, expected["pred_boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.aux[0].logits, expected["aux.0.pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.aux[0].boxes, expected["aux.0.pred_boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.enc.logits, expected["enc.pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.enc.boxes, expected["enc.pred_boxes"], atol=1e-4, rtol=0)
