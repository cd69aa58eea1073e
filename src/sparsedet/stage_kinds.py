"""The stage kind tables: ``model.kind`` -> base detector, decoder kind -> class, ``model.encoder.kind``
-> encoder class, ``model.backbone.kind`` -> backbone builder (``register_base``, ``register_decoder``,
``register_encoder``, ``register_backbone`` add one).

The tables sit below ``config`` and ``losses``, which read what a kind declares (the config fields it
reads, the supervision it needs) without importing the models; ``models`` fills them with the
built-in kinds when it is imported (``import sparsedet`` imports it) and re-exports the register
functions where users import them from. Stages say what they give each other and need from each
other in the capability words below, never by naming another stage's kind.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import SparsedetError
from .plugins import not_found_hint

if TYPE_CHECKING:  # (the config's types are above this module: its entries take Any)
    from torch import nn

# What one stage gives another: a base's queries, or its decoder, provide; an encoder needs.
TOKEN_PROJECTION = "token_projection"
MIXED_QUERY_SELECTION = "mixed_query_selection"
DECODER_SAMPLING = "decoder_sampling"
CAPABILITIES = {  # how messages name each
    TOKEN_PROJECTION: "the two-stage token projection and class head",
    MIXED_QUERY_SELECTION: "a class head trained on every class of the selected tokens (DINO's mixed query "
                           "selection), whose scores rank objects",
    DECODER_SAMPLING: "the decoder's sampling locations (deformable cross-attention), in training",
}


class KindTable(dict):
    """kind -> what declares it. ``what`` names the kind in messages; ``declarations``: the
    attributes every entry has (checked once, where it registers, so that readers never probe)."""

    def __init__(self, what: str, declarations: tuple[str, ...], derive: str):
        super().__init__()
        self.what, self.declarations, self.derive = what, declarations, derive

    def add(self, kind: str, entry: Any) -> Any:
        missing = [d for d in self.declarations if not hasattr(entry, d)]
        if missing:
            raise SparsedetError(f"{self.what} {kind!r}: {_name(entry)} does not declare {', '.join(missing)}; "
                                 f"{self.derive}")
        if kind in self and self[kind] is not entry:
            raise SparsedetError(f"{self.what} {kind!r} is already {_name(self[kind])}")
        self[kind] = entry
        return entry

    def find(self, kind: str) -> Any:
        """The entry of ``kind``; a kind not found loads the installed plug-ins, which may add it."""
        if kind not in self:
            hint = not_found_hint()
            if kind not in self:
                raise SparsedetError(f"unknown {self.what} {kind!r}; choose one of {', '.join(self)}{hint}")
        return self[kind]

    def build(self, kind: str, c: Any, base: type) -> Any:
        """The stage of class ``kind`` (a subclass of ``base``) for config ``c``: its check, then its
        ``from_config``."""
        cls = self.find(kind)
        if not issubclass(cls, base):
            raise SparsedetError(f"{self.what} {kind!r} is {cls.__name__}, not a {base.__name__}; {self.derive}")
        cls.check(c)
        return cls.from_config(c)


def _name(entry: Any) -> str:
    return entry.__name__ if isinstance(entry, type) else type(entry).__name__


# Each entry's declarations: models/encoders/base.py (``Encoder``), models/decoders/base.py
# (``Decoder``), models/bases.py (``Base``) and ``BackboneKind`` below say what each means.
ENCODERS: KindTable = KindTable(
    "encoder kind", ("supervision", "config_fields", "needs", "single_level", "check", "from_config"),
    "derive it from sparsedet.models.encoders.Encoder (or one of the built-in encoders)")
DECODERS: KindTable = KindTable(
    "decoder kind", ("config_fields", "provides", "single_level", "check", "from_config"),
    "derive it from sparsedet.models.decoders.Decoder (or one of the built-in decoders)")
BASES: KindTable = KindTable(
    "model kind", ("queries", "decoder", "provides", "provides_with", "check"),
    "declare it as a sparsedet.models.bases.Base")
BACKBONES: KindTable = KindTable(
    "model.backbone.kind", ("build", "config_fields", "check"), "register it with register_backbone")


def register_encoder(kind: str):
    """Class decorator: ``model.encoder.kind=KIND`` builds the decorated ``Encoder`` subclass."""
    return lambda cls: ENCODERS.add(kind, cls)


def register_decoder(kind: str):
    """Class decorator: a base naming decoder ``KIND`` builds the decorated ``Decoder`` subclass."""
    return lambda cls: DECODERS.add(kind, cls)


def register_base(kind: str, base: Any) -> Any:
    """``model.kind=KIND`` builds ``base`` (a ``models.bases.Base``: its queries, decoder and rules)."""
    return BASES.add(kind, base)


def _nothing(b: Any) -> None:
    """No check beyond the shared one (``return_layers``)."""


@dataclass(frozen=True)
class BackboneKind:
    """build: the network for a config; config_fields: the ``model.backbone.*`` fields only this kind
    reads (overrides of them with another kind are refused; ``weights``, ``frozen_stages`` and
    ``return_layers`` every backbone reads); check: refuses a config it cannot be built from."""

    build: Callable[[Any], nn.Module]
    config_fields: tuple[str, ...] = ()
    check: Callable[[Any], None] = _nothing


def register_backbone(kind: str, config_fields: tuple[str, ...] = (),
                      check: Callable[[Any], None] = _nothing):
    """Function decorator: ``model.backbone.kind=KIND`` builds its network with the decorated function."""
    def add(build: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        BACKBONES.add(kind, BackboneKind(build, tuple(config_fields), check))
        return build
    return add


def encoder_class(kind: str) -> type[nn.Module]:
    return ENCODERS.find(kind)
