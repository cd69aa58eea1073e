"""Building blocks: backbone names, position embeddings, denoising mask, criterion, config."""
import math

import pytest
import torch

from sparsedet.config import Config, apply_overrides
from sparsedet.errors import SparsedetError
from sparsedet.losses.focal import sigmoid_focal_loss
from sparsedet.models.denoising import ContrastiveDenoising
from sparsedet.nn.backbone import ResNet
from sparsedet.nn.position import SineMapEmbedding, sine_embed_coords
from sparsedet.presets import PRESETS, get_preset


def test_resnet50_has_torchvision_names_and_shapes():
    net = ResNet(50)
    sd = net.state_dict()
    # 53 convs; every FrozenBatchNorm2d has 4 buffers (torchvision resnet50 minus fc: 320 entries
    # once num_batches_tracked (53 of them) is excluded).
    assert len(sd) == 53 + 53 * 4
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer3.5.bn3.running_var"].shape == (1024,)
    assert sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    outs = net(torch.rand(1, 3, 64, 96))
    assert [o.shape[1:] for o in outs] == [(512, 8, 12), (1024, 4, 6), (2048, 2, 3)]
    assert not any(p.requires_grad for n, p in net.named_parameters() if n.startswith(("conv1", "layer1")))


def test_backbone_weights_file_loads_and_bad_file_is_named(tmp_path):
    src = ResNet(18)
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    sd["fc.weight"] = torch.zeros(1000, 512)
    sd["bn1.num_batches_tracked"] = torch.tensor(0)
    torch.save(sd, tmp_path / "r18.pth")
    net = ResNet(18)
    net.load_weights(tmp_path / "r18.pth")
    torch.testing.assert_close(net.state_dict()["layer2.1.conv2.weight"], sd["layer2.1.conv2.weight"])
    with pytest.raises(SparsedetError, match="do not fit"):
        ResNet(34).load_weights(tmp_path / "r18.pth")
    with pytest.raises(SparsedetError, match="not found"):
        net.load_weights(tmp_path / "missing.pth")
    with pytest.raises(SparsedetError, match=r"misshapen: \['conv1.weight \(8, 3, 7, 7\) \(expected \(4, 3, 7, 7\)"):
        ResNet(18, width=4).load_weights(_save_resnet(tmp_path / "r18w8.pth", ResNet(18, width=8)))


def test_only_a_fresh_model_reads_the_backbone_file(tmp_path):
    """Building a model reads nothing from disk; from_preset and a training from scratch
    (from_config(..., backbone_weights=True)) load the ImageNet file the config names."""
    from sparsedet import Detector
    path = _save_resnet(tmp_path / "r18w8.pth", ResNet(18, width=8))
    model = Detector.from_preset("dino_tiny", **{"backbone.depth": 18, "backbone.width": 8, "backbone.weights": str(path)})
    torch.testing.assert_close(model.backbone.state_dict()["layer3.0.conv1.weight"],
                               torch.load(path)["layer3.0.conv1.weight"])
    config = get_preset("dino_tiny")
    apply_overrides(config, {"backbone.weights": str(tmp_path / "gone.pth")})
    Detector.from_config(config)  # no read: a run's own weights or a checkpoint hold the backbone
    with pytest.raises(SparsedetError, match="not found"):
        Detector.from_config(config, backbone_weights=True)


def _save_resnet(path, net):
    torch.save(net.state_dict(), path)
    return path


def test_detectron2_pickle_loads_and_nothing_else_is_unpickled(tmp_path):
    import os
    import pickle

    from conftest import detectron2_names
    src = ResNet(18)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in src.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.zeros(1000, 512)
    d2 = {k: v.numpy() for k, v in detectron2_names(state).items()}
    assert "res3.0.shortcut.norm.running_var" in d2 and "stem.conv1.norm.bias" in d2
    path = tmp_path / "R-18.pkl"  # as detectron2's convert-torchvision-to-d2 writes it
    path.write_bytes(pickle.dumps({"model": d2, "__author__": "torchvision", "matching_heuristics": True}))
    net = ResNet(18)
    net.load_weights(path)
    got = net.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if not k.startswith("fc."))

    class Payload:
        def __reduce__(self):
            return os.system, ("echo owned > " + str(tmp_path / "owned"),)
    path.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": Payload()}}))
    with pytest.raises(SparsedetError, match="R-18.pkl .*refusing to load .*system"):
        net.load_weights(path)
    assert not (tmp_path / "owned").exists()
    path.write_bytes(pickle.dumps({"conv1_w": d2["stem.conv1.weight"], "res2_0_branch2a_w": d2["res2.0.conv1.weight"]}))
    with pytest.raises(SparsedetError, match="Caffe2 .*strides in the 1x1"):
        net.load_weights(path)


def test_sine_map_embedding_conventions():
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    pos = SineMapEmbedding(num_feats=4, temperature=10000.0, offset=-0.5)(mask)
    # y of row 0 with offset -0.5: (1 - 0.5) / 2 * 2pi = pi/2 -> first channel sin(pi/2) = 1
    assert pos[0, 0, 0, 0].item() == pytest.approx(1.0)
    # x block starts at channel 4; column 3: (4 - 0.5) / 4 * 2pi, sin of it
    assert pos[0, 4, 0, 3].item() == pytest.approx(math.sin(3.5 / 4 * 2 * math.pi), abs=1e-6)
    pos0 = SineMapEmbedding(num_feats=4, temperature=20.0, offset=0.0)(mask)
    assert pos0[0, 0, 1, 0].item() == pytest.approx(math.sin(2 * math.pi), abs=1e-5)


def test_box_sine_embedding_orders():
    box = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    yx = sine_embed_coords(box, num_feats=2, order="yxwh")
    xy = sine_embed_coords(box, num_feats=2, order="xywh")
    assert yx[0, 0].item() == pytest.approx(math.sin(0.2 * 2 * math.pi))
    assert xy[0, 0].item() == pytest.approx(math.sin(0.1 * 2 * math.pi))
    assert xy[0, 1].item() == pytest.approx(math.cos(0.1 * 2 * math.pi))
    torch.testing.assert_close(yx[:, 4:], xy[:, 4:])


def test_denoising_groups_and_attention_mask():
    torch.manual_seed(0)
    dn = ContrastiveDenoising(num_classes=3, dim=8, num_queries=10)
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.6, 0.3, 0.2]])}]
    q = dn(targets, num_matching=5)
    assert (q.num_groups, q.group_size, q.num_queries) == (5, 2, 20)
    m = q.attn_mask
    assert m.shape == (25, 25)
    assert m[20:, :20].all() and not m[20:, 20:].any()      # matching queries never see DN queries
    assert not m[:4, :4].any() and m[:4, 4:20].all()          # group 0 sees only itself among DN
    assert not m[:20, 20:].any()                              # DN queries see matching queries
    # Image 1 has one object: its slot 1 of each half is padding -> zero content, box at 0.5.
    assert q.tgt[1, 1].abs().sum() == 0 and torch.allclose(q.reference[1, 1], torch.full((4,), 0.5))
    # Positives move less than negatives (corner noise < 1 vs >= 1 half-size).
    assert (q.reference[0, 0, :2] - targets[0]["boxes"][0, :2]).abs().max() < 0.1 + 1e-6


def test_focal_loss_hand_computed():
    logit, target = torch.tensor([0.0]), torch.tensor([1.0])
    # p = 0.5: alpha * (1 - p)^2 * -log p
    assert sigmoid_focal_loss(logit, target).item() == pytest.approx(0.25 * 0.25 * math.log(2))


def test_config_round_trip_and_overrides(tmp_path):
    cfg = get_preset("dino_tiny")
    apply_overrides(cfg, ["train.max_steps=7", "hidden_dim=64", "model.backbone.depth=34", "train.precision=fp32"])
    assert (cfg.train.max_steps, cfg.model.hidden_dim, cfg.model.backbone.depth,
            cfg.train.precision) == (7, 64, 34, "fp32")
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg
    with pytest.raises(SparsedetError, match="did you mean train.max_steps"):
        apply_overrides(cfg, ["train.max_step=3"])
    # A misspelt section is matched first, then the field within it (whole-key matching picked
    # model.enc_points for this one); a key without "model." still finds model fields.
    with pytest.raises(SparsedetError, match=r"'trian.minutes'; did you mean train.minutes\?"):
        apply_overrides(cfg, ["trian.minutes=1"])
    with pytest.raises(SparsedetError, match="did you mean model.encoder.keep_ratio"):
        apply_overrides(cfg, ["encodr.keep_ratio=0.2"])
    with pytest.raises(SparsedetError, match="did you mean model.hidden_dim"):
        apply_overrides(cfg, ["hiden_dim=3"])
    with pytest.raises(SparsedetError, match="key.sub=value"):
        apply_overrides(cfg, ["train.max_steps"])
    with pytest.raises(SparsedetError, match="expects true or false"):
        apply_overrides(cfg, ["model.two_stage=3"])
    with pytest.raises(SparsedetError, match="unknown preset 'dino_tine'. Did you mean dino_tiny"):
        get_preset("dino_tine")


def test_official_hyper_parameters_in_presets():
    d, two, dino = (PRESETS[n]().model for n in ("deformable_detr_r50", "deformable_detr_r50_two_stage", "dino_r50"))
    assert (d.ffn_dim, d.num_queries, d.dropout, d.loss.cls_weight, d.top_k) == (1024, 300, 0.1, 2.0, 100)
    assert two.two_stage and two.box_refine
    assert (dino.ffn_dim, dino.num_queries, dino.dropout, dino.pos_temperature, dino.pos_offset) == (2048, 900, 0.0, 20.0, 0.0)
    assert (dino.dn_queries, dino.sigmoid_eps, dino.loss.cls_weight, dino.top_k) == (100, 1e-3, 1.0, 300)


def test_varifocal_loss_matches_its_formula():
    from sparsedet.losses.focal import varifocal_loss
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, requires_grad=True)
    onehot = torch.zeros(2, 3, 4)
    onehot[0, 1, 2] = onehot[1, 0, 3] = 1
    quality = torch.tensor([[0.0, 0.7, 0.0], [0.4, 0.0, 0.0]])
    p = logits.sigmoid()
    target = onehot * quality[..., None]
    weight = 0.75 * p.detach() ** 2 * (1 - onehot) + target
    direct = -(weight * (target * torch.log(p) + (1 - target) * torch.log(1 - p))).sum()
    loss = varifocal_loss(logits, onehot, quality)
    assert torch.allclose(loss, direct, atol=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
