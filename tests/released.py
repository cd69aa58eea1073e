"""Checkpoints laid out and packed as each source releases them, for the converter tests.

Official DINO, Sparse DETR, Focus-DETR, Salience DETR and SAM-DETR files are rebuilt from the
official layouts recorded in ../shared/fixtures; Deformable DETR and Conditional DETR files are our
random model renamed to the official code's names; Hugging Face folders come from transformers.
"""
import argparse
import json
from pathlib import Path

import torch
from conftest import detectron2_names

from sparsedet.data.categories import COCO_CATEGORIES
from sparsedet.nn.backbone import ResNet
from sparsedet.nn.swin import SwinTransformer, relative_position_index

SMALL_DEFORMABLE = {"backbone.depth": 18, "num_encoder_layers": 2, "num_decoder_layers": 2, "ffn_dim": 64,
                    "num_queries": 30, "num_classes": 91}
SMALL_CONDITIONAL = {**SMALL_DEFORMABLE, "num_decoder_layers": 3}


def deformable_detr_layout(ours: dict, layers: int, two_stage: bool, box_refine: bool) -> dict:
    """Our state dict in fundamentalvision/Deformable-DETR's names (models/deformable_detr.py and
    deformable_transformer.py), with its duplicated heads."""
    out = {}
    for key, value in ours.items():
        for mine, theirs in (("backbone.", "backbone.0.body."), ("neck.input_proj.", "input_proj."),
                             ("neck.level_embed", "transformer.level_embed"),
                             ("encoder.layers.", "transformer.encoder.layers."),
                             ("decoder.layers.", "transformer.decoder.layers."),
                             ("queries.query_embed.", "query_embed."), ("queries.class_head.", f"class_embed.{layers}."),
                             ("queries.box_head.", f"bbox_embed.{layers}."), ("queries.", "transformer."),
                             ("heads.class_embed.", "class_embed."), ("heads.box_embed.", "bbox_embed.")):
            if key.startswith(mine):
                out[theirs + key[len(mine):]] = value.clone()
                break
        else:
            raise AssertionError(f"no official name for {key}")
    heads = [k for k in out if k.startswith(("class_embed.", "bbox_embed."))]
    if not box_refine:  # nn.ModuleList([head] * num_pred): the same module under every index
        for key in heads:
            kind, _, rest = key.split(".", 2)
            out.update({f"{kind}.{k}.{rest}": out[key] for k in range(1, layers)})
    else:  # the decoder keeps the box heads (and, two-stage, the class heads) too
        for key in heads:
            if key.startswith("bbox_embed.") or two_stage:
                out["transformer.decoder." + key] = out[key]
    return out


def save_deformable_detr(tmp_path: Path, state: dict, **args) -> Path:
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "optimizer": {}, "epoch": 49,
                "args": argparse.Namespace(nheads=8, dropout=0.1, dilation=False, **args)}, path)
    return path


def conditional_detr_layout(ours: dict) -> dict:
    """Our state dict in models/conditional_detr.py + transformer.py names (the encoder uses
    nn.MultiheadAttention, the decoder the repository's own attention with only out_proj)."""
    out = {}
    for key, value in ours.items():
        if key.startswith("backbone."):
            out["backbone.0.body." + key[len("backbone."):]] = value
        elif key.startswith("neck.input_proj.0.0."):
            out["input_proj." + key.rsplit(".", 1)[1]] = value
        elif key == "queries.query_embed.weight":
            out["query_embed.weight"] = value
        elif key.startswith("queries.ref_point_head."):
            out["transformer.decoder." + key[len("queries."):]] = value
        elif key.startswith(("encoder.", "decoder.")):
            out["transformer." + key.replace(".cross.", ".")] = value
        elif key.startswith("heads.class_embed.0."):
            out["class_embed." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("heads.box_embed.0."):
            out["bbox_embed." + key[len("heads.box_embed.0."):]] = value
        else:
            raise AssertionError(f"no official name for {key}")
    layers = 1 + max(int(k.split(".")[3]) for k in out if k.startswith("transformer.decoder.layers."))
    for i in range(1, layers):  # built in every layer, used in the first only
        out[f"transformer.decoder.layers.{i}.ca_qpos_proj.weight"] = torch.randn(256, 256)
        out[f"transformer.decoder.layers.{i}.ca_qpos_proj.bias"] = torch.randn(256)
    return out


def save_conditional_detr(tmp_path: Path, state: dict, dilation: bool = False) -> Path:
    path = tmp_path / "ConditionalDETR_r18.pth"
    torch.save({"model": state, "epoch": 49, "args": argparse.Namespace(nheads=8, dropout=0.1, dilation=dilation,
                                                                         num_queries=30)}, path)
    return path


def sam_detr_layout(ours: dict) -> dict:
    """Our single-scale SAM-DETR state dict in ZhangGongjie/SAM-DETR's names (models/fast_detr.py,
    transformer_decoder.py), with the box heads saved a second time under the decoder."""
    out = {}
    for key, value in ours.items():
        for mine, theirs in (("backbone.", "backbone.0.body."), ("neck.input_proj.", "input_proj."),
                             ("queries.query_embed.", "query_embed."), ("encoder.", "transformer.encoder."),
                             ("decoder.", "transformer.decoder."), ("heads.class_embed.", "class_embed."),
                             ("heads.box_embed.", "bbox_embed.")):
            if key.startswith(mine):
                out[theirs + key[len(mine):]] = value.clone()
                break
        else:
            raise AssertionError(f"no official name for {key}")
    out.update({"transformer.decoder." + k: v for k, v in out.items() if k.startswith("bbox_embed.")})
    return out


def save_sam_detr(tmp_path: Path, state: dict, dilation: bool, smca: bool) -> Path:
    """A SAM-DETR training checkpoint with the arguments main.py pickles (those the converter reads)."""
    path = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(nheads=8, dropout=0.1, dilation=dilation, smca=smca, multiscale=False, epochs=50)
    torch.save({"model": state, "epoch": 49, "args": args}, path)
    return path


def _labels(num_classes: int) -> dict:
    return {"id2label": {i: f"thing{i}" for i in range(num_classes)},
            "label2id": {f"thing{i}": i for i in range(num_classes)}}


def _resnet_config(depth: int, out_features: list[str]):
    """A transformers ResNet (random weights) of our depth 18 or 50."""
    from transformers import ResNetConfig
    kind, counts, sizes = {18: ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
                           50: ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048])}[depth]
    return ResNetConfig(depths=counts, layer_type=kind, hidden_sizes=sizes, out_features=out_features)


def _saved(model, directory: Path):
    from hf_parity import perturb
    perturb(model)
    model.save_pretrained(directory)
    return model


def hf_deformable_detr(directory: Path, depth: int, two_stage: bool, box_refine: bool, layers: int, queries: int,
                       num_classes: int = 5):
    """A random transformers Deformable DETR with a transformers ResNet backbone, saved with save_pretrained."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    torch.manual_seed(0)
    backbone = _resnet_config(depth, ["stage2", "stage3", "stage4"])
    config = DeformableDetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
        two_stage=two_stage, with_box_refine=box_refine, encoder_layers=layers, decoder_layers=layers,
        num_queries=queries, two_stage_num_proposals=queries, **_labels(num_classes))
    return _saved(DeformableDetrForObjectDetection(config).eval(), directory)


def hf_conditional_detr(directory: Path, depth: int, layers: int, queries: int, num_classes: int = 5):
    """A random transformers Conditional DETR (ResNet from a ResNetConfig, C5), saved with save_pretrained."""
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection

    torch.manual_seed(0)
    backbone = _resnet_config(depth, ["stage4"])
    config = ConditionalDetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, encoder_layers=layers,
        decoder_layers=layers, num_queries=queries, **_labels(num_classes))
    return _saved(ConditionalDetrForObjectDetection(config).eval(), directory)


def hf_conditional_detr_dc5(directory: Path, layers: int, queries: int, num_classes: int = 5):
    """A random transformers Conditional DETR-DC5 (ResNet-50) without timm, saved as transformers saves
    one with ``dilation=True``: a timm backbone (torchvision names) at ``output_stride`` 16.

    transformers dilates only timm backbones, and timm is not a dependency here, so the model is built
    with transformers' own ResNet and its last stage is dilated in place as timm and torchvision do
    it: the first block keeps stride 1 (3x3 and shortcut), the later blocks' 3x3 convolutions dilate
    by 2. (Against a real timm backbone the converted model matches to 4e-7; see docs/dc5.md.)"""
    from safetensors.torch import load_file, save_file

    from sparsedet.tools.convert.hf_common import BACKBONE_RULES

    model = hf_conditional_detr(directory, 50, layers, queries, num_classes)
    stage = model.model.backbone.model.encoder.stages[3]
    stage.layers[0].layer[1].convolution.stride = (1, 1)
    stage.layers[0].shortcut.convolution.stride = (1, 1)
    for layer in stage.layers[1:]:
        layer.layer[1].convolution.dilation = layer.layer[1].convolution.padding = (2, 2)
    config = json.loads((directory / "config.json").read_text())
    config["dilation"] = True
    config["backbone_config"] = {"model_type": "timm_backbone", "backbone": "resnet50", "features_only": True,
                                 "num_channels": 3, "out_indices": [1, 2, 3, 4], "output_stride": 16,
                                 "use_pretrained_backbone": False}
    (directory / "config.json").write_text(json.dumps(config))
    timm_names = {}
    for key, value in load_file(directory / "model.safetensors").items():
        ours = next((n for n in (rule.apply(key) for rule in BACKBONE_RULES) if n is not None), None)
        timm_names["model.backbone.conv_encoder.model." + ours[len("backbone."):] if ours else key] = value
    save_file(timm_names, directory / "model.safetensors")
    return model


def official_swin(swin: SwinTransformer, prefix: str, torchvision: bool = False) -> dict:
    """Our Swin's state dict under ``prefix`` in the official detection Swin's names, with the
    ``relative_position_index`` buffers it saves, or in torchvision's (``features.{k}``, the index
    flattened), as Salience DETR saves its Swin."""
    out = {}
    for key, value in swin.state_dict().items():
        out[prefix + (_torchvision_swin_name(key) if torchvision else key)] = value.clone()
        if key.endswith("relative_position_bias_table"):
            index = relative_position_index(swin.window)
            at = key.replace("relative_position_bias_table", "relative_position_index")
            if torchvision:
                at, index = _torchvision_swin_name(at), index.flatten()
            out[prefix + at] = index
    return out


def _torchvision_swin_name(key: str) -> str:
    """torchvision's name of one of our Swin keys: features.0 = (conv, permute, norm), stage i's blocks
    at features.{2i+1} (MLP as a Sequential: fc1 = 0, fc2 = 3), its patch merging at features.{2i+2}."""
    parts = key.split(".")
    if parts[0] == "patch_embed":
        return f"features.0.{ {'proj': 0, 'norm': 2}[parts[1]]}.{parts[2]}"
    stage, rest = int(parts[1]), ".".join(parts[3:])
    if parts[2] == "downsample":
        return f"features.{2 * stage + 2}.{rest}"
    return f"features.{2 * stage + 1}.{rest.replace('mlp.fc1', 'mlp.0').replace('mlp.fc2', 'mlp.3')}"


def fixture_resnet(name: str) -> dict:
    """A torchvision ResNet-50 (random weights) under the names the source's checkpoints give it."""
    if name in ("sam_detr", "sam_detr_smca"):  # single scale: C5 only
        return {f"backbone.0.body.{k}": v for k, v in ResNet(50, return_layers=[4]).state_dict().items()}
    r50 = ResNet(50).state_dict()
    if name == "focus_detr":  # detectron2 ResNet names
        return {f"backbone.{k}": v for k, v in detectron2_names(r50).items()}
    return {f"{'backbone.' if name == 'salience_detr' else 'backbone.0.body.'}{k}": v for k, v in r50.items()}


def official_fixture_file(name: str, official, shared_dir: Path, tmp_path: Path, backbone: dict | None = None):
    """The fixture's official state dict with a backbone (the fixture leaves it out) saved in the
    source's released container: (path, inputs, expected outputs, manifest). backbone: the file's
    backbone keys, with any fixture keys to replace (the input projections of other channels); a
    ResNet-50 when None."""
    state, inputs, expected, manifest = official(name)
    state.update(fixture_resnet(name) if backbone is None else backbone)
    if name == "dino":
        path, packed = tmp_path / "checkpoint0011_4scale.pth", {"model": state, "epoch": 11}
    elif name == "sparse_detr":
        c = manifest["config"]
        args = argparse.Namespace(rho=c["rho"], num_queries=c["num_queries"], nheads=c["nheads"], dropout=c["dropout"])
        path, packed = tmp_path / "sparse_detr_r50_30.pth", {"model": state, "epoch": 49, "args": args}
    elif name == "focus_detr":  # a detectron2 checkpoint
        path, packed = tmp_path / "focus_detr_r50_4scale_12ep.pth", {"model": state, "iteration": 89999}
    elif name == "salience_detr":  # a flat state dict, with buffers and the class names the trainer adds
        from safetensors.torch import load_file
        state.update(load_file(str(shared_dir / "fixtures" / "official" / "salience_detr" / "buffers.safetensors")))
        # The trainer stores the training set's names per category id as character codes, -1 after each.
        names = [dict(COCO_CATEGORIES).get(i, "none") for i in range(91)]
        state["_classes_"] = torch.tensor([c for n in names for c in [*map(ord, n), -1]])
        path, packed = tmp_path / "salience_detr_resnet50_800_1333_coco_1x.pth", state
    elif name in ("sam_detr", "sam_detr_smca"):
        path, packed = tmp_path / "checkpoint.pth", {"model": state, "epoch": 49}
    else:
        raise ValueError(name)
    torch.save(packed, path)
    return path, inputs, expected, manifest
