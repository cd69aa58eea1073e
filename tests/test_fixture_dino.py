"""Parity with the official DINO implementation (IDEA-Research/DINO), from ../shared/fixtures."""
import torch
from conftest import StoredFeatures
from scipy.optimize import linear_sum_assignment

from sparsedet.data.batch import Batch
from sparsedet.nn.backbone import ResNet
from sparsedet.tools.convert import convert


def _in_fixture_order(select, expected_logits):
    """Query selection ranks tokens by logits; two tokens whose best logits agree to ~1e-6 may swap
    places between two correct implementations (float rounding), and the learned content query of
    each slot then meets the other box. This wrapper keeps our selected set, checks it is the
    fixture's, and orders it as the fixture did, so that everything downstream can be compared."""

    def wrapped(logits, k):
        top = select(logits, k)
        ordered = []
        for b in range(top.shape[0]):
            ours = logits[b, top[b]]
            dist = (expected_logits[b][:, None, :] - ours[None]).abs().amax(-1)  # [k expected, k ours]
            # Padding tokens share identical logits, so match one-to-one rather than nearest-first.
            rows, cols = linear_sum_assignment(dist.numpy())
            assert dist[rows, cols].max() < 1e-4, "our selected tokens are not the fixture's"
            ordered.append(top[b, torch.as_tensor(cols)])
        return torch.stack(ordered)

    return wrapped


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
    model.queries.select = _in_fixture_order(model.queries.select, expected["enc.pred_logits"])
    with torch.no_grad():
        out = model(Batch(torch.zeros(mask.shape[0], 3, *mask.shape[1:]), mask))
    torch.testing.assert_close(out.logits, expected["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.boxes, expected["pred_boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.aux[0]["logits"], expected["aux.0.pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.aux[0]["boxes"], expected["aux.0.pred_boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.enc["logits"], expected["enc.pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.enc["boxes"], expected["enc.pred_boxes"], atol=1e-4, rtol=0)
