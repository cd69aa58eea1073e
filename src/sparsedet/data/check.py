"""Dataset checks behind ``sparsedet check-data``: list every problem instead of stopping at the
first. Each format checks its own data (``DatasetFormat.check``: ``coco.py``, ``yolo.py``);
``check_dataset`` asks the format that claims a path, and ``format_report`` prints what it found."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from .coco_json import size_mismatch
from .formats import DataReport, Problem, check_dataset  # noqa: F401 (re-exported: their former home)

# A kind of problem met more often than this prints one summary line and this many examples.
EXAMPLES = 5


def image_problem(path: Path, width: object = None, height: object = None) -> tuple[str, str] | None:
    """Why the file cannot serve as this image entry (unreadable, or not ``width`` x ``height`` when
    they are given), as (kind, message), or None if it is fine."""
    if not path.is_file():
        return "image files not found", f"file {path} not found"
    try:
        with Image.open(path) as img:
            img.verify()  # the file structure (PNG checksums); it checks nothing in a JPEG
        with Image.open(path) as img:
            size = img.size
            img.load()  # decodes every pixel: a truncated JPEG fails here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return "unreadable images", f"cannot read {path} ({err})"
    mismatch = None if width is None and height is None else size_mismatch(path, width, height, size)
    return ("json sizes that differ from their image file", mismatch) if mismatch else None


def format_report(report: DataReport, limit: int = 100) -> str:
    """Errors first: a problem of its own kind is one line, a kind met several times one summary line
    and at most ``EXAMPLES`` examples (at most ``limit`` of these groups); then what the dataset
    holds and the counts of errors and warnings."""
    groups: dict[tuple[str, object], list[Problem]] = {}
    for p in sorted(report.problems, key=lambda p: p.severity != "error"):
        groups.setdefault((p.severity, p.kind or id(p)), []).append(p)
    lines = []
    for (severity, _), group in list(groups.items())[:limit]:
        if len(group) == 1:
            lines.append(f"{severity}: {group[0].message}")
            continue
        lines.append(f"{severity}: {len(group)} {group[0].kind}, e.g.")
        lines += [f"  {p.message}" for p in group[:EXAMPLES]]
        if len(group) > EXAMPLES:
            lines.append(f"  ... and {len(group) - EXAMPLES} more")
    if len(groups) > limit:
        lines.append(f"... and {len(groups) - limit} more kinds of problem")
    errors = sum(p.severity == "error" for p in report.problems)
    lines.append(f"{report.counts}; {errors} error(s), {len(report.problems) - errors} warning(s)")
    return "\n".join(lines)
