"""Every stage kind declares itself (src/sparsedet/stage_kinds.py): a decoder, a base and a backbone
registered in-process, as a plug-in's module would, build and train; the fields an override may
set and what one stage needs from another are read from the declarations; a kind that nothing
registers says what to install."""
import pytest
import torch

from tiny import two_images
from sparsedet import Detector
from sparsedet.config import apply_overrides
from sparsedet.errors import SparsedetError
from sparsedet.losses.criterion import SetCriterion
from sparsedet.models.backbones import BACKBONES, register_backbone, resnet
from sparsedet.models.bases import BASES, Base, register_base
from sparsedet.models.decoders import DECODERS, register_decoder
from sparsedet.models.decoders.deformable import DeformableDecoder, DinoDecoder
from sparsedet.models.decoders.sam import SamDecoder
from sparsedet.models.detector import DetectionTransformer
from sparsedet.models.queries import LearnedQueries
from sparsedet.presets import get_preset
from sparsedet.stage_kinds import TOKEN_PROJECTION

SMALL = {"hidden_dim": 64, "ffn_dim": 64, "num_decoder_layers": 1, "num_queries": 10, "dn_queries": 4,
         "encoder.object_tokens": 20, "backbone.width": 8}


@pytest.fixture(autouse=True)
def tables():
    """The kinds a test registers leave with it (the tables are the process's)."""
    saved = [(table, dict(table)) for table in (BASES, DECODERS, BACKBONES)]
    yield
    for table, entries in saved:
        table.clear()
        table.update(entries)


def test_a_decoder_base_and_backbone_registered_in_process_build_and_train():
    @register_decoder("dino_copy")
    class CopiedDecoder(DinoDecoder):
        """DINO's decoder under a new kind."""

    dino = BASES["dino"]
    register_base("dino_copy", Base(dino.queries, "dino_copy", dino.provides, refines=True, denoising=True))

    @register_backbone("resnet_copy", config_fields=("depth", "width"))
    def resnet_copy(b):
        return resnet(b)

    # Focus-DETR's encoder needs mixed query selection, which the new base declares.
    model = Detector.from_preset("focus_detr_tiny", num_classes=3, kind="dino_copy",
                                 **{"backbone.kind": "resnet_copy"}, **SMALL)
    assert type(model.decoder) is CopiedDecoder and model.projection is not None
    torch.manual_seed(0)
    model.train()
    batch, targets = two_images(64, 96)
    out = model(batch, targets)
    assert out.dn is not None and out.selection is not None  # the base's denoising, the encoder's selection
    terms = SetCriterion.for_model(model.config)(out, targets)
    sum(terms.values()).backward()
    assert model.queries.class_head.weight.grad.abs().sum() > 0  # the shared projection's class head trains


def test_what_an_override_may_set_and_what_a_stage_needs_come_from_declarations():
    @register_decoder("sam_copy")
    class SamCopy(SamDecoder):
        """Reads what SAM-DETR's decoder reads (``smca``)."""

    register_base("sam_copy", Base(BASES["sam"].queries, "sam_copy", refines=True, shared_heads=False))
    assert apply_overrides(get_preset("sam_detr_tiny"), ["kind=sam_copy", "decoder.smca=true"]).model.decoder.smca
    with pytest.raises(SparsedetError, match=r"model\.decoder\.smca has no effect with model\.kind='conditional': "
                                             r"only sam and sam_copy read it"):
        apply_overrides(get_preset("conditional_detr_tiny"), ["decoder.smca=true"])
    with pytest.raises(SparsedetError, match="only the swin backbone reads it; set model.backbone.kind=swin"):
        apply_overrides(get_preset("dino_tiny"), ["backbone.window_size=12"])

    @register_decoder("blind")
    class BlindDecoder(DeformableDecoder):
        provides = frozenset()  # records no sampling

    deformable = BASES["deformable"]
    register_base("blind", Base(deformable.queries, "blind", provides_with=deformable.provides_with))
    with pytest.raises(SparsedetError, match=r"encoder.kind='sparse' needs the decoder's sampling locations .*"
                                             r"kind='blind' does not give it: choose a model kind that does "
                                             r"\(deformable, dino\)"):
        DetectionTransformer(apply_overrides(get_preset("sparse_detr_tiny"), ["kind=blind"]).model)
    with pytest.raises(SparsedetError, match="encoder.kind='sparse' needs the two-stage token projection and class "
                                             "head; kind='deformable' gives it with two_stage=true"):
        DetectionTransformer(apply_overrides(get_preset("sparse_detr_tiny"), ["two_stage=false"]).model)
    with pytest.raises(SparsedetError, match=r"encoder.kind='focus' needs a class head trained on every class .*"
                                             r"choose a model kind that does \(dino, decoupled\)"):
        DetectionTransformer(apply_overrides(get_preset("focus_detr_tiny"), ["kind=deformable"]).model)
    register_base("hollow", Base(lambda c, p: LearnedQueries(c.num_queries, c.hidden_dim), "deformable",
                                 frozenset({TOKEN_PROJECTION})))
    with pytest.raises(SparsedetError, match="kind='hollow' provides token_projection, but its queries do not hold"):
        DetectionTransformer(apply_overrides(get_preset("deformable_detr_tiny"), ["kind=hollow"]).model)


@pytest.mark.parametrize("override, what", [("kind=absent", "model kind"), ("kind=orphan", "decoder kind"),
                                            ("backbone.kind=absent", "model.backbone.kind")])
def test_a_kind_nothing_registers_says_what_to_install(override, what):
    register_base("orphan", Base(BASES["dino"].queries, "absent"))
    config = apply_overrides(get_preset("dino_tiny"), [override])
    with pytest.raises(SparsedetError, match=f"unknown {what} 'absent'; choose one of .*needs that package "
                                             "installed.*'sparsedet.plugins'"):
        DetectionTransformer(config.model)
