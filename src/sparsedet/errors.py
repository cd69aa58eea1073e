"""User-facing errors: one clear message naming the thing and the fix."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class SparsedetError(Exception):
    """An error the user caused (bad path, bad json, unknown preset...).

    The CLI prints its message without a traceback and exits with status 2.
    """


def close_names(name: str, choices: Iterable[str]) -> list[str]:
    """Up to three of ``choices`` that look like a mistyped ``name`` (for "did you mean")."""
    return difflib.get_close_matches(name, list(choices), n=3)
