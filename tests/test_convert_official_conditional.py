"""official-conditional-detr: a checkpoint in Atten4Vis/ConditionalDETR's layout and container (one
shared head pair, bare 1x1 input projection, ``ca_qpos_proj`` built in every decoder layer but used
by the first only) converts back to exactly the weights it was made from; foreign files fail clearly."""
import pytest
import torch
from released import SMALL_CONDITIONAL, conditional_detr_layout, save_conditional_detr

from sparsedet import Detector
from sparsedet.errors import SparsedetError
from sparsedet.tools.convert import convert

def test_official_layout_converts_to_the_same_weights(tmp_path):
    torch.manual_seed(0)
    ours = Detector.from_preset("conditional_detr_r50", **SMALL_CONDITIONAL).state_dict()
    converted, config = convert("official-conditional-detr", save_conditional_detr(tmp_path, conditional_detr_layout(ours)))
    m = config.model
    assert (m.num_queries, m.num_decoder_layers, m.num_encoder_layers, m.ffn_dim, m.backbone.depth) == (30, 3, 2, 64, 18)
    assert m.backbone.dilation is False  # args.dilation of a C5 file
    got = converted.state_dict()
    assert got.keys() == ours.keys() and all(torch.equal(got[k], ours[k]) for k in ours)


def test_foreign_files_fail_clearly(tmp_path):
    torch.manual_seed(0)
    official = conditional_detr_layout(Detector.from_preset("conditional_detr_r50", **SMALL_CONDITIONAL).state_dict())
    sam = dict(official, **{"transformer.decoder.layers.0.point2.6.weight": torch.zeros(16, 256)})
    with pytest.raises(SparsedetError, match="ConditionalDETR_r18.pth holds SAM-DETR.*official-sam-detr"):
        convert("official-conditional-detr", save_conditional_detr(tmp_path, sam))
    extra = dict(official, **{"transformer.decoder.layers.0.extra.weight": torch.zeros(1)})
    with pytest.raises(SparsedetError, match="ConditionalDETR_r18.pth.*decoder.layers.0.extra.weight"):
        convert("official-conditional-detr", save_conditional_detr(tmp_path, extra))
    deformable = {"transformer.level_embed": torch.zeros(4, 256), "class_embed.0.weight": torch.zeros(91, 256)}
    with pytest.raises(SparsedetError, match="no conditional cross-attention"):
        convert("official-conditional-detr", save_conditional_detr(tmp_path, deformable))
