"""official-deformable-detr: a checkpoint in the official repository's layout and container (heads
repeated or cloned per layer and saved again by the decoder, args pickled beside the weights)
converts back to exactly the weights it was made from; foreign, truncated and misshapen files fail
with one message naming the file."""
import argparse

import pytest
import torch

from sparsedet import Detector
from sparsedet.errors import SparsedetError
from sparsedet.tools.convert import convert

SMALL = {"backbone.depth": 18, "num_encoder_layers": 2, "num_decoder_layers": 2, "ffn_dim": 64, "num_queries": 30,
         "num_classes": 91}


def _official_layout(ours: dict, layers: int, two_stage: bool, box_refine: bool) -> dict:
    """Our state dict in fundamentalvision/Deformable-DETR's names (models/deformable_detr.py and
    deformable_transformer.py), with its duplicated heads."""
    out = {}
    for key, value in ours.items():
        for mine, theirs in (("backbone.", "backbone.0.body."), ("neck.input_proj.", "input_proj."),
                             ("neck.level_embed", "transformer.level_embed"),
                             ("encoder.layers.", "transformer.encoder.layers."),
                             ("decoder.layers.", "transformer.decoder.layers."),
                             ("queries.query_embed.", "query_embed."), ("queries.class_head.", f"class_embed.{layers}."),
                             ("queries.box_head.", f"bbox_embed.{layers}."), ("queries.", "transformer."),
                             ("heads.class_embed.", "class_embed."), ("heads.box_embed.", "bbox_embed.")):
            if key.startswith(mine):
                out[theirs + key[len(mine):]] = value.clone()
                break
        else:
            raise AssertionError(f"no official name for {key}")
    heads = [k for k in out if k.startswith(("class_embed.", "bbox_embed."))]
    if not box_refine:  # nn.ModuleList([head] * num_pred): the same module under every index
        for key in heads:
            kind, _, rest = key.split(".", 2)
            out.update({f"{kind}.{k}.{rest}": out[key] for k in range(1, layers)})
    else:  # the decoder keeps the box heads (and, two-stage, the class heads) too
        for key in heads:
            if key.startswith("bbox_embed.") or two_stage:
                out["transformer.decoder." + key] = out[key]
    return out


def _save(tmp_path, state, **args):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "optimizer": {}, "epoch": 49,
                "args": argparse.Namespace(nheads=8, dropout=0.1, dilation=False, **args)}, path)
    return path


@pytest.mark.parametrize("two_stage", [False, True])
def test_official_layout_converts_to_the_same_weights(tmp_path, two_stage):
    torch.manual_seed(0)
    model = Detector.from_preset("deformable_detr_r50_two_stage" if two_stage else "deformable_detr_r50", **SMALL)
    ours = model.state_dict()
    path = _save(tmp_path, _official_layout(ours, 2, two_stage, box_refine=two_stage), num_queries=30,
                 two_stage=two_stage, with_box_refine=two_stage)
    converted, config = convert("official-deformable-detr", path)
    m = config.model
    assert (m.two_stage, m.box_refine, m.num_queries, m.num_decoder_layers, m.backbone.depth, m.num_classes) == \
        (two_stage, two_stage, 30, 2, 18, 91)
    assert (m.classes[:2], m.classes[12], m.category_ids) == (["N/A", "person"], "N/A", list(range(91)))
    got = converted.state_dict()
    assert got.keys() == ours.keys() and all(torch.equal(got[k], ours[k]) for k in ours)


def test_a_custom_class_count_maps_column_i_to_category_i(tmp_path):
    model = Detector.from_preset("deformable_detr_r50", **{**SMALL, "num_classes": 5})
    path = _save(tmp_path, _official_layout(model.state_dict(), 2, False, False), num_queries=30)
    with pytest.warns(UserWarning, match="5 classes is not a COCO class table"):
        _, config = convert("official-deformable-detr", path)
    assert (config.model.classes[4], config.model.category_ids) == ("class 4", [0, 1, 2, 3, 4])


def test_single_scale_model_reads_c5_only(tmp_path):
    torch.manual_seed(0)
    model = Detector.from_preset("deformable_detr_r50", **SMALL, num_levels=1, **{"backbone.return_layers": [4]})
    path = _save(tmp_path, _official_layout(model.state_dict(), 2, False, False), num_queries=30)
    converted, config = convert("official-deformable-detr", path)
    assert config.model.num_levels == 1 and config.model.backbone.return_layers == [4]
    batch = torch.rand(1, 3, 64, 96)
    from sparsedet.data.batch import Batch
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        a, b = model.eval()(Batch(batch, mask)), converted(Batch(batch, mask))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.boxes, b.boxes)


def test_bad_files_fail_with_one_clear_message(tmp_path):
    torch.manual_seed(0)
    ours = Detector.from_preset("deformable_detr_r50", **SMALL).state_dict()
    official = _official_layout(ours, 2, False, False)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(_save(tmp_path, official).read_bytes()[:5000])
    with pytest.raises(SparsedetError, match="truncated.pth"):
        convert("official-deformable-detr", truncated)
    dino_like = dict(official, **{"transformer.tgt_embed.weight": torch.zeros(30, 256)})
    with pytest.raises(SparsedetError, match="tgt_embed.*official-dino"):
        convert("official-deformable-detr", _save(tmp_path, dino_like))
    wrong = dict(official)
    wrong["class_embed.1.weight"] = wrong["class_embed.1.weight"] + 1  # copies of one shared head differ
    with pytest.raises(SparsedetError, match="checkpoint.pth: keys that should be copies"):
        convert("official-deformable-detr", _save(tmp_path, wrong))
    missing = {k: v for k, v in official.items() if "transformer.encoder.layers.1.linear1" not in k}
    with pytest.raises(SparsedetError, match="lacks .*encoder.layers.1.linear1"):
        convert("official-deformable-detr", _save(tmp_path, missing))
    extra = dict(official, **{"transformer.encoder.layers.0.profiler.total_ops": torch.zeros(1)})
    with pytest.raises(SparsedetError, match="checkpoint.pth: cannot convert.*profiler.total_ops"):
        convert("official-deformable-detr", _save(tmp_path, extra))
    misshapen = dict(official)
    misshapen["transformer.decoder.layers.1.linear1.weight"] = torch.zeros(32, 256)  # another FFN width
    with pytest.raises(SparsedetError, match=r"checkpoint.pth: shapes do not fit a official-deformable-detr model.*"
                                             r"decoder.layers.1.linear1.weight \(32, 256\)"):
        convert("official-deformable-detr", _save(tmp_path, misshapen))
