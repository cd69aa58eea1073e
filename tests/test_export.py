"""ONNX export: every exportable tiny preset and a converted transformers Deformable DETR run in
onnxruntime with PyTorch's detections (boxes within 0.5 px, scores within 1e-3, same labels), on
the export's own samples and on a batch of other, differently sized images."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network, before transformers is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from sparsedet import Detector  # noqa: E402
from sparsedet.cli import main  # noqa: E402
from sparsedet.errors import SparsedetError  # noqa: E402
from sparsedet.presets import PRESETS  # noqa: E402
from sparsedet.tools import export  # noqa: E402

SIZE = (96, 128)
# One encoder and one decoder layer at half width: exporting costs time per graph node.
SMALL = {"eval_size": 96, "eval_max_size": 128, "num_encoder_layers": 1, "num_decoder_layers": 1, "hidden_dim": 64,
         "ffn_dim": 128, "backbone.width": 16}
EXPORTABLE = [p for p in PRESETS if p.endswith("_tiny") and p.split("_")[0] not in ("sparse", "focus", "salience")]


def _other_images():
    """Two images of other sizes and shapes than the export samples (both fit 96 x 128 after resizing)."""
    rng = np.random.default_rng(5)
    return [rng.integers(0, 255, (60, 128, 3), dtype=np.uint8), rng.integers(0, 255, (72, 110, 3), dtype=np.uint8)]


@pytest.mark.parametrize("preset", EXPORTABLE)
def test_tiny_preset_exports_and_matches_pytorch(preset, tmp_path):
    torch.manual_seed(0)
    model = Detector.from_preset(preset, num_classes=3, **SMALL)
    path = tmp_path / "model.onnx"
    report = model.export_onnx(path, size=SIZE)
    assert report["ok"] and report["images"] == 2 and report["checked_per_image"] == 20, report
    wrapper = export.ExportedDetector(model, model.config.top_k).eval()
    other = export.compare(wrapper, path, export.prepare(model, _other_images(), SIZE))
    assert other["ok"] and other["images"] == 2, other
    assert other["max_box_px"] <= 0.5 and other["max_score"] <= 1e-3


def test_converted_transformers_model_exports(tmp_path):
    pytest.importorskip("transformers")
    from released import hf_deformable_detr

    from sparsedet.tools.convert import convert
    directory = tmp_path / "hf"
    hf_deformable_detr(directory, 18, True, True, 1, 50)
    model, _ = convert("hf-deformable-detr", directory, {"model.eval_size": 96, "model.eval_max_size": 128})
    report = model.export_onnx(tmp_path / "hf.onnx", size=SIZE)
    assert report["ok"], report
    wrapper = export.ExportedDetector(model, model.config.top_k).eval()
    assert export.compare(wrapper, tmp_path / "hf.onnx", export.prepare(model, _other_images(), SIZE))["ok"]


def test_metadata_outputs_and_category_ids(tmp_path):
    model = Detector.from_preset("conditional_detr_tiny", classes=["cat", "dog"], category_ids=[3, 9], **SMALL)
    path = tmp_path / "m.onnx"
    model.export_onnx(path, size=SIZE, top_k=7)
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == ["cat", "dog"] and json.loads(meta["category_ids"]) == [3, 9]
    assert meta["input_size"] == "96x128" and "eval_size" in meta["preprocessing"]
    assert [i.name for i in proto.graph.input] == export.INPUTS
    assert [o.name for o in proto.graph.output] == export.OUTPUTS
    import onnxruntime as ort
    boxes, scores, labels = ort.InferenceSession(str(path)).run(
        export.OUTPUTS, export.prepare(model, _other_images(), SIZE))
    assert boxes.shape == (2, 7, 4) and scores.shape == labels.shape == (2, 7)
    assert set(labels.flatten().tolist()) <= {3, 9} and (np.diff(scores, axis=1) <= 0).all()
    assert (boxes[0][:, [0, 2]] <= 128).all() and (boxes[0][:, [1, 3]] <= 60).all()  # clipped to the original


def test_disagreement_keeps_the_file_and_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "BOX_TOLERANCE_PX", -1.0)  # nothing can match
    model = Detector.from_preset("conditional_detr_tiny", num_classes=3, **SMALL)
    with pytest.raises(SparsedetError, match=r"onnxruntime disagrees with PyTorch: 2 sample images, best 20 .*"
                                             r"m\.mismatch\.onnx"):
        model.export_onnx(tmp_path / "m.onnx", size=SIZE)
    assert (tmp_path / "m.mismatch.onnx").is_file() and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("preset,name", [("sparse_detr_tiny", "Sparse DETR"), ("focus_detr_tiny", "Focus-DETR"),
                                         ("salience_detr_tiny", "Salience DETR")])
def test_token_sparse_encoders_refuse_with_the_reason(preset, name, tmp_path):
    model = Detector.from_preset(preset, num_classes=3)
    with pytest.raises(SparsedetError, match=f"{name} cannot be exported yet: on a padded batch onnxruntime"):
        model.export_onnx(tmp_path / "s.onnx", size=SIZE)
    assert not (tmp_path / "s.onnx").exists()


def test_what_cannot_export_says_so(tmp_path):
    model = Detector.from_preset("deformable_detr_tiny", num_classes=3, **SMALL)
    with pytest.raises(SparsedetError, match="resized image is .* larger than the exported input 64x64; export with"):
        model.export_onnx(tmp_path / "s.onnx", size=(64, 64))
    with pytest.raises(SparsedetError, match="--opset must be 16 to 19"):
        model.export_onnx(tmp_path / "s.onnx", size=SIZE, opset=12)


def test_cli_export(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "d.onnx"
    Detector.from_preset("conditional_detr_tiny", num_classes=3, **SMALL).save_pretrained(run)
    assert main(["export", str(run), "--out", str(out), "--size", "96x128", "--top-k", "10"]) == 0
    assert out.is_file()
    assert "onnxruntime against PyTorch: 2 sample images, best 10 detections each: 0 without a match" in \
        capsys.readouterr().out
