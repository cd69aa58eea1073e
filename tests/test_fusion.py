"""Salience DETR's cross-level fusion: official layout, init, shapes and gradients, routing, blocks."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED, require_shared

from sparsedet.nn.fusion import CrossLevelFusion

SHAPES = [(13, 17), (7, 9), (4, 5), (2, 3)]


def test_state_dict_layout_matches_the_official_neck():
    folder = require_shared(SHARED / "fixtures" / "official" / "salience_detr")
    from safetensors.torch import load_file
    prefix = "transformer.neck."
    manifest = json.loads((folder / "manifest.json").read_text())
    official = {k[len(prefix):]: tuple(shape) for keys, shape in manifest["parameters"] for k in keys
                if k.startswith(prefix)}
    buffers = {k[len(prefix):]: v for k, v in load_file(folder / "buffers.safetensors").items()
               if k.startswith(prefix)}
    official.update({k: tuple(v.shape) for k, v in buffers.items()})
    ours = CrossLevelFusion(256, 4, groups=4).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == official
    for k, v in buffers.items():  # fresh running statistics, as the official constructor leaves them
        assert torch.equal(ours[k], v), k


def test_init_is_kaiming_uniform_with_a_1_and_zero_biases():
    fusion = CrossLevelFusion(64, 3)
    convs = [m for m in fusion.modules() if isinstance(m, torch.nn.Conv2d)]
    wide = 0
    for conv in convs:
        fan_in = conv.weight[0].numel()
        assert conv.weight.abs().max() <= math.sqrt(3 / fan_in) + 1e-6  # a=1 bound
        wide += conv.weight.abs().max() > 1 / math.sqrt(fan_in)  # beyond PyTorch's default bound
        if conv.bias is not None:
            assert not conv.bias.any()
    assert wide > len(convs) // 2
    for bn in (m for m in fusion.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()


def test_shapes_are_kept_and_every_parameter_learns():
    torch.manual_seed(0)
    fusion = CrossLevelFusion(256, 4)  # full width: the gates' MLPs have 16 hidden units
    maps = [torch.randn(2, 256, h, w) for h, w in SHAPES]
    outs = fusion(maps)
    assert [tuple(o.shape) for o in outs] == [(2, 256, h, w) for h, w in SHAPES]
    sum(o.square().mean() for o in outs).backward()
    for name, p in fusion.named_parameters():
        if name.endswith("conv_mask.bias"):  # a shift shared by all softmax logits: gradient is 0
            assert p.grad is not None and p.grad.abs().max() < 1e-6, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("train", [True, False])
def test_runs_under_bf16_autocast(train):
    fusion = CrossLevelFusion(32, 3).train(train)
    maps = [torch.randn(2, 32, h, w, requires_grad=True) for h, w in SHAPES[:3]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = fusion(maps)
    assert [o.shape[-2:] for o in outs] == [m.shape[-2:] for m in maps]
    sum(o.float().sum() for o in outs).backward()
    assert all(torch.isfinite(o).all() for o in outs) and all(torch.isfinite(m.grad).all() for m in maps)


def test_routing_matches_a_hand_derived_pan():
    """Bottleneck-free fusion: every conv zero except lateral = I, downsample = centre-tap I and each
    CSP stage's second projection = [I, 2I]; BN in eval is the identity. Each stage then returns
    silu(a + 2b) for the concatenation [a, b], and the PAN can be written out by hand."""
    dim, eye = 16, torch.eye(16)
    fusion = CrossLevelFusion(dim, 4, groups=4).eval()
    with torch.no_grad():
        for m in fusion.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.eps = 0.0
        for lateral, down in zip(fusion.lateral_convs, fusion.downsample_blocks):
            lateral[0].weight.copy_(eye[..., None, None])
            down[0].weight[:, :, 1, 1] = eye
        for stage in [*fusion.layer_blocks, *fusion.pan_blocks]:
            stage.conv2[0].weight.copy_(torch.cat([eye, 2 * eye], 1)[..., None, None])
    x = [torch.randn(1, dim, h, w) for h, w in SHAPES]

    def up(t, size):  # nearest: target cell i reads source cell floor(i * in / out)
        rows = torch.arange(size[0]) * t.shape[-2] // size[0]
        cols = torch.arange(size[1]) * t.shape[-1] // size[1]
        return t[..., rows[:, None], cols]

    s = F.silu
    lat3 = s(x[3])
    lat2 = s(s(up(lat3, SHAPES[2]) + 2 * x[2]))
    lat1 = s(s(up(lat2, SHAPES[1]) + 2 * x[1]))
    out0 = s(up(lat1, SHAPES[0]) + 2 * x[0])
    out1 = s(s(out0[..., ::2, ::2]) + 2 * lat1)  # bottom-up meets the lateral projections
    out2 = s(s(out1[..., ::2, ::2]) + 2 * lat2)
    out3 = s(s(out2[..., ::2, ::2]) + 2 * lat3)
    with torch.no_grad():
        outs = fusion(x)
    for got, want in zip(outs, [out0, out1, out2, out3]):
        torch.testing.assert_close(got, want)


def test_rep_block_equals_its_merged_single_conv():
    """In eval, a rep block's two conv+BN branches are one 3x3 group conv with bias (RepVGG merge);
    the gate pools with softmax(conv_mask) and scales by sigmoid(W2 relu(W1 context))."""
    torch.manual_seed(0)
    dim, g = 32, 4
    block = CrossLevelFusion(dim, 2, groups=g).layer_blocks[0].bottlenecks[1].eval()
    with torch.no_grad():
        for bn in (block.conv1[1], block.conv2[1]):
            for t in (bn.weight, bn.bias, bn.running_mean):
                t.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        block.se_module.conv_mask.bias.fill_(0.3)

    def folded(branch):
        conv, bn = branch
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        return conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale

    w3, b3 = folded(block.conv1)
    w1, b1 = folded(block.conv2)
    weight = w3 + F.pad(w1, (1, 1, 1, 1))
    x = torch.randn(2, dim, 5, 7)
    y = F.silu(F.conv2d(x, weight, b3 + b1, padding=1, groups=g))
    gate = block.se_module
    logits = torch.einsum("bchw,c->bhw", y, gate.conv_mask.weight.flatten()) + 0.3
    attn = logits.flatten(1).softmax(-1).view_as(logits)
    context = torch.einsum("bchw,bhw->bc", y, attn)
    scale = torch.sigmoid(torch.relu(context @ gate.se_module[0].weight[..., 0, 0].T)
                          @ gate.se_module[2].weight[..., 0, 0].T)
    with torch.no_grad():
        torch.testing.assert_close(block(x), scale[..., None, None] * y + x, rtol=1e-4, atol=1e-5)
