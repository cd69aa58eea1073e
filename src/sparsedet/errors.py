"""User-facing errors: one clear message naming the thing and the fix."""


class SparsedetError(Exception):
    """An error the user caused (bad path, bad json, unknown preset...).

    The CLI prints its message without a traceback and exits with status 2.
    """
