"""The README's claim: a new token-sparse method is one encoder file plus one preset. The README's
own example runs here, then the new method trains, is supervised by the loss its base declares,
and its selection differs from the base's cascade."""
import re
from pathlib import Path

import torch

from sparsedet.data.batch import Batch
from sparsedet.losses.criterion import SetCriterion
from sparsedet.models.encoders import ENCODERS
from sparsedet.presets import PRESETS

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_example() -> str:
    text = README.read_text()
    section = text[text.index("### A new token-sparse method"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_adds_a_method_that_trains():
    namespace: dict = {}
    try:
        exec(compile(_readme_example(), str(README), "exec"), namespace)
        model = namespace["model"]
        assert type(model.encoder).__name__ == "FlatFocusEncoder"
        torch.manual_seed(0)
        model.train()
        batch = Batch(torch.rand(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool))
        targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.4]])},
                   {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.5]])}]
        out = model(batch, targets)
        layers = out.selection.layers
        assert all(torch.equal(s.indices, layers[0].indices) for s in layers)  # one set, no cascade
        terms = SetCriterion.for_model(model.config)(out, targets)  # Focus-DETR's foreground loss
        assert torch.isfinite(terms["loss_select"]) and terms["loss_select"] > 0
        terms["loss_select"].backward()
        assert sum(p.grad.abs().sum() for p in model.encoder.scorer.parameters()) > 0
    finally:  # leave the tables as the other tests expect them
        ENCODERS.pop("flat_focus", None)
        PRESETS.pop("flat_focus_detr_tiny", None)
