"""`sparsedet predict` outputs: class names, YOLO label files, videos and streams (PyAV), --device,
a line per image and a total, unreadable files skipped, and the options' help. The model is a tiny
untrained one: these tests check formats, not accuracy."""
import importlib.util
import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from sparsedet import Detector, SparsedetError
from sparsedet.api import load_detector
from sparsedet.cli import main
from sparsedet.data.yolo import read_yolo, write_yolo

ENTRY_KEYS = {"file_name", "image_id", "category_id", "category_name", "bbox", "score"}


def _images(synth, tmp_path) -> Path:
    folder = tmp_path / "images"
    shutil.copytree(Path(synth["root"]) / "images" / "val", folder)
    return folder


def _write_video(path: Path, frames: int = 5, size=(96, 64), fps: int = 10) -> None:
    """A small clip: a red square moving right over grey, written with PyAV."""
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            image = Image.new("RGB", size, (90, 90, 90))
            ImageDraw.Draw(image).rectangle([8 + 6 * i, 12, 40 + 6 * i, 44], fill=(210, 40, 40))
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode(None))


def test_detector_predict_names_each_label(tiny_run, synth):
    model = Detector.from_pretrained(tiny_run)
    image = next((Path(synth["root"]) / "images" / "val").glob("*.png"))
    det = model.predict(image, threshold=0.0, top_k=6)[0]
    assert det["names"] == [model.classes[i] for i in det["labels"].tolist()] and len(det["names"]) == 6
    assert "N/A" not in det["names"]  # columns that predict no category are never predicted


def test_predictions_carry_names_and_save_txt_writes_yolo_labels_read_back_by_the_yolo_reader(
        tiny_run, synth, tmp_path, capsys):
    images = _images(synth, tmp_path)
    out = tmp_path / "pred"
    assert main(["predict", "--weights", str(tiny_run), str(images), "--out", str(out), "--threshold", "0",
                 "--top-k", "4", "--save-txt", "--device", "cpu", "--batch-size", "3"]) == 0
    assert f"and YOLO labels in {out / 'labels'}" in capsys.readouterr().out
    entries = json.loads((out / "predictions.json").read_text())
    assert len(entries) == 4 * 4 and all(set(e) == ENTRY_KEYS for e in entries)
    names = dict(zip([1, 2, 3, 5, 7], synth["classes"]))
    assert all(e["category_name"] == names[e["category_id"]] for e in entries)

    # The label files form a YOLO dataset with the images: read back, they give the predicted boxes,
    # with the class index `sparsedet synth --format yolo` (write_yolo) gives each category.
    data = tmp_path / "as_yolo"
    shutil.copytree(images, data / "images" / "val")
    shutil.copytree(out / "labels", data / "labels" / "val")
    write_yolo(synth["val"], tmp_path / "reference")  # the synthetic val set exported to YOLO
    class_names = yaml.safe_load((tmp_path / "reference" / "data.yaml").read_text())["names"]
    assert class_names == synth["classes"]
    (data / "data.yaml").write_text(yaml.safe_dump({"path": ".", "val": "images/val", "names": class_names}))
    coco, _ = read_yolo(data / "data.yaml", "val")
    read_back = sorted((img["file_name"].split("/")[-1], class_names[a["category_id"]], *np.round(a["bbox"], 2))
                       for img in coco["images"] for a in coco["annotations"] if a["image_id"] == img["id"])
    predicted = sorted((Path(e["file_name"]).name, e["category_name"], *np.round(e["bbox"], 2)) for e in entries)
    assert len(read_back) == len(predicted)
    for got, want in zip(read_back, predicted):
        assert got[:2] == want[:2] and np.allclose(got[2:], want[2:], atol=0.02)
    first = (out / "labels" / f"{Path(entries[0]['file_name']).stem}.txt").read_text().splitlines()[0].split()
    assert len(first) == 6 and float(first[5]) == pytest.approx(entries[0]["score"], abs=1e-5)


def test_predict_reads_videos_and_streams_frame_by_frame(tiny_run, synth, tmp_path, capsys):
    av = pytest.importorskip("av")
    clip = tmp_path / "clip.mp4"
    _write_video(clip)
    image = next(_images(synth, tmp_path).glob("*.png"))
    out = tmp_path / "pred"
    assert main(["predict", "--weights", str(tiny_run), str(image), str(clip), "--out", str(out), "--threshold", "0",
                 "--top-k", "3", "--batch-size", "2", "--save-txt"]) == 0
    captured = capsys.readouterr()
    assert "1 drawn images and 1 drawn videos" in captured.out
    assert "0/5" in captured.err  # the bar opens with the frame count the container states
    entries = json.loads((out / "predictions.json").read_text())
    frames = [e for e in entries if e["file_name"] == str(clip)]
    assert [e["frame"] for e in frames] == [f for f in range(5) for _ in range(3)]
    assert {e["image_id"] for e in frames} == {1, 2, 3, 4, 5}  # after the image's id 0
    assert all(set(e) == ENTRY_KEYS | {"frame"} for e in frames)
    assert sorted(p.name for p in (out / "labels").glob("clip_*.txt")) == [f"clip_{f:06d}.txt" for f in range(5)]
    with av.open(str(out / "clip_pred.mp4")) as video:
        stream = video.streams.video[0]
        drawn = [frame.to_ndarray(format="rgb24") for frame in video.decode(stream)]
        assert float(stream.average_rate) == 10
    assert len(drawn) == 5 and drawn[0].shape == (64, 96, 3)

    # A stream URL is read the same way (ffmpeg's file:// protocol stands in for rtsp:// or http://).
    url = "file://" + str(clip.resolve())
    assert main(["predict", "--weights", str(tiny_run), url, "--out", str(tmp_path / "url"), "--threshold", "0",
                 "--top-k", "3", "--max-frames", "2"]) == 0
    entries = json.loads((tmp_path / "url" / "predictions.json").read_text())
    assert {e["frame"] for e in entries} == {0, 1} and {e["file_name"] for e in entries} == {url}
    assert "0/2" in capsys.readouterr().err  # --max-frames bounds the total
    assert len(list((tmp_path / "url").glob("*clip_mp4_pred.mp4"))) == 1


def test_video_needs_pyav_and_bad_sources_get_clear_errors(tiny_run, tmp_path, capsys, monkeypatch):
    base = ["predict", "--weights", str(tiny_run), "--out", str(tmp_path / "o")]
    assert main([*base, str(tmp_path / "missing.mp4")]) == 2
    assert "image, video or folder not found" in capsys.readouterr().err
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    assert main([*base, str(broken), "--max-frames", "0"]) == 2
    assert "--max-frames must be at least 1, got 0" in capsys.readouterr().err
    if importlib.util.find_spec("av") is not None:  # PyAV itself reports the unreadable file
        assert main([*base, str(broken)]) == 2
        assert "error: cannot open video" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "av", None)  # as if the [video] extra were not installed
    assert main([*base, str(broken)]) == 2
    assert "reading and writing videos needs PyAV: pip install 'sparsedet[video]'" in capsys.readouterr().err


def test_device_and_batch_size_options(tiny_run, tmp_path, capsys):
    for verb in ("predict", "eval"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--device DEVICE cpu, cuda or cuda:N (default: cuda when available, else cpu" in text
        assert "--batch-size BATCH_SIZE images" in text and "per forward (default 4)" in text
    # A GPU this machine lacks (no CUDA build, or not that many GPUs): the error names the fix.
    assert main(["predict", "--weights", str(tiny_run), "x.png", "--out", str(tmp_path), "--device", "cuda:99"]) == 2
    assert "--device cpu" in capsys.readouterr().err
    with pytest.raises(SparsedetError,
                       match=r"an .onnx file runs on the CPU \(in onnxruntime or OpenVINO\); leave out --device cuda"):
        load_detector(tmp_path / "model.onnx", device="cuda")
    assert main(["eval", "--results", "r.json", "--val", "v.json", "--device", "cpu"]) == 2
    assert "--device sets how --weights RUN runs; a --results file is already computed" in capsys.readouterr().err


def test_predict_prints_each_images_classes_and_time_then_a_total(tiny_run, synth, tmp_path, capsys):
    images = _images(synth, tmp_path)
    out = tmp_path / "pred"
    assert main(["predict", "--weights", str(tiny_run), str(images), "--out", str(out), "--threshold", "0",
                 "--top-k", "3", "--batch-size", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    entries = json.loads((out / "predictions.json").read_text())
    for line, path in zip(lines, sorted(images.glob("*.png"))):
        # The model's columns are category ids 0..7: class order is category id order.
        found = Counter((e["category_id"], e["category_name"]) for e in entries if e["file_name"] == str(path))
        counts = ", ".join(f"{n} {name}" for (_, name), n in sorted(found.items()))
        assert re.fullmatch(rf"{re.escape(f'{path}: {counts}')} \(\d+\.\d ms\)", line), line
    assert re.fullmatch(r"4 images, 12 detections in \d+\.\d s \(\d+\.\d ms per image in the model\)", lines[4])
    assert lines[5] == f"wrote {out / 'predictions.json'}, 4 drawn images: 12 detections scored above 0 (given)"


def test_an_unreadable_image_is_skipped_counted_and_fails_only_strict_runs(tiny_run, synth, tmp_path, capsys):
    images = _images(synth, tmp_path)
    broken = images / "broken.jpg"
    broken.write_bytes(b"not an image")
    for strict, status in ((False, 0), (True, 1)):
        out = tmp_path / f"pred_{strict}"
        with pytest.warns(UserWarning) as caught:
            assert main(["predict", "--weights", str(tiny_run), str(images), "--out", str(out), "--threshold", "0",
                         "--top-k", "2", *["--strict"] * strict]) == status
        messages = [str(w.message) for w in caught]
        assert messages[0].startswith(f"skipping an unreadable file: cannot read image {broken}")
        assert messages[-1] == f"skipped 1 unreadable file: {broken}"
        assert "4 images, 8 detections in" in capsys.readouterr().out
        assert len(json.loads((out / "predictions.json").read_text())) == 4 * 2
        assert sorted(p.name for p in out.glob("*_pred.png")) == [f"{p.stem}_pred.png" for p in
                                                                 sorted(images.glob("*.png"))]
    with pytest.warns(UserWarning, match="skipping an unreadable file"):
        assert main(["predict", "--weights", str(tiny_run), str(broken), "--out", str(tmp_path / "none")]) == 2
    assert "none of the 1 image files could be read" in capsys.readouterr().err
