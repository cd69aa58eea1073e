"""The command line end to end on tiny data, and the errors a user sees on bad input."""
import json
import shutil
from pathlib import Path

import pytest

from sparsedet.cli import build_parser, main
from tiny import TINY


def test_every_verb_has_help(capsys):
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    assert {"demo", "synth", "train", "eval", "predict", "convert", "check-data"} <= set(verbs)
    for verb in verbs:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
        assert "usage: sparsedet " + verb in capsys.readouterr().out


def test_inference_verbs_take_precision(capsys):
    for verb in ("predict", "eval", "bench"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        out = capsys.readouterr().out
        assert "--precision {fp32,bf16,fp16}" in out and "--dtype" not in out  # bench's old --dtype is hidden
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--weights", "run", "x.png", "--out", "o", "--precision", "fp8"])
    assert stop.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.gpu
def test_train_eval_predict_round_trip(synth, tmp_path, capsys, device):
    run, on = tmp_path / "run", ["--device", str(device)]
    assert main(["train", "--preset", "dino_tiny", "--train", synth["train"], "--val", synth["val"],
                 "--out", str(run), "--no-progress", *on, *TINY]) == 0
    assert (run / "model.safetensors").is_file() and (run / "config.json").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["classes"] == synth["classes"] and config["model"]["category_ids"] == [1, 2, 3, 5, 7]
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["step"] == 1 and "loss_giou" in history[0]

    trained = (run / "metrics.json").read_text()
    capsys.readouterr()
    assert main(["eval", "--weights", str(run), "--val", synth["val"], *on]) == 0
    # Evaluations go to RUN/eval/<val data name>/; the training metrics (which bench --plot reads) stay.
    assert f"wrote {run / 'eval' / 'val' / 'metrics.json'}" in capsys.readouterr().out
    assert (run / "metrics.json").read_text() == trained
    metrics = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"}
    assert all(0.0 <= metrics[k] <= 1.0 or metrics[k] == -1 for k in ("AP", "AP50", "AR100"))
    assert main(["eval", "--weights", str(run), "--val", synth["val"], "--out", str(run), *on]) == 0  # replaces them
    assert json.loads((run / "metrics.json").read_text()) == metrics

    images = tmp_path / "images"
    shutil.copytree(Path(synth["root"]) / "images" / "val", images)
    out = tmp_path / "pred"
    assert main(["predict", "--weights", str(run), str(images), "--out", str(out), "--threshold", "0", "--top-k", "5",
                 *on]) == 0
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 4 * 5 and {"file_name", "bbox", "score", "category_id"} <= set(preds[0])
    assert all(p["category_id"] in (1, 2, 3, 5, 7) for p in preds)
    assert len(list(out.glob("*_pred.png"))) == 4
    # Batches of 3 (3 + 1 images): the same files in the same order with their ids. (Scores differ in
    # the last digits: another batch rounds differently, which moves this barely trained model's top-k.)
    assert main(["predict", "--weights", str(run), str(images), "--out", str(tmp_path / "b3"), "--threshold", "0",
                 "--top-k", "5", "--batch-size", "3", *on]) == 0
    batched = json.loads((tmp_path / "b3" / "predictions.json").read_text())
    assert [(p["file_name"], p["image_id"]) for p in batched] == [(p["file_name"], p["image_id"]) for p in preds]
    assert len(list((tmp_path / "b3").glob("*_pred.png"))) == 4
    assert main(["predict", "--weights", str(run), str(images), "--out", str(tmp_path / "bf16"), "--threshold", "0",
                 "--top-k", "5", "--precision", "bf16", *on]) == 0
    assert len(json.loads((tmp_path / "bf16" / "predictions.json").read_text())) == 4 * 5
    assert main(["eval", "--weights", str(run), "--val", synth["val"], "--out", str(tmp_path / "e16"),
                 "--precision", "bf16", *on]) == 0
    assert "AP" in json.loads((tmp_path / "e16" / "metrics.json").read_text())

    # A COCO results file evaluates the same way (writes metrics.json in --out).
    results = [{**p, "image_id": int(p["file_name"].split("/")[-1].split(".")[0])} for p in preds]
    det = tmp_path / "det.json"
    det.write_text(json.dumps(results))
    assert main(["eval", "--results", str(det), "--val", synth["val"], "--out", str(tmp_path / "m")]) == 0
    assert "AP" in json.loads((tmp_path / "m" / "metrics.json").read_text())


def test_every_verb_that_runs_a_model_takes_device(synth, tiny_run, tmp_path, capsys):
    for verb in ("train", "demo", "eval", "predict", "viz", "export", "bench", "serve"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "--device DEVICE" in capsys.readouterr().out, verb
    # A device this machine lacks (no CUDA build, or not that many GPUs) stops the verb with one line.
    image = next((Path(synth["root"]) / "images" / "val").glob("*.png"))
    for argv in (["train", "--preset", "dino_tiny", "--train", synth["train"], "--out", str(tmp_path / "t"), *TINY],
                 ["viz", str(tiny_run), str(image), "--out", str(tmp_path / "v")],
                 ["export", str(tiny_run), "--out", str(tmp_path / "m.onnx")]):
        err = _error(capsys, [*argv, "--device", "cuda:99"])
        assert "cuda" in err.lower() and "cpu" in err, err
    assert not (tmp_path / "t").exists() and not (tmp_path / "v").exists()


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_bad_inputs_give_one_clear_error(synth, tmp_path, capsys):
    base = ["train", "--train", synth["train"], "--out", str(tmp_path / "r"), "--no-progress"]
    assert "unknown preset 'dino_tinny'" in _error(capsys, base + ["--preset", "dino_tinny"])
    assert "did you mean train.max_steps" in _error(capsys, base + ["--preset", "dino_tiny", "train.max_stepz=1"])
    missing = tmp_path / "nope.json"
    assert str(missing) in _error(capsys, ["train", "--preset", "dino_tiny", "--train", str(missing), "--out", "x"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    assert "bad.json" in _error(capsys, ["check-data", "--ann", str(bad)])
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    assert "no images" in _error(capsys, ["train", "--preset", "dino_tiny", "--train", str(empty), "--out", "x"])
    det = tmp_path / "det.json"
    det.write_text(json.dumps([{"image_id": 1, "category_id": 99, "bbox": [0, 0, 5, 5], "score": 0.9}]))
    assert "99" in _error(capsys, ["eval", "--results", str(det), "--val", synth["val"]])
    assert "--precision sets how --weights RUN runs" in _error(
        capsys, ["eval", "--results", str(det), "--val", synth["val"], "--precision", "bf16"])
    assert "run folder not found" in _error(capsys, ["predict", "--weights", str(tmp_path / "norun"), "x.png", "--out", "o"])


def test_training_skips_corrupt_images_and_degenerate_boxes(synth, tmp_path, capsys):
    data = json.loads(open(synth["train"]).read())
    root = tmp_path / "data"
    shutil.copytree(Path(synth["root"]) / "images", root / "images")
    (root / data["images"][0]["file_name"]).write_bytes(b"not a png")
    data["annotations"][0]["bbox"] = [10, 10, 0, 5]
    ann = root / "train.json"
    ann.write_text(json.dumps(data))
    with pytest.warns(UserWarning) as record:
        assert main(["train", "--preset", "dino_tiny", "--train", str(ann), "--out", str(tmp_path / "r"),
                     "--no-progress", *TINY, "train.max_steps=6"]) == 0
    messages = " | ".join(str(w.message) for w in record)
    assert "1 degenerate" in messages or "degenerate" in messages
    assert "000001.png" in messages or "not a png" in messages or "unreadable" in messages


def test_check_data_exit_codes(synth, tmp_path, capsys):
    assert main(["check-data", "--ann", synth["train"]]) == 0
    data = json.loads(open(synth["train"]).read())
    data["annotations"][0]["category_id"] = 42
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(data))
    assert main(["check-data", "--ann", str(ann), "--images", str(synth["root"])]) == 1
    out = capsys.readouterr().out
    assert "unknown category id 42" in out and f"annotation id {data['annotations'][0]['id']} " in out


def test_trains_on_a_yolo_folder_and_takes_its_val_split(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--train", "4", "--val", "2", "--size", "96", "--format", "yolo"]) == 0
    assert "YOLO copy" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", "--preset", "dino_tiny", "--train", str(data / "yolo"), "--out", str(run),
                 "--no-progress", *TINY]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["val"] == config["data"]["train"] == str(data / "yolo")
    assert config["model"]["category_ids"] == [0, 1, 2, 3, 4]  # YOLO class indices
    assert "AP" in json.loads((run / "metrics.json").read_text())
    assert main(["eval", "--weights", str(run), "--val", str(data / "yolo"), "--out", str(tmp_path / "e")]) == 0


def test_overrides_may_follow_options_and_anything_else_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["convert", "--from", "official-dino", "x.pth", "--out", str(tmp_path), "bogus"])
    assert stop.value.code == 2 and "unrecognized arguments: bogus" in capsys.readouterr().err
    # key=value after --out reaches the converter (which then reports the missing file)
    assert main(["convert", "--from", "official-dino", str(tmp_path / "x.pth"), "--out", str(tmp_path), "top_k=5"]) == 2
    assert "x.pth not found" in capsys.readouterr().err


def test_training_stops_when_no_image_can_be_read(synth, tmp_path, capsys, monkeypatch):
    import sparsedet.engine.build as build
    from sparsedet.data.batch import collate
    batches = []

    def guarded(samples, **kwargs):  # fails the test instead of spinning on unreadable batches forever
        batches.append(len(samples))
        assert len(batches) <= 3, "training kept drawing batches in which no image can be read"
        return collate(samples, **kwargs)

    monkeypatch.setattr(build, "collate", guarded)
    nowhere = tmp_path / "nowhere"  # a wrong --images root
    nowhere.mkdir()
    with pytest.warns(UserWarning, match="skipping image id"):
        err = _error(capsys, ["train", "--preset", "dino_tiny", "--train", synth["train"], "--images", str(nowhere),
                              "--out", str(tmp_path / "r"), "--no-progress", *TINY])
    assert f"no image of {synth['train']} can be read under {nowhere}: all 8 failed" in err
    assert "--images" in err and len(batches) == 1 and err.count("\n") == 1


def test_training_counts_size_mismatches_in_one_warning(synth, tmp_path, monkeypatch):
    from sparsedet.engine.trainer import Trainer
    data = json.loads(Path(synth["train"]).read_text())
    data["images"] = data["images"][:3]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in {img["id"] for img in data["images"]}]
    for img in data["images"][:2]:
        img["width"] += 10  # the files are 10 px narrower than the json says
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(data))
    # Only the data path matters here: skip the model's forward and backward passes.
    monkeypatch.setattr(Trainer, "_forward_backward", lambda self, batch, targets, last: {"loss": 1.0})
    with pytest.warns(UserWarning) as record:  # 3 steps of 2 images: the 3 images, then 2 of them again
        assert main(["train", "--preset", "dino_tiny", "--train", str(ann), "--images", synth["root"],
                     "--out", str(tmp_path / "r"), "--no-progress", *TINY, "train.max_steps=3"]) == 0
    messages = [str(w.message) for w in record if "json" in str(w.message)]
    assert len(messages) == 1, messages
    assert messages[0].startswith("2 training image(s) differ in size from their json width/height, e.g. image id ")
    assert "json says" in messages[0] and "clamped" in messages[0]


def test_train_refuses_data_without_boxes(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--train", "2", "--val", "1", "--size", "64", "--format", "yolo"]) == 0
    base = ["--preset", "dino_tiny", "--out", str(tmp_path / "r"), "--no-progress", *TINY]
    yolo = data / "yolo"
    shutil.rmtree(yolo / "labels" / "val")  # a val split without labels: evaluation would be meaningless
    err = _error(capsys, ["train", "--train", str(yolo), *base])
    assert f"(val) has no boxes: none of its 1 images has a label file in {yolo / 'labels' / 'val'}" in err
    (yolo / "labels").rename(yolo / "label")  # a misnamed labels folder
    err = _error(capsys, ["train", "--train", str(yolo), *base])
    assert f"(train) has no boxes: none of its 2 images has a label file in {yolo / 'labels' / 'train'}" in err
    coco = json.loads((data / "train.json").read_text())
    (data / "empty.json").write_text(json.dumps({**coco, "annotations": []}))
    err = _error(capsys, ["train", "--train", str(data / "empty.json"), *base])
    assert "empty.json has no boxes: its 'annotations' list is empty" in err
