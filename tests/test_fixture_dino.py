"""Parity with the official DINO implementation (IDEA-Research/DINO), from ../shared/fixtures."""
import torch
from conftest import StoredFeatures, in_fixture_order

from sparsedet.data.batch import Batch
from sparsedet.nn.backbone import ResNet
from sparsedet.tools.convert import convert


def test_official_dino_fixture_matches(official, tmp_path):
    state, inputs, expected, _ = official("dino")
    # The fixture leaves the backbone out; a released file has one under backbone.0.body.
    state.update({f"backbone.0.body.{k}": v for k, v in ResNet(50).state_dict().items()})
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "epoch": 11}, path)

    model, config = convert("official-dino", path)
    assert (config.model.num_encoder_layers, config.model.num_decoder_layers, config.model.num_queries) == (2, 2, 900)
    model.backbone = StoredFeatures([inputs[f"features.{i}"].float() for i in (1, 2, 3)])
    mask = inputs["image_mask"]
    model.queries.select = in_fixture_order(model.queries.select, expected["enc.pred_logits"])
    with torch.no_grad():
        out = model(Batch(torch.zeros(mask.shape[0], 3, *mask.shape[1:]), mask))
    torch.testing.assert_close(out.logits, expected["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.boxes, expected["pred_boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.aux[0]["logits"], expected["aux.0.pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.aux[0]["boxes"], expected["aux.0.pred_boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.enc["logits"], expected["enc.pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.enc["boxes"], expected["enc.pred_boxes"], atol=1e-4, rtol=0)
