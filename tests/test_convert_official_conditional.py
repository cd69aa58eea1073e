"""official-conditional-detr: a checkpoint in Atten4Vis/ConditionalDETR's layout and container (one
shared head pair, bare 1x1 input projection, ``ca_qpos_proj`` built in every decoder layer but used
by the first only) converts back to exactly the weights it was made from; foreign files fail clearly."""
import argparse

import pytest
import torch

from sparsedet import Detector
from sparsedet.errors import SparsedetError
from sparsedet.tools.convert import convert

SMALL = {"backbone.depth": 18, "num_encoder_layers": 2, "num_decoder_layers": 3, "ffn_dim": 64, "num_queries": 30,
         "num_classes": 91}


def _official_layout(ours: dict) -> dict:
    """Our state dict in models/conditional_detr.py + transformer.py names (the encoder uses
    nn.MultiheadAttention, the decoder the repository's own attention with only out_proj)."""
    out = {}
    for key, value in ours.items():
        if key.startswith("backbone."):
            out["backbone.0.body." + key[len("backbone."):]] = value
        elif key.startswith("neck.input_proj.0.0."):
            out["input_proj." + key.rsplit(".", 1)[1]] = value
        elif key == "queries.query_embed.weight":
            out["query_embed.weight"] = value
        elif key.startswith("queries.ref_point_head."):
            out["transformer.decoder." + key[len("queries."):]] = value
        elif key.startswith(("encoder.", "decoder.")):
            out["transformer." + key.replace(".cross.", ".")] = value
        elif key.startswith("heads.class_embed.0."):
            out["class_embed." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("heads.box_embed.0."):
            out["bbox_embed." + key[len("heads.box_embed.0."):]] = value
        else:
            raise AssertionError(f"no official name for {key}")
    for i in (1, 2):  # built in every layer, used in the first only
        out[f"transformer.decoder.layers.{i}.ca_qpos_proj.weight"] = torch.randn(256, 256)
        out[f"transformer.decoder.layers.{i}.ca_qpos_proj.bias"] = torch.randn(256)
    return out


def _save(tmp_path, state):
    path = tmp_path / "ConditionalDETR_r18.pth"
    torch.save({"model": state, "epoch": 49, "args": argparse.Namespace(nheads=8, dropout=0.1, dilation=False,
                                                                         num_queries=30)}, path)
    return path


def test_official_layout_converts_to_the_same_weights(tmp_path):
    torch.manual_seed(0)
    ours = Detector.from_preset("conditional_detr_r50", **SMALL).state_dict()
    converted, config = convert("official-conditional-detr", _save(tmp_path, _official_layout(ours)))
    m = config.model
    assert (m.num_queries, m.num_decoder_layers, m.num_encoder_layers, m.ffn_dim, m.backbone.depth) == (30, 3, 2, 64, 18)
    got = converted.state_dict()
    assert got.keys() == ours.keys() and all(torch.equal(got[k], ours[k]) for k in ours)


def test_foreign_files_fail_clearly(tmp_path):
    torch.manual_seed(0)
    official = _official_layout(Detector.from_preset("conditional_detr_r50", **SMALL).state_dict())
    sam = dict(official, **{"transformer.decoder.layers.0.point2.6.weight": torch.zeros(16, 256)})
    with pytest.raises(SparsedetError, match="ConditionalDETR_r18.pth holds SAM-DETR.*official-sam-detr"):
        convert("official-conditional-detr", _save(tmp_path, sam))
    extra = dict(official, **{"transformer.decoder.layers.0.extra.weight": torch.zeros(1)})
    with pytest.raises(SparsedetError, match="ConditionalDETR_r18.pth.*decoder.layers.0.extra.weight"):
        convert("official-conditional-detr", _save(tmp_path, extra))
    deformable = {"transformer.level_embed": torch.zeros(4, 256), "class_embed.0.weight": torch.zeros(91, 256)}
    with pytest.raises(SparsedetError, match="no conditional cross-attention"):
        convert("official-conditional-detr", _save(tmp_path, deformable))
