"""Reading JSON files: one clear error (naming the file, what is wrong and the fix) per way a file
can be wrong. Every JSON file sparsedet reads goes through here: COCO annotations, results,
run and Hugging Face configs, metrics."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import SparsedetError


def read_json(path: str | Path, what: str) -> object:
    """The parsed content of the JSON file ``path`` (UTF-8, -16 or -32, with or without BOM).

    what: the file's role, for error messages ("COCO annotation", "results", ...).
    """
    path = Path(path)
    if not path.is_file():
        raise SparsedetError(f"{what} file {path} not found; check the path")
    try:
        return json.loads(path.read_bytes())  # bytes: json detects the encoding and skips a BOM
    except OSError as err:
        raise SparsedetError(f"could not read {what} file {path} ({err.strerror}); check its permissions") from None
    except json.JSONDecodeError as err:
        raise SparsedetError(f"{what} file {path} is not valid JSON: {err.msg} at line {err.lineno}, column "
                             f"{err.colno}; fix the file there or export it again") from None
    except UnicodeDecodeError as err:
        raise SparsedetError(f"{what} file {path} is not valid JSON text ({err.reason} at byte {err.start}); "
                             "save it as UTF-8") from None


def read_json_object(path: str | Path, what: str) -> dict:
    """Like :func:`read_json`, for files that must hold a JSON object (configs, metrics)."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise SparsedetError(f"{what} file {path} must hold a JSON object, got a JSON {type(data).__name__}")
    return data
