"""Returned boxes stay inside the image: post-processing, the API, `sparsedet predict` and evaluation."""
import json
from pathlib import Path

import numpy as np
import torch

from sparsedet import Detector
from sparsedet.cli import main
from sparsedet.data.coco import open_detection_dataset
from sparsedet.data.transforms import build_transforms
from sparsedet.engine.evaluator import evaluate
from sparsedet.config import ModelConfig
from sparsedet.models.postprocess import PostProcess

SMALL = {"hidden_dim": 64, "ffn_dim": 64, "num_encoder_layers": 1, "num_decoder_layers": 1, "num_queries": 10,
         "dn_queries": 4, "eval_size": 64, "eval_max_size": 96, "backbone.width": 8}


def test_postprocess_clips_each_box_to_its_own_image():
    logits = torch.full((2, 2, 1), 5.0)
    boxes = torch.tensor([[[0.9, 0.1, 0.5, 0.5], [0.5, 0.5, 0.2, 0.2]],
                          [[0.1, 0.9, 0.4, 0.6], [0.5, 0.5, 1.5, 1.5]]])
    sizes = torch.tensor([[100, 200], [50, 80]])  # (height, width)
    out = PostProcess(ModelConfig(num_classes=1)).detections(logits, boxes, sizes, top_k=2)
    expected = [{(130.0, 0.0, 200.0, 35.0), (80.0, 40.0, 120.0, 60.0)},
                {(0.0, 30.0, 24.0, 50.0), (0.0, 0.0, 80.0, 50.0)}]
    for det, want in zip(out, expected):
        assert {tuple(round(v, 3) for v in b) for b in det["boxes"].tolist()} == want


def _wide_box_model():
    """A random tiny model whose boxes are nearly as large as the image, so most leave it unclipped."""
    torch.manual_seed(0)
    model = Detector.from_preset("dino_tiny", num_classes=3, **SMALL).eval()
    with torch.no_grad():
        for head in model.heads.box_embed:
            head.layers[-1].bias[2:] = 6.0
    return model


def test_predict_and_cli_boxes_stay_inside_the_image(tmp_path):
    model = _wide_box_model()
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    det = model.predict(image, threshold=0.0, top_k=10)[0]
    boxes = det["boxes"]
    assert boxes.shape == (10, 4) and boxes.min() >= 0
    assert (boxes[:, [0, 2]] <= 70).all() and (boxes[:, [1, 3]] <= 50).all()
    assert (boxes[:, 0] == 0).any() and (boxes[:, 2] == 70).any()  # exact edges: clipped, not merely small
    assert (boxes[:, 2:] > boxes[:, :2]).all()  # every box keeps a positive area

    run, path = tmp_path / "run", tmp_path / "image.png"
    model.save_pretrained(run)
    from PIL import Image
    Image.fromarray(image).save(path)
    assert main(["predict", "--weights", str(run), str(path), "--out", str(tmp_path / "out"),
                 "--threshold", "0", "--top-k", "10"]) == 0
    preds = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(preds) == 10
    for p in preds:
        x, y, w, h = p["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 70 + 0.01 and y + h <= 50 + 0.01


def test_evaluation_scores_the_clipped_boxes(synth):
    model = _wide_box_model()
    dataset = open_detection_dataset(synth["val"], "val", None, build_transforms(False, [64], 96))
    _, results = evaluate(model, dataset, batch_size=4, progress=False)
    sizes = {im["id"]: (im["width"], im["height"]) for im in json.loads(Path(synth["val"]).read_text())["images"]}
    assert results
    for r in results:
        x, y, w, h = r["bbox"]
        width, height = sizes[r["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= width + 1e-3 and y + h <= height + 1e-3
    assert any(r["bbox"][0] == 0 for r in results)
