"""Third-party kinds (encoders, decoders, base detectors, backbones, presets, dataset formats,
runtimes) from installed packages.

A package declares an entry point in the group ``sparsedet.plugins`` whose value is a module; that
module registers its kinds when imported (``register_encoder``, ``register_decoder``,
``register_base``, ``register_backbone``, ``register_preset``, ``register_format``,
``register_runtime``). The modules
are imported once, the first time a name is not found in a table (a run saved with a plugin's
encoder then loads in ``eval``, ``predict``, ``serve`` and ``export`` with nothing imported by
hand) and when the CLI starts (so that ``sparsedet presets`` lists the plugins' presets).
``examples/plugin`` is such a package.
"""
from __future__ import annotations

import warnings
from importlib.metadata import entry_points

GROUP = "sparsedet.plugins"
_loaded: list[str] | None = None


def load_plugins() -> list[str]:
    """Import every installed plugin once; the names of those that loaded. A plugin that fails to
    import is reported as a warning and skipped: the others, and the built-in kinds, still work."""
    global _loaded
    if _loaded is None:
        _loaded = []
        for point in entry_points(group=GROUP):
            try:
                point.load()
                _loaded.append(point.name)
            except Exception as err:  # noqa: BLE001 - any failure of third-party code: name it and go on
                warnings.warn(f"the sparsedet plugin {point.name!r} ({point.value}) failed to load: "
                              f"{type(err).__name__}: {err}")
    return list(_loaded)


def not_found_hint() -> str:
    """What to add to an "unknown kind" error: the plugins that loaded, and how to add one."""
    loaded = load_plugins()
    have = f" (plugins loaded: {', '.join(loaded)})" if loaded else " (no plugin is installed)"
    return (f"; a kind from a third-party package needs that package installed{have}: it declares an entry "
            f"point in the group {GROUP!r}")
