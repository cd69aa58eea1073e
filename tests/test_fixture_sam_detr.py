"""Parity with the official SAM-DETR implementation (ZhangGongjie/SAM-DETR), with and without
SMCA, from ../shared/fixtures."""
import pytest
import torch
from conftest import StoredFeatures
from released import official_fixture_file

from sparsedet.data.batch import Batch
from sparsedet.tools.convert import convert


@pytest.mark.parametrize("name", ["sam_detr", "sam_detr_smca"])
def test_official_sam_detr_fixture_matches(official, shared_dir, tmp_path, name):
    path, inputs, expected, manifest = official_fixture_file(name, official, shared_dir, tmp_path)

    model, config = convert("official-sam-detr", path)
    m = config.model
    assert (m.num_encoder_layers, m.num_decoder_layers, m.num_queries, m.num_classes) == (6, 6, 300, 91)
    assert m.decoder.smca is manifest["config"]["smca"] and m.input_norm is False
    model.backbone = StoredFeatures([inputs["features.0"].float()])
    mask = inputs["image_mask"]
    with torch.no_grad():
        out = model(Batch(torch.zeros(mask.shape[0], 3, *mask.shape[1:]), mask))
    torch.testing.assert_close(out.logits, expected["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.boxes, expected["pred_boxes"], atol=1e-4, rtol=0)
    for i in range(5):
        torch.testing.assert_close(out.aux[i].logits, expected[f"aux.{i}.pred_logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(out.aux[i].boxes, expected[f"aux.{i}.pred_boxes"], atol=1e-4, rtol=0)
