"""ImageNet ResNet weights by name for ``model.backbone.weights``: ``imagenet`` (torchvision's file
for the configured depth, checked against the SHA-256 prefix in its name) or ``imagenet-detectron2``
(detectron2's conversion of torchvision's ResNet-50). Both go through the download cache."""
from __future__ import annotations

import re

from ..errors import SparsedetError
from .download import fetch

TORCHVISION_URL = "https://download.pytorch.org/models/"
TORCHVISION_FILES = {18: "resnet18-f37072fd.pth", 34: "resnet34-b627a593.pth", 50: "resnet50-0676ba61.pth",
                     101: "resnet101-63fe2227.pth"}
DETECTRON2_R50_URL = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/torchvision/R-50.pkl"
NAMES = ("imagenet", "imagenet-detectron2")


def backbone_weights_path(weights: str, depth: int, width: int) -> str:
    """A local file for ``weights``: a path as it is, a name above as its cached download."""
    if weights not in NAMES:
        return weights
    if width != 64:
        raise SparsedetError(f"model.backbone.weights={weights} is a standard ResNet (width 64); this backbone has "
                             f"width {width}: pass a file of that width as model.backbone.weights=PATH")
    if weights == "imagenet":
        if depth not in TORCHVISION_FILES:
            raise SparsedetError(f"torchvision has no ImageNet ResNet-{depth}; depths: {sorted(TORCHVISION_FILES)}")
        file = TORCHVISION_FILES[depth]
        prefix = re.fullmatch(r"resnet\d+-([0-9a-f]+)\.pth", file).group(1)
        return str(fetch(file, TORCHVISION_URL + file, hash_prefix=prefix, fix=_fix(file)))
    if depth != 50:
        raise SparsedetError(f"imagenet-detectron2 names detectron2's ResNet-50 only; for ResNet-{depth} use "
                             "model.backbone.weights=imagenet (torchvision's file)")
    return str(fetch("R-50.pkl", DETECTRON2_R50_URL, fix=_fix("R-50.pkl")))


def _fix(file: str) -> str:
    return (f"Without network access, copy {file} onto this machine and pass it as "
            f"model.backbone.weights=/path/{file}")
