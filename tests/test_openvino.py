"""OpenVINO as a second runtime of exported files: a tiny one-level DINO file (deformable attention as
GridSample, two-stage and output top-k as TopK) gives onnxruntime's detections in OpenVINO (boxes
within 0.5 px, scores within 1e-3, same labels, matched as the export check matches), through the
Python API and through predict, eval and bench; what cannot run says why in one line."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_module

require_module("openvino", "openvino")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from sparsedet import Detector  # noqa: E402
from sparsedet.api import load_detector  # noqa: E402
from sparsedet.cli import main  # noqa: E402
from sparsedet.errors import SparsedetError  # noqa: E402
from sparsedet.tools import export  # noqa: E402
from sparsedet.tools.onnx_model import OnnxDetector  # noqa: E402
from sparsedet.tools.runtimes import open_session  # noqa: E402

SIZE = (96, 96)
# One encoder and one decoder layer at half width and one level: exporting costs time per node (the
# Focus and Salience DETR files that tests/test_export.py runs in OpenVINO have two levels).
SMALL = {"eval_size": 96, "eval_max_size": 96, "num_encoder_layers": 1, "num_decoder_layers": 1, "hidden_dim": 64,
         "ffn_dim": 128, "backbone.width": 16, "num_levels": 1}
LABEL = r"openvino \d{4}\.\d+\.\d+ \(CPU, fp32 file, f32 inference precision, (\d+) threads?\)"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synth):
    """The file, exported once for this module at a fixed 96 x 96 (any batch), with the synthetic
    dataset's classes."""
    torch.manual_seed(0)
    model = Detector.from_preset("dino_tiny", classes=synth["classes"], category_ids=[1, 2, 3, 5, 7], **SMALL)
    path = tmp_path_factory.mktemp("openvino") / "dino.onnx"
    model.export_onnx(path, size=SIZE, top_k=20)
    return path


def test_the_runtimes_agree_on_padded_batches(exported):
    reference, model = OnnxDetector(exported), load_detector(exported, runtime="openvino")
    assert model.runtime == "openvino" and model.precision == "fp32" and model.input_size == SIZE
    assert model.session.metadata == reference.session.metadata and "config" in model.session.metadata
    threads = re.fullmatch(LABEL, model.session.label)
    assert threads and int(threads[1]) == torch.get_num_threads(), model.session.label
    rng = np.random.default_rng(1)
    pair = [rng.integers(0, 255, (90, 120, 3), dtype=np.uint8), rng.integers(0, 255, (40, 120, 3), dtype=np.uint8)]
    portrait = [rng.integers(0, 255, (120, 50, 3), dtype=np.uint8)]
    for images in (pair, portrait):  # a batch of two, then of one: the batch size is dynamic
        batch, sizes, _ = reference.preprocess(images)
        feeds = export.inputs(batch, sizes, reference.input_size)
        assert feeds["mask"].any()  # padded to 96 x 96
        report = export.match_detections(reference.session.run(feeds), model.session.run(feeds))
        assert report["ok"] and report["images"] == len(images) and report["checked_per_image"] == 20, report


def test_openvino_keeps_onnx_top_k_tie_order(tmp_path):
    """ONNX's TopK puts the lower index first among equal values (the export's stable sorts rely on
    it: a padded image's masked tokens all tie); OpenVINO's own TopK does not unless asked."""
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    outputs = [helper.make_tensor_value_info(name, kind, None)
               for name, kind in zip(export.OUTPUTS, (TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.INT64))]
    nodes = [helper.make_node("TopK", ["x", "k"], ["scores", "labels"], axis=-1, largest=1, sorted=1),
             helper.make_node("Identity", ["x"], ["boxes"])]
    proto = helper.make_model(helper.make_graph(nodes, "ties", [x, k], outputs),
                              opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9
    onnx.save(proto, tmp_path / "ties.onnx")
    values = np.tile(np.array([1, 3, 3, 0, 3, -np.inf, 2, -np.inf], np.float32), 40)[None]
    feeds = {"x": values, "k": np.array([values.shape[1]])}
    got = [open_session(tmp_path / "ties.onnx", runtime).run(feeds)[2] for runtime in ("onnxruntime", "openvino")]
    expected = np.argsort(-values, kind="stable")
    assert (got[0] == expected).all() and (got[1] == expected).all()


def test_cli_predict_eval_and_bench_in_openvino(exported, synth, tmp_path, capsys):
    images = sorted(str(p) for p in (Path(synth["val"]).parent / "images" / "val").glob("*.png"))
    for runtime in ("onnxruntime", "openvino"):
        assert main(["predict", "--weights", str(exported), *images, "--out", str(tmp_path / runtime),
                     "--threshold", "0", "--runtime", runtime]) == 0
        assert f"{exported} runs in {runtime} " in capsys.readouterr().out
    expected, got = (json.loads((tmp_path / r / "predictions.json").read_text()) for r in ("onnxruntime", "openvino"))
    assert len(got) == len(expected) == 20 * len(images)
    _assert_same_entries(expected, got)

    val = _val_split_of(expected, synth["val"], tmp_path / "val.json")
    metrics = []
    for runtime in ("onnxruntime", "openvino"):
        assert main(["eval", "--weights", str(exported), "--val", val, "--images", synth["root"],
                     "--out", str(tmp_path / runtime), "--runtime", runtime]) == 0
        printed = capsys.readouterr().out
        assert f"{exported} runs in {runtime} " in printed and (runtime == "onnxruntime" or re.search(LABEL, printed))
        metrics.append(json.loads((tmp_path / runtime / "metrics.json").read_text()))
    assert metrics[0]["AP"] > 0.9, metrics[0]  # onnxruntime's own best detections are the ground truth
    for key in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], abs=1e-3), key

    assert main(["bench", str(exported), "--size", "96x96", "--runs", "2", "--warmup", "1", "--runtime", "openvino",
                 "--json", str(tmp_path / "bench.json")]) == 0
    printed = capsys.readouterr().out
    label = json.loads((tmp_path / "bench.json").read_text())["results"][0]["runtime"]
    assert re.fullmatch(LABEL, label) and f"dino.onnx  96x96  batch 1  fp32  {label}" in printed, printed


def test_what_cannot_run_in_openvino_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken.onnx"
    broken.write_text("not an ONNX file")
    with pytest.raises(SparsedetError, match=r"^openvino cannot load .*broken\.onnx: Unable to read the model"):
        load_detector(broken, runtime="openvino")
    with pytest.raises(SparsedetError, match=r"unknown runtime 'tensorrt'; choose one of onnxruntime, openvino"):
        load_detector(broken, runtime="tensorrt")

    def refused(argv: list[str], message: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err  # one line, no traceback

    applies = "--runtime applies to exported .onnx files"
    refused(["predict", "--weights", str(tmp_path), "x.png", "--out", str(tmp_path / "p"), "--runtime", "openvino"],
            f"{applies}, and {tmp_path} is a run folder, preset or zoo name")
    refused(["bench", "dino_tiny", "--runs", "0", "--runtime", "openvino"], applies)
    monkeypatch.setattr("sparsedet.tools.zoo.pretrained_run", lambda name: pytest.fail("a zoo name was fetched"))
    refused(["eval", "--weights", "deformable_detr_r50_50ep", "--val", "v.json", "--runtime", "openvino"], applies)
    refused(["eval", "--results", "r.json", "--val", "v.json", "--runtime", "openvino"],
            "--runtime sets how --weights RUN runs; a --results file is already computed: leave it out")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    refused(["predict", "--weights", str(broken), "x.png", "--out", str(tmp_path / "p"), "--runtime", "openvino"],
            "running an .onnx file in openvino needs openvino: pip install 'sparsedet[openvino]'")


def _val_split_of(predictions: list[dict], val: str, out: Path) -> str:
    """The val split with each image's three best of ``predictions`` as its ground truth: an AP that
    an untrained model earns only by computing what it computed there."""
    coco = json.loads(Path(val).read_text())
    ids = {Path(image["file_name"]).name: image["id"] for image in coco["images"]}
    coco["annotations"] = []
    for e in sorted(predictions, key=lambda e: -e["score"]):
        image = ids[Path(e["file_name"]).name]
        if sum(a["image_id"] == image for a in coco["annotations"]) < 3:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image, "bbox": e["bbox"],
                                        "category_id": e["category_id"], "area": e["bbox"][2] * e["bbox"][3],
                                        "iscrowd": 0})
    out.write_text(json.dumps(coco))
    return str(out)


def _assert_same_entries(expected: list[dict], got: list[dict]):
    """COCO result entries: each expected one has a got one on the same image with its category, a
    score within 1e-3 and every bbox number within 0.5 px (export.TOLERANCES["fp32"])."""
    box_tolerance, score_tolerance = export.TOLERANCES["fp32"]
    for e in expected:
        close = [g for g in got if g["image_id"] == e["image_id"] and g["category_id"] == e["category_id"]
                 and abs(g["score"] - e["score"]) <= score_tolerance
                 and max(abs(a - b) for a, b in zip(g["bbox"], e["bbox"])) <= box_tolerance]
        assert close, e
