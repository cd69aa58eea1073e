"""How modules declare their initialisation to the transformer-wide pass that the official
transformers run after building (``DetectionTransformer``): every matrix of the encoder, decoder
and queries is xavier-initialised, except in modules that keep the init they were built with
(``keep_own_init``); then modules that re-apply their own init (``reinit_after_xavier = True``
and a ``reset_parameters``) do so, in module order."""
from __future__ import annotations

from torch import nn


def keep_own_init(*modules: nn.Module | None) -> None:
    """The transformer-wide xavier pass leaves these modules' parameters as they are."""
    for module in modules:
        if module is not None:
            module.keeps_own_init = True


def transformer_init(root: nn.Module, parts: list[nn.Module]) -> None:
    """Xavier-initialise every matrix of ``parts`` outside the modules that keep their own init,
    then call ``reset_parameters`` on every module of ``root`` that re-applies its init."""
    own = {id(p) for m in root.modules() if getattr(m, "keeps_own_init", False) for p in m.parameters()}
    for part in parts:
        for p in part.parameters():
            if p.dim() > 1 and id(p) not in own:
                nn.init.xavier_uniform_(p)
    for m in root.modules():
        if getattr(m, "reinit_after_xavier", False):
            m.reset_parameters()
