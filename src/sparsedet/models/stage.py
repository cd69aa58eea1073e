"""What an encoder and a decoder both declare, read as class attributes where the kind registers
(``stage_kinds``), never probed: the config fields it reads, whether it works on one feature level,
its check and how it is built."""
from __future__ import annotations

from torch import nn

from ..config import ModelConfig


class Stage(nn.Module):
    """config_fields: the fields of its config section it reads (overrides of the others are
    refused); single_level: it attends over one feature level (the model then has one level, no
    level embedding, and both its encoder and its decoder are single-level); check: refuses a
    model config it cannot be built into; from_config: builds it."""

    config_fields: tuple[str, ...] = ()
    single_level = False

    @classmethod
    def check(cls, c: ModelConfig) -> None:
        """Nothing beyond the shared chain is needed by default."""

    @classmethod
    def from_config(cls, c: ModelConfig) -> "Stage":
        return cls(c)
