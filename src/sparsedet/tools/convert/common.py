"""Helpers shared by the checkpoint converters.

A converter reads a foreign checkpoint without unpickling arbitrary objects, folds
duplicate (aliased) keys after checking they hold equal tensors, renames every key
by an ordered table of regular expressions and reads the architecture sizes from the
renamed tensors. ``convert`` then compares the keys with the ``state_dict()`` of the
model those sizes build: keys no rule claimed, keys missing and keys foreign to
it are reported in ONE ``SparsedetError`` that names the file (``check_layout``).
"""
from __future__ import annotations

import argparse
import io
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ...errors import SparsedetError
from ...jsonfile import read_json_object
from ...nn.backbone import BLOCKS
from .keys import layer_count  # re-exported: the converters import it from here
from .swin import is_swin, swin_overrides

SHOW = 10  # how many offending keys an error message lists
WB = r"(weight|bias)"  # the parameters of a linear or norm layer, as a regular-expression group

# Objects that official training scripts pickle next to the weights (e.g. ``args``).
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read tensors from ``.safetensors`` or a torch pickle (``.bin``/``.pth``/``.pt``).

    Pickles are loaded with ``weights_only=True`` (plus ``argparse.Namespace``), so no
    arbitrary code runs. A training checkpoint ``{"model": state_dict, ...}`` (or
    ``"state_dict"``) is unwrapped to its state dict.
    """
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Like ``read_state_dict``, also returning the training arguments a checkpoint pickled next to
    the weights (``args``, an ``argparse.Namespace``) as a dict (empty when there are none)."""
    path = Path(path)
    if not path.is_file():
        raise SparsedetError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path)), {}
        except (SafetensorError, OSError) as e:
            raise SparsedetError(f"could not read {path} as safetensors: {e}") from None
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            data = torch.load(_released_file(path), map_location="cpu", weights_only=True)
    except SparsedetError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a file we refuse to read
        reason = str(e).split(". ")[0].strip()  # torch appends paragraphs of advice
        raise SparsedetError(f"could not read {path} as a weights-only torch file ({reason}); a truncated or "
                             "corrupt download fails here, as does a file that pickles code") from None
    args = {}
    if isinstance(data, dict):
        if isinstance(data.get("args"), argparse.Namespace):
            args = vars(data["args"])
        for wrapper in ("model", "state_dict"):
            if isinstance(data.get(wrapper), dict):
                data = data[wrapper]
                break
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise SparsedetError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(data), args


def _released_file(path: Path) -> Path | io.BytesIO:
    """``path``, or the one checkpoint inside it when it is a .zip archive of one (as some authors
    release: Focus-DETR). A torch file is itself a zip archive, recognised by its ``data.pkl``."""
    if not zipfile.is_zipfile(path):
        return path
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if not n.startswith("__MACOSX/")]
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return path
        inner = [n for n in names if n.endswith((".pth", ".pt", ".bin"))]
        if len(inner) != 1:
            raise SparsedetError(f"{path} is a zip archive with {len(inner)} checkpoint files ({', '.join(inner[:5])}); "
                                 "unzip it and pass the checkpoint itself")
        return io.BytesIO(archive.read(inner[0]))


def read_hf_weights(directory: str | Path) -> tuple[dict[str, Tensor], Path]:
    """Read a Hugging Face model directory's weights; returns (state dict, file read).

    Looks for ``model.safetensors``, a sharded ``model.safetensors.index.json``, then
    ``pytorch_model.bin``.
    """
    directory = Path(directory)
    single = directory / "model.safetensors"
    if single.is_file():
        return read_state_dict(single), single
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "weights index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise SparsedetError(f"{index} has no 'weight_map'; re-save the model with save_pretrained")
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_state_dict(directory / shard))
        return state, index
    legacy = directory / "pytorch_model.bin"
    if legacy.is_file():
        return read_state_dict(legacy), legacy
    raise SparsedetError(
        f"no weights in {directory}: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin")


def fold_aliases(state: dict[str, Tensor], aliases: Mapping[str, str], source: str | Path) -> dict[str, Tensor]:
    """Merge duplicated key prefixes into one canonical prefix.

    aliases: {alias_prefix: canonical_prefix}, e.g. ``{"model.decoder.class_embed.": "class_embed."}``.
    A key present under both prefixes must hold equal tensors (else one error lists the
    differing keys); a key present only under the alias is moved to the canonical name.
    """
    out = dict(state)
    differing = []
    for alias, canonical in aliases.items():
        for key in [k for k in out if k.startswith(alias)]:
            target = canonical + key[len(alias):]
            value = out.pop(key)
            if target not in out:
                out[target] = value
            elif out[target].shape != value.shape or not torch.equal(out[target], value):
                differing.append(f"{key} != {target}")
    if differing:
        raise SparsedetError(
            f"{source}: keys that should be copies of each other differ ({len(differing)}): "
            f"{', '.join(differing[:SHOW])}; the checkpoint is inconsistent")
    return out


Target = str | Callable[[re.Match], str | None]


@dataclass(frozen=True)
class Rule:
    """Rename keys that fully match ``pattern``.

    target: a ``re`` template (``\\1`` refers to groups) or a function of the match that
    returns the new name, or ``None`` when this particular match has no place in our layout
    (the key is then reported as unknown).
    """

    pattern: str
    target: Target
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))

    def apply(self, key: str) -> str | None:
        match = self.regex.fullmatch(key)
        if match is None:
            return None
        return match.expand(self.target) if isinstance(self.target, str) else self.target(match)


class Renamed(dict):
    """A state dict in our names that remembers, for its error messages, the file it was read from
    (``source``), each key's name in that file (``origin``), the file's keys no rule claimed
    (``unknown``) and the converter's hint on what file it expects."""

    def __init__(self, source: str | Path, hint: str = ""):
        super().__init__()
        self.source, self.hint = source, hint
        self.origin: dict[str, str] = {}
        self.unknown: list[str] = []

    def __missing__(self, key: str) -> Tensor:
        # A converter reads a key the file did not give: report the whole layout, not a KeyError.
        raise _layout_error(self, {*self, key})


def rename_keys(state: Mapping[str, Tensor], rules: Iterable[Rule], source: str | Path,
                ignore: Iterable[str] = (), hint: str = "") -> Renamed:
    """Rename every key by the first rule that gives it a name.

    ignore: regular expressions of keys that are dropped on purpose (e.g. ``num_batches_tracked``).
    Keys nobody claimed are kept in ``unknown`` of the result, reported by :func:`check_layout`
    together with what our model misses. Two keys of ``source`` that get the same name (the same
    tensor stored under two spellings) raise one error.
    """
    rules = list(rules)
    ignored = [re.compile(p) for p in ignore]
    out = Renamed(source, hint)
    for key, value in state.items():
        if any(p.fullmatch(key) for p in ignored):
            continue
        new = next((n for n in (r.apply(key) for r in rules) if n is not None), None)
        if new is None:
            out.unknown.append(key)
        elif new in out:
            raise SparsedetError(f"{source}: two keys give our {new!r} (the second is {key!r}); "
                                 "the checkpoint stores one tensor twice under different names")
        else:
            out[new] = value
            out.origin[new] = key
    return out


def deformable_head_rules(num_decoder_layers: int, two_stage: bool) -> list[Rule]:
    """``class_embed.K`` / ``bbox_embed.K`` (Deformable DETR's head lists, after folding copies) -> ours:
    K < L the decoder layers' heads, K = L the two-stage proposal head."""

    def head(kind: str, m: re.Match) -> str | None:
        k, rest = int(m[1]), m[2]
        if k < num_decoder_layers:
            return f"heads.{'class_embed' if kind == 'class' else 'box_embed'}.{k}.{rest}"
        if k == num_decoder_layers and two_stage:
            return f"queries.{'class_head' if kind == 'class' else 'box_head'}.{rest}"
        return None

    return [Rule(r"class_embed\.(\d+)\.((?:weight|bias))", lambda m: head("class", m)),
            Rule(r"bbox_embed\.(\d+)\.(layers\.[0-2]\.(?:weight|bias))", lambda m: head("box", m))]


def check_layout(state: Renamed, expected: Iterable[str]) -> None:
    """Raise one error naming ``state.source`` that lists the file's unknown keys, the ``expected``
    keys (our model's) it lacks and converted keys our model does not have, with the converter's hint."""
    error = _layout_error(state, expected)
    if error is not None:
        raise error


def _layout_error(state: Renamed, expected: Iterable[str]) -> SparsedetError | None:
    produced, expected = set(state), set(expected)
    problems = []
    for label, keys in (("unknown keys in the checkpoint", sorted(state.unknown)),
                        ("keys our model needs but the checkpoint lacks", sorted(expected - produced)),
                        ("converted keys our model does not have", sorted(produced - expected))):
        if keys:
            more = f" (+{len(keys) - SHOW} more)" if len(keys) > SHOW else ""
            problems.append(f"{label} ({len(keys)}): {', '.join(keys[:SHOW])}{more}")
    if not problems:
        return None
    hint = f". {state.hint}" if state.hint else ""
    return SparsedetError(f"{state.source}: cannot convert. " + "; ".join(problems) + hint)


def resnet_depth(state: Mapping[str, Tensor]) -> int:
    """The ResNet depth whose block kind and stage-3 block count fit the converted backbone keys."""
    kind = "bottleneck" if any(k.startswith("backbone.") and ".conv3." in k for k in state) else "basic"
    stage3 = layer_count(state, "backbone.layer3.")
    for depth, (block, counts) in BLOCKS.items():
        if (block, counts[2]) == (kind, stage3):
            return depth
    raise SparsedetError(f"backbone with {stage3} {kind} blocks in layer3 is not a ResNet-18/34/50/101")


def dilation_from_args(args: dict) -> dict:
    """``model.backbone.dilation`` from a checkpoint's pickled training arguments: a DC5 file has
    exactly the keys and shapes of a C5 one, and only ``args.dilation`` tells them apart. Nothing
    when the file has no arguments (then pass ``model.backbone.dilation=true`` for a DC5 model)."""
    return {"model.backbone.dilation": bool(args["dilation"])} if "dilation" in args else {}


def sizes_from_state(state: Renamed, heads: int = 8) -> dict:
    """Config overrides for the architecture sizes a converted (our layout) state dict implies.
    The number of attention heads is not recoverable from shapes (heads x points); every released
    model of these families uses 8."""
    num_classes, hidden = state["heads.class_embed.0.weight"].shape
    # Conditional DETR keeps its decoder FFN in the cross-attention half of the layer.
    cross = "decoder.layers.0.cross.linear1.weight"
    ffn = cross if cross in state else "decoder.layers.0.linear1.weight"
    levels = state["neck.level_embed"].shape[0] if "neck.level_embed" in state else 1
    enc_layers, dec_layers = layer_count(state, "encoder.layers."), layer_count(state, "decoder.layers.")
    sizes = {"model.num_classes": num_classes, "model.hidden_dim": hidden, "model.num_heads": heads,
             "model.ffn_dim": state[ffn].shape[0],
             "model.num_levels": levels,
             "model.num_encoder_layers": enc_layers, "model.num_decoder_layers": dec_layers}
    # Deformable attention: points per head and level.
    for part in ("encoder", "decoder"):
        key = f"{part}.layers.0.{'self_attn' if part == 'encoder' else 'cross_attn'}.attention_weights.weight"
        if key in state:
            sizes[f"model.{part[:3]}_points"] = state[key].shape[0] // (heads * levels)
    for key in ("queries.tgt_embed.weight", "queries.query_embed.weight"):
        if key in state:
            sizes["model.num_queries"] = state[key].shape[0]
    if any(k.startswith("backbone.") for k in state):
        sizes.update(backbone_sizes(state))
    return sizes


def backbone_sizes(state: Renamed) -> dict:
    """``model.backbone`` overrides for the converted backbone keys: a Swin's (kind, variant, window,
    stages, norms) or a ResNet's depth."""
    return swin_overrides(state, state.source) if is_swin(state) else {"model.backbone.depth": resnet_depth(state)}
