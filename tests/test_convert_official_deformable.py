"""official-deformable-detr: a checkpoint in the official repository's layout and container (heads
repeated or cloned per layer and saved again by the decoder, args pickled beside the weights)
converts back to exactly the weights it was made from; foreign, truncated and misshapen files fail
with one message naming the file."""
import pytest
import torch
from released import SMALL_DEFORMABLE, deformable_detr_layout, save_deformable_detr

from sparsedet import Detector
from sparsedet.errors import SparsedetError
from sparsedet.tools.convert import convert

@pytest.mark.parametrize("two_stage", [False, True])
def test_official_layout_converts_to_the_same_weights(tmp_path, two_stage):
    torch.manual_seed(0)
    model = Detector.from_preset("deformable_detr_r50_two_stage" if two_stage else "deformable_detr_r50", **SMALL_DEFORMABLE)
    ours = model.state_dict()
    path = save_deformable_detr(tmp_path, deformable_detr_layout(ours, 2, two_stage, box_refine=two_stage), num_queries=30,
                 two_stage=two_stage, with_box_refine=two_stage)
    converted, config = convert("official-deformable-detr", path)
    m = config.model
    assert (m.two_stage, m.box_refine, m.num_queries, m.num_decoder_layers, m.backbone.depth, m.num_classes) == \
        (two_stage, two_stage, 30, 2, 18, 91)
    assert (m.classes[:2], m.classes[12], m.category_ids) == (["N/A", "person"], "N/A", list(range(91)))
    assert (config.preset, config.source) == (
        "deformable_detr_r50", "official-deformable-detr: checkpoint.pth")  # provenance in config.json
    got = converted.state_dict()
    assert got.keys() == ours.keys() and all(torch.equal(got[k], ours[k]) for k in ours)


def test_a_custom_class_count_maps_column_i_to_category_i(tmp_path):
    model = Detector.from_preset("deformable_detr_r50", **{**SMALL_DEFORMABLE, "num_classes": 5})
    path = save_deformable_detr(tmp_path, deformable_detr_layout(model.state_dict(), 2, False, False), num_queries=30)
    with pytest.warns(UserWarning, match="5 classes is not a COCO class table"):
        _, config = convert("official-deformable-detr", path)
    assert (config.model.classes[4], config.model.category_ids) == ("class 4", [0, 1, 2, 3, 4])


def test_single_scale_model_reads_c5_only(tmp_path):
    torch.manual_seed(0)
    model = Detector.from_preset("deformable_detr_r50", **SMALL_DEFORMABLE, num_levels=1, **{"backbone.return_layers": [4]})
    path = save_deformable_detr(tmp_path, deformable_detr_layout(model.state_dict(), 2, False, False), num_queries=30)
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
    ours = Detector.from_preset("deformable_detr_r50", **SMALL_DEFORMABLE).state_dict()
    official = deformable_detr_layout(ours, 2, False, False)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(save_deformable_detr(tmp_path, official).read_bytes()[:5000])
    with pytest.raises(SparsedetError, match="truncated.pth"):
        convert("official-deformable-detr", truncated)
    dino_like = dict(official, **{"transformer.tgt_embed.weight": torch.zeros(30, 256)})
    with pytest.raises(SparsedetError, match="tgt_embed.*official-dino"):
        convert("official-deformable-detr", save_deformable_detr(tmp_path, dino_like))
    wrong = dict(official)
    wrong["class_embed.1.weight"] = wrong["class_embed.1.weight"] + 1  # copies of one shared head differ
    with pytest.raises(SparsedetError, match="checkpoint.pth: keys that should be copies"):
        convert("official-deformable-detr", save_deformable_detr(tmp_path, wrong))
    missing = {k: v for k, v in official.items() if "transformer.encoder.layers.1.linear1" not in k}
    with pytest.raises(SparsedetError, match="lacks .*encoder.layers.1.linear1"):
        convert("official-deformable-detr", save_deformable_detr(tmp_path, missing))
    extra = dict(official, **{"transformer.encoder.layers.0.profiler.total_ops": torch.zeros(1)})
    with pytest.raises(SparsedetError, match="checkpoint.pth: cannot convert.*profiler.total_ops"):
        convert("official-deformable-detr", save_deformable_detr(tmp_path, extra))
    misshapen = dict(official)
    misshapen["transformer.decoder.layers.1.linear1.weight"] = torch.zeros(32, 256)  # another FFN width
    with pytest.raises(SparsedetError, match=r"official-deformable-detr: .*checkpoint.pth: shapes do not fit.*"
                                             r"decoder.layers.1.linear1.weight \(32, 256\)"):
        convert("official-deformable-detr", save_deformable_detr(tmp_path, misshapen))


def test_a_tensor_the_converter_reads_for_sizes_is_a_layout_error(tmp_path):
    """The decoder FFN width is read from the file: without it the error lists what is missing
    (with every unknown key), never a bare KeyError or StopIteration."""
    ours = Detector.from_preset("deformable_detr_r50", **SMALL_DEFORMABLE).state_dict()
    official = {k: v for k, v in deformable_detr_layout(ours, 2, False, False).items()
                if not k.startswith("transformer.decoder.layers.0.linear1.")}
    official["transformer.mask_head.weight"] = torch.zeros(1)
    with pytest.raises(SparsedetError, match=r"checkpoint.pth: cannot convert\. unknown keys in the checkpoint "
                                             r"\(1\): transformer.mask_head.weight; keys our model needs "
                                             r"but the checkpoint lacks \(1\): decoder.layers.0.linear1.weight\. "
                                             r"Expected an official Deformable DETR checkpoint"):
        convert("official-deformable-detr", save_deformable_detr(tmp_path, official))


def test_a_zip_of_one_checkpoint_is_read_as_released(tmp_path):
    import zipfile
    torch.manual_seed(0)
    ours = Detector.from_preset("deformable_detr_r50", **SMALL_DEFORMABLE).state_dict()
    path = save_deformable_detr(tmp_path, deformable_detr_layout(ours, 2, False, False), num_queries=30)
    archive = tmp_path / "release.zip"  # as Focus-DETR's authors publish: a folder with the checkpoint
    with zipfile.ZipFile(archive, "w") as z:
        z.write(path, "release/model_final.pth")
        z.writestr("__MACOSX/release/._model_final.pth", b"")
    converted, _ = convert("official-deformable-detr", archive)
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in ours.items())
    with zipfile.ZipFile(archive, "a") as z:
        z.write(path, "release/model_0009999.pth")
    with pytest.raises(SparsedetError, match="release.zip is a zip archive with 2 checkpoint files"):
        convert("official-deformable-detr", archive)
