"""ImageNet backbone weights by name for ``model.backbone.weights``, through the download cache.

ResNet: ``imagenet`` (torchvision's file for the configured depth, checked against the SHA-256
prefix in its name) or ``imagenet-detectron2`` (detectron2's conversion of torchvision's ResNet-50).
Swin: ``imagenet`` (ImageNet-1k) or ``imagenet-22k``, the official release's file for the
variant and window (224-px files have window 7, 384-px ones window 12)."""
from __future__ import annotations

import re

from ..config import BackboneConfig
from ..errors import SparsedetError
from .download import fetch

TORCHVISION_URL = "https://download.pytorch.org/models/"
TORCHVISION_FILES = {18: "resnet18-f37072fd.pth", 34: "resnet34-b627a593.pth", 50: "resnet50-0676ba61.pth",
                     101: "resnet101-63fe2227.pth"}
DETECTRON2_R50_URL = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/torchvision/R-50.pkl"
NAMES = ("imagenet", "imagenet-detectron2")
# microsoft/Swin-Transformer's release files (MODELHUB.md): (variant, window, name) -> release/file.
SWIN_URL = "https://github.com/SwinTransformer/storage/releases/download/"
SWIN_FILES = {
    ("T", 7, "imagenet"): "v1.0.0/swin_tiny_patch4_window7_224.pth",
    ("T", 7, "imagenet-22k"): "v1.0.8/swin_tiny_patch4_window7_224_22k.pth",
    ("S", 7, "imagenet"): "v1.0.0/swin_small_patch4_window7_224.pth",
    ("S", 7, "imagenet-22k"): "v1.0.8/swin_small_patch4_window7_224_22k.pth",
    ("B", 7, "imagenet"): "v1.0.0/swin_base_patch4_window7_224.pth",
    ("B", 7, "imagenet-22k"): "v1.0.0/swin_base_patch4_window7_224_22k.pth",
    ("B", 12, "imagenet"): "v1.0.0/swin_base_patch4_window12_384.pth",
    ("B", 12, "imagenet-22k"): "v1.0.0/swin_base_patch4_window12_384_22k.pth",
    ("L", 7, "imagenet-22k"): "v1.0.0/swin_large_patch4_window7_224_22k.pth",
    ("L", 12, "imagenet-22k"): "v1.0.0/swin_large_patch4_window12_384_22k.pth",
}


def backbone_file(b: BackboneConfig) -> str:
    """A local file for ``b.weights`` (a path as it is, a name as its cached download)."""
    if b.kind == "swin":
        return swin_weights_path(b.weights, b.variant, b.window_size, b.embed_dim)
    return backbone_weights_path(b.weights, b.depth, b.width)


def swin_weights_path(weights: str, variant: str, window: int, embed_dim: int = 0) -> str:
    """The official Swin file that ``weights`` (imagenet / imagenet-22k) names for this variant and
    window, downloaded once; a path as it is."""
    if weights not in ("imagenet", "imagenet-22k"):
        return weights
    if embed_dim:
        raise SparsedetError(f"model.backbone.weights={weights} is a standard Swin-{variant}; this one has "
                             f"embed_dim {embed_dim}: pass a file of that width as model.backbone.weights=PATH")
    key = (variant, window, weights)
    if key not in SWIN_FILES:
        known = ", ".join(f"Swin-{v} window {w}: {n}" for v, w, n in SWIN_FILES)
        raise SparsedetError(f"the official Swin release has no {weights} file for Swin-{variant} with window "
                             f"{window} (known: {known}); pass a file as model.backbone.weights=PATH (another "
                             "window's bias tables are resized)")
    release_file = SWIN_FILES[key]
    file = release_file.split("/")[-1]
    return str(fetch(file, SWIN_URL + release_file, fix=_fix(file)))


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
