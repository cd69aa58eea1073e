"""Multiply-add counting: matmuls halved from PyTorch's 2-per-MAC, bilinear sampling at 4 per output."""
import torch
import torch.nn.functional as F

from sparsedet.ops.flops import count_macs


def test_linear_and_grid_sample_counts():
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    assert count_macs(lambda: linear(x))["Global"] == 3 * 16 * 8
    value = torch.randn(1, 4, 5, 6)
    grid = torch.rand(1, 7, 2, 2) * 2 - 1
    # fvcore's rule: 4 per output element (1 x 4 channels x 7 x 2 outputs).
    assert count_macs(lambda: F.grid_sample(value, grid, align_corners=False))["Global"] == 4 * 4 * 7 * 2


def test_sparse_encoder_costs_less_than_dense():
    from sparsedet.data.batch import Batch
    from sparsedet.models.detector import DetectionTransformer
    from sparsedet.presets import get_preset
    costs = {}
    for preset in ("dino_tiny", "focus_detr_tiny"):
        torch.manual_seed(0)
        cfg = get_preset(preset)
        cfg.model.num_classes = 3
        model = DetectionTransformer(cfg.model).eval()
        batch = Batch(torch.rand(1, 3, 128, 128), torch.zeros(1, 128, 128, dtype=torch.bool))
        with torch.no_grad():
            levels = model.features(batch)
        costs[preset] = count_macs(lambda: model.encoder(levels, model.queries))["Global"]
    assert costs["focus_detr_tiny"] < 0.8 * costs["dino_tiny"]
