"""Parity with the official Sparse DETR (kakaobrain/sparse-detr), from ../shared/fixtures."""
import pytest
import torch
from conftest import StoredFeatures
from released import official_fixture_file
from ties import follow_fixture

from sparsedet.data.batch import Batch
from sparsedet.models.encoders.scoring import LayerSelection
from sparsedet.ops.padding import rank_padding_last
from sparsedet.tools.convert import convert


def swap_near_ties(select):
    """Another CPU's order: in each image, the first two neighbours in our ranking whose scores
    differ by less than 1e-6 trade places (as on a Xeon, where rows 111/112 of image 0 swapped)."""

    def swapped(logits, levels):
        sel = select(logits, levels)
        indices = sel.indices.clone()
        for b in range(indices.shape[0]):
            i = int(((sel.scores[b, :-1] - sel.scores[b, 1:]) < 1e-6).nonzero()[0])
            indices[b, [i, i + 1]] = indices[b, [i + 1, i]]
        return LayerSelection(indices, logits.gather(1, indices), sel.counts)

    return swapped


@pytest.mark.parametrize("order", ["ours", "near ties swapped"])
def test_official_sparse_detr_fixture_matches(official, shared_dir, tmp_path, order):
    path, inputs, expected, manifest = official_fixture_file("sparse_detr", official, shared_dir, tmp_path)

    model, config = convert("official-sparse-detr", path)
    m = config.model
    assert (m.num_encoder_layers, m.num_decoder_layers, m.encoder.keep_ratio) == (6, 2, 0.3)
    model.backbone = StoredFeatures([inputs[f"features.{i}"].float() for i in range(3)])
    mask = inputs["image_mask"]
    select = model.encoder.select if order == "ours" else swap_near_ties(model.encoder.select)
    # The official ranking is its stored scores' order; where ours differs only by ties, rows follow it.
    official_order = expected["backbone_mask_prediction"].sort(dim=1, descending=True, stable=True).indices

    def follow(logits, levels):
        ranking = lambda scores: rank_padding_last(scores, levels.padding)  # noqa: E731
        picks = follow_fixture(lambda scores: select(scores, levels).indices,
                               lambda scores, ours: official_order[:, :ours.shape[1]], ranking)(logits)
        return LayerSelection(picks, ranking(logits).gather(1, picks), select(logits, levels).counts)

    model.encoder.select = follow
    # The encoder's auxiliary heads run in training mode only; dropout off keeps it deterministic.
    model.encoder.train()
    for module in model.encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        out = model(Batch(torch.zeros(mask.shape[0], 3, *mask.shape[1:]), mask))

    def close(ours, key):
        torch.testing.assert_close(ours, expected[key], atol=1e-4, rtol=0)

    assert out.selection.layers[0].counts.tolist() == expected["sparse_token_nums"].tolist()
    # The official model returns its scores with padding set to the batch minimum.
    logits = out.selection.token_logits
    close(logits.masked_fill(out.selection.padding, logits.min()), "backbone_mask_prediction")
    assert len(out.enc_aux) == 5
    for i, aux in enumerate(out.enc_aux):
        close(aux.logits, f"enc_aux.{i}.pred_logits")
        close(aux.boxes, f"enc_aux.{i}.pred_boxes")
    close(out.enc.logits, "enc.pred_logits")
    close(out.enc.boxes, "enc.pred_boxes")
    close(out.aux[0].logits, "aux.0.pred_logits")
    close(out.aux[0].boxes, "aux.0.pred_boxes")
    close(out.logits, "pred_logits")
    close(out.boxes, "pred_boxes")


def test_a_file_from_another_source_fails_clearly(tmp_path):
    import pytest

    from sparsedet.errors import SparsedetError
    path = tmp_path / "checkpoint0011_4scale.pth"
    torch.save({"model": {"transformer.tgt_embed.weight": torch.zeros(2, 4)}}, path)
    for source, name in (("official-sparse-detr", "Sparse DETR"), ("official-focus-detr", "Focus-DETR"),
                         ("official-salience-detr", "Salience DETR")):
        with pytest.raises(SparsedetError, match=f"{path.name}.*official {name} checkpoint"):
            convert(source, path)
