"""An image's detections do not depend on the images padded into its batch (``model.mask_padding``):
every tiny preset alone against a mixed batch, ``predict`` at batch 1 against 8, ``eval`` at batch
1 against 8, and the pieces that make it so (per-image RoIAlign edges and score upsampling)."""
import pytest
import torch
import torch.nn.functional as F

from sparsedet import Detector
from sparsedet.data.batch import Batch
from sparsedet.models.encoders.scoring import upsample_within_images
from sparsedet.ops.roi_align import roi_align
from sparsedet.presets import PRESETS

TINY_PRESETS = [name for name in PRESETS if name.endswith("_tiny")]
# Mixed aspect ratios and sizes, none a multiple of the stride: every level has ragged padding.
SIZES = [(130, 98), (128, 160), (100, 128), (83, 77)]
SMALL = dict(num_classes=5, num_queries=30, top_k=30)  # no more queries than an image has tokens


def _images(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in SIZES]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_each_image_alone_equals_it_in_a_padded_batch(preset):
    torch.manual_seed(0)
    model = Detector.from_preset(preset, **SMALL).eval()
    images = _images()
    with torch.no_grad():
        batch = model(Batch.from_images(images, size_divisor=32))
        for i, image in enumerate(images):
            alone = model(Batch.from_images([image]))
            torch.testing.assert_close(alone.logits[0], batch.logits[i], atol=1e-4, rtol=0)
            torch.testing.assert_close(alone.boxes[0], batch.boxes[i], atol=1e-5, rtol=0)


def test_the_official_handling_still_depends_on_the_batch():
    """``mask_padding=false`` (what converted checkpoints use) computes as the official code, whose
    features near the edge change with the padding: the switch is what makes the difference."""
    torch.manual_seed(0)
    model = Detector.from_preset("dino_tiny", **SMALL, mask_padding=False).eval()
    images = _images()
    with torch.no_grad():
        batch = model(Batch.from_images(images, size_divisor=32))
        alone = model(Batch.from_images(images[:1]))
    assert (alone.logits[0] - batch.logits[0]).abs().max() > 1e-2


def test_predict_at_batch_one_equals_batch_eight():
    torch.manual_seed(0)
    model = Detector.from_preset("focus_detr_tiny", **SMALL, eval_size=128, eval_max_size=160)
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, h, w, generator=g) for h, w in SIZES + [(w, h) for h, w in SIZES]]
    one = model.predict(images, threshold=0.0, batch_size=1)
    eight = model.predict(images, threshold=0.0, batch_size=8)
    for a, b in zip(one, eight):
        assert a["labels"].tolist() == b["labels"].tolist()
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-2, rtol=0)  # pixels


def test_eval_does_not_depend_on_the_batch_size(synth):
    from sparsedet.data.coco import CocoDetection
    from sparsedet.data.transforms import build_transforms
    from sparsedet.engine.evaluator import evaluate
    data = CocoDetection(synth["train"], transforms=build_transforms(False, [96], 128))
    torch.manual_seed(0)
    model = Detector.from_preset("sparse_detr_tiny", num_classes=len(data.classes), classes=data.classes,
                                 category_ids=data.category_ids, num_queries=30, top_k=30, eval_size=96,
                                 eval_max_size=128)
    one, results_one = evaluate(model, data, batch_size=1, progress=False)
    eight, results_eight = evaluate(model, data, batch_size=8, progress=False)

    def by_image(results):
        return sorted((r["image_id"], -r["score"], r["category_id"]) for r in results)

    assert len(results_one) == len(results_eight) == len(data) * 30
    for a, b in zip(by_image(results_one), by_image(results_eight)):
        assert a[0] == b[0] and a[1] == pytest.approx(b[1], abs=1e-4)
    for key in ("AP", "AP50", "AR100"):
        assert one[key] == pytest.approx(eight[key], abs=1e-3)


def test_roi_align_reads_each_images_own_edge():
    """A padded map with each image's extent gives what the image's own map gives."""
    g = torch.Generator().manual_seed(0)
    own = torch.rand(1, 3, 5, 7, generator=g)
    padded = F.pad(own, (0, 4, 0, 3), value=9.0)  # padding that must never be read
    boxes = torch.tensor([[[0.0, 0.0, 7.0, 5.0], [4.5, 2.0, 7.5, 5.5], [-0.5, 3.0, 2.0, 6.0]]])
    expected = roi_align(own, boxes, (4, 4))
    got = roi_align(padded, boxes, (4, 4), extents=torch.tensor([[5, 7]]))
    torch.testing.assert_close(got, expected)


def test_upsampling_within_images_matches_interpolate_on_each_image():
    g = torch.Generator().manual_seed(0)
    coarse = [torch.rand(1, 1, h, w, generator=g) for h, w in [(3, 4), (4, 2), (1, 1)]]
    fine_sizes = [(6, 7), (7, 4), (2, 1)]
    batch = torch.zeros(3, 1, 4, 4)
    for i, c in enumerate(coarse):
        batch[i, :, :c.shape[2], :c.shape[3]] = c
    size_in = torch.tensor([c.shape[-2:] for c in coarse])
    got = upsample_within_images(batch, size_in, torch.tensor(fine_sizes), (7, 7))
    for i, (c, (h, w)) in enumerate(zip(coarse, fine_sizes)):
        expected = F.interpolate(c, size=(h, w), mode="bilinear", align_corners=True)
        torch.testing.assert_close(got[i:i + 1, :, :h, :w], expected, atol=1e-6, rtol=0)
