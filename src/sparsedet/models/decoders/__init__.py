"""Decoders: deformable.py (Deformable DETR, DINO), conditional.py, sam.py (SAM-DETR, SMCA),
decoupled.py (SD-DETR), each registered by its kind (``register_decoder``); a base detector
(``models/bases.py``) names the one it uses. ``Decoder`` (base.py) is what every decoder is and
declares; ``DecoderOutput`` what every decoder returns."""
from __future__ import annotations

from ...config import ModelConfig
from ...stage_kinds import DECODERS, register_decoder  # noqa: F401 (re-exported)
from .base import Decoder, DecoderOutput  # noqa: F401 (re-exported)
from . import conditional, decoupled, deformable, sam  # noqa: F401 (registers the built-in decoders)


def build_decoder(c: ModelConfig, kind: str) -> Decoder:
    """The decoder of ``kind`` (the one the base of ``c`` names) for ``c``."""
    return DECODERS.build(kind, c, Decoder)
