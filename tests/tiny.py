"""Overrides that make a preset small enough to train a few steps in seconds on a CPU, and a batch
with targets to train a model on by hand."""
import torch

from sparsedet.data.batch import Batch

TINY = ["train.max_steps=2", "train.batch_size=2", "model.num_queries=20", "model.dn_queries=6",
        "model.num_encoder_layers=1", "model.num_decoder_layers=1", "model.hidden_dim=64", "model.ffn_dim=64",
        "model.backbone.width=8", "model.eval_size=96", "model.eval_max_size=128", "data.train_scales=[96]",
        "data.max_size=128", "train.precision=fp32"]


def two_images(height: int = 96, width: int = 128) -> tuple[Batch, list[dict]]:
    """Two random images (no padding) and their targets: one box, and two of other classes."""
    batch = Batch(torch.rand(2, 3, height, width), torch.zeros(2, height, width, dtype=torch.bool))
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.4]])},
               {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.5]])}]
    return batch, targets
