"""Salience DETR's cross-level fusion: official layout, shapes, gradients, the context gate."""
import json

import torch

from sparsedet.nn.fusion import ContextGate, CrossLevelFusion


def test_state_dict_layout_matches_the_official_neck(shared_dir):
    folder = shared_dir / "fixtures" / "official" / "salience_detr"
    manifest = json.loads((folder / "manifest.json").read_text())
    from safetensors.torch import load_file
    prefix = "transformer.neck."
    official = {k[len(prefix):]: tuple(shape) for keys, shape in manifest["parameters"] for k in keys
                if k.startswith(prefix)}
    official.update({k[len(prefix):]: tuple(v.shape) for k, v in load_file(folder / "buffers.safetensors").items()
                     if k.startswith(prefix)})
    ours = {k: tuple(v.shape) for k, v in CrossLevelFusion(256, 4).state_dict().items()}
    assert ours == official


def test_shapes_are_kept_and_every_parameter_learns():
    torch.manual_seed(0)
    # Full width: at 32 channels a gate's 2-unit ReLU bottleneck is often dead for every input.
    fusion = CrossLevelFusion(256, 4)
    shapes = [(13, 17), (7, 9), (4, 5), (2, 3)]
    maps = [torch.randn(2, 256, h, w) for h, w in shapes]
    outs = fusion(maps)
    assert [tuple(o.shape[-2:]) for o in outs] == shapes
    sum(o.square().mean() for o in outs).backward()
    # The pooling logits' bias cannot learn: a softmax ignores a shift shared by all positions.
    learns = {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in fusion.named_parameters()}
    assert all(ok for n, ok in learns.items() if not n.endswith("conv_mask.bias"))


def test_context_gate_halves_features_when_its_mlp_is_zero():
    gate = ContextGate(32)
    for p in gate.se_module.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(2, 32, 5, 6)
    assert torch.allclose(gate(x), 0.5 * x)  # sigmoid(0) = 1/2 whatever the pooled context
