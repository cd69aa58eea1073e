"""The Python API: presets, save/load round trip, predict on every input type and precision."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sparsedet import Detector, SparsedetError
from sparsedet.data.batch import Batch
from sparsedet.losses.criterion import SetCriterion

SMALL = {"hidden_dim": 64, "ffn_dim": 64, "num_encoder_layers": 1, "num_decoder_layers": 2, "num_queries": 10,
         "dn_queries": 4, "eval_size": 64, "eval_max_size": 96, "backbone.width": 8}


@pytest.mark.parametrize("preset", ["dino_tiny", "deformable_detr_tiny"])
def test_save_load_round_trip_and_predict(preset, tmp_path):
    torch.manual_seed(0)
    model = Detector.from_preset(preset, classes=["a", "b", "c"], category_ids=[1, 4, 9], **SMALL).eval()
    assert model.num_classes == 3 and model.classes == ["a", "b", "c"]
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    before = model.predict(image, threshold=0.0, top_k=5)[0]
    model.save_pretrained(tmp_path / "run")
    loaded = Detector.from_pretrained(tmp_path / "run")
    for img in (image, Image.fromarray(image), torch.from_numpy(image).permute(2, 0, 1).float() / 255):
        after = loaded.predict(img, threshold=0.0, top_k=5)[0]
        torch.testing.assert_close(after["scores"], before["scores"])
        torch.testing.assert_close(after["boxes"], before["boxes"])
    # Boxes are in original pixels: inside the 70 x 50 image.
    assert before["boxes"].shape == (5, 4)
    assert (before["boxes"][:, [0, 2]] <= 70 + 1e-3).all() and (before["boxes"][:, [1, 3]] <= 50 + 1e-3).all()
    with pytest.raises(SparsedetError, match="cannot read an image"):
        loaded.predict(3.14)


def test_predict_in_bf16_gives_fp32_detections_and_never_relays_the_model():
    torch.manual_seed(0)
    model = Detector.from_preset("dino_tiny", num_classes=3, **SMALL).eval()
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    conv = next(p for p in model.backbone.parameters() if p.dim() == 4)
    weights = conv.data_ptr()
    before = model.predict(image, threshold=0.0, top_k=5)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no native bf16" where the CPU has none
        dets = model.predict([image, image], threshold=0.0, top_k=5, precision="bf16")
    after = model.predict(image, threshold=0.0, top_k=5)[0]
    assert len(dets) == 2
    for det in dets:
        assert det["boxes"].dtype == det["scores"].dtype == torch.float32 and det["labels"].dtype == torch.long
        assert det["boxes"].shape == (5, 4) and det["scores"].shape == det["labels"].shape == (5,)
    # Eval mode laid the backbone out channels_last once; predictions left the very same tensors.
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.data_ptr() == weights
    assert all(torch.equal(after[k], before[k]) for k in ("boxes", "scores", "labels"))
    assert after["names"] == before["names"] == [model.classes[i] for i in before["labels"].tolist()]
    model.train()  # training sees the layout it always had
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(SparsedetError, match="unknown precision 'fp8'; choose one of fp32, bf16, fp16"):
        model.predict(image, precision="fp8")
    with pytest.raises(SparsedetError, match="fp16 runs on CUDA only"):
        model.predict(image, precision="fp16")


def test_deformable_two_stage_encoder_loss_is_class_agnostic():
    torch.manual_seed(0)
    model = Detector.from_preset("deformable_detr_tiny", num_classes=3, **SMALL).train()
    batch = Batch.from_images([torch.rand(3, 64, 64)])
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    out = model(batch, targets)
    assert out.dn is None and out.enc.class_agnostic and out.enc.logits.shape[1] == sum(h * w for h, w in [(8, 8), (4, 4), (2, 2), (1, 1)])
    criterion = SetCriterion(3, model.config.loss)
    losses = criterion(out, targets)
    assert set(losses) == {f"loss_{t}{s}" for t in ("cls", "bbox", "giou") for s in ("", "_0", "_enc")}
    # Class-agnostic: the encoder's target column is 0 whatever the label, so only column 0 is pulled up.
    logits = out.enc.logits.detach().requires_grad_()
    out.enc.logits = logits
    criterion(out, targets)["loss_cls_enc"].backward()
    assert (logits.grad[..., 0] < 0).any() and not (logits.grad[..., 2] < 0).any()


def test_training_outputs_and_losses_have_the_documented_names():
    torch.manual_seed(0)
    model = Detector.from_preset("dino_tiny", num_classes=3, **SMALL).train()
    batch = Batch.from_images([torch.rand(3, 64, 64), torch.rand(3, 48, 64)])
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.2, 0.3, 0.1, 0.2]])},
               {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    out = model(batch, targets)
    assert out.logits.shape == (2, 10, 3) and out.boxes.shape == (2, 10, 4) and len(out.aux) == 1
    assert out.dn.logits.shape[:3] == (2, 2, 8)  # layers, batch, 2 * max_gt * groups
    losses = SetCriterion(3, model.config.loss)(out, targets)
    expected = {f"loss_{t}{s}" for t in ("cls", "bbox", "giou") for s in ("", "_0", "_enc", "_dn", "_dn_0")}
    assert set(losses) == expected
    total = SetCriterion(3, model.config.loss).total(losses)
    total.backward()
    assert model.denoising.label_enc.weight.grad is not None
    assert all(torch.isfinite(v) for v in losses.values())
