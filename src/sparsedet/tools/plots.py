"""Figures from evaluations and training logs, drawn with matplotlib (the ``[viz]`` extra).

* `write_eval_plots`: precision-recall curves (per class and over all classes) and a confusion
  matrix, written beside an evaluation's ``metrics.json`` (``sparsedet eval --plots``).
* `plot_training`: loss terms, learning rate and AP over steps from a run's ``steps.csv`` (every
  step) and ``metrics.jsonl`` (``sparsedet plot RUN``), without TensorBoard.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..engine.confusion import confusion_from_coco
from ..engine.evaluator import PrecisionRecall, precision_recall
from ..engine.runlog import METRICS_LOG, STEPS_LOG, read_steps
from ..errors import SparsedetError
from ..filewrite import atomic_write

LEGEND_LIMIT = 20  # more classes than this: per-class lines without a legend (it would hide the plot)
_TERM = re.compile(r"^(loss_[a-z]+)((?:_(?:\d+|enc|dn))*)$")  # loss_cls_dn_0 -> (loss_cls, _dn_0)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or the error that says how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SparsedetError("plotting needs matplotlib: pip install 'sparsedet[viz]'") from None
    return plt


def save_figure(fig, path: str | Path, fit: bool = False) -> Path:
    """Lay out, write (creating the folder) and close ``fig``; ``fit``: the picture's size follows what
    was drawn, so that no text is cut (else it is the figure's size)."""
    plt = pyplot()
    path = Path(path)
    try:
        fig.tight_layout()
        # Through a temporary file (its suffix is .tmp, hence the format): a full disk leaves no torn
        # picture and says so (filewrite.WriteFailed).
        atomic_write(path, lambda p: fig.savefig(p, format=path.suffix.lstrip(".") or "png",
                                                 bbox_inches="tight" if fit else None))
    finally:
        plt.close(fig)
    return path


def plot_pr_curves(pr: PrecisionRecall, path: Path, iou: float | None = None) -> Path:
    """One figure: a thin line per class with ground truth and a bold line for their mean, at IoU
    ``iou`` or averaged over 0.50:0.95 (None); the legend gives each curve's area (its AP)."""
    plt = pyplot()
    per_class, overall = pr.curves(iou)
    setting = "IoU 0.50:0.95 (precision averaged over the 10 thresholds)" if iou is None else f"IoU {iou:.2f}"
    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    defined = [k for k in range(len(pr.classes)) if not np.isnan(per_class[k]).any()]
    labelled = len(defined) <= LEGEND_LIMIT
    for k in defined:
        ax.plot(pr.recall, per_class[k], linewidth=0.8, alpha=0.7,
                label=f"{pr.classes[k]} {per_class[k].mean():.3f}" if labelled else None)
    if defined:
        ax.plot(pr.recall, overall, color="black", linewidth=2.2, label=f"all classes {overall.mean():.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"Precision-recall, {setting}\narea all, 100 detections per image; legend: AP")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    if defined:
        ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, score_threshold: float,
                   iou_threshold: float = 0.5) -> Path:
    """The matrix of `engine.confusion` (rows predicted, columns true, last = background): colour is
    each column's share (of a true class; the background column: of all false positives), the number
    is the count (written when there are at most 30 classes)."""
    plt = pyplot()
    names = [*classes, "background"]
    totals = matrix.sum(axis=0, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    # Long class names take room from the matrix: the figure grows with them (0.07 in per character).
    side = min(4 + 0.45 * len(names) + 0.07 * max(map(len, names)), 40)
    fig, ax = plt.subplots(figsize=(side, side * 0.9), dpi=100)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the column (true class)")
    if len(classes) <= 30:
        for (p, t), count in np.ndenumerate(matrix):
            if count:
                ax.text(t, p, str(count), ha="center", va="center", fontsize=8,
                        color="white" if share[p, t] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set(xlabel="true", ylabel="predicted")
    # Short lines: the title is centred over the matrix, not the figure; fit keeps what still overhangs.
    ax.set_title(f"Confusion matrix, score >= {score_threshold:.2f}, IoU >= {iou_threshold:.2f}\n"
                 "background column: false positives\nbackground row: missed objects", fontsize=9)
    return save_figure(fig, path, fit=True)


def write_eval_plots(gt: dict, detections: list[dict], out: Path, score_threshold: float = 0.5) -> list[Path]:
    """Write pr_curve.png (IoU 0.50:0.95), pr_curve_iou50.png, confusion_matrix.png and
    confusion_matrix.json (the counts) into ``out`` for COCO-results ``detections`` against the
    COCO dict ``gt``. Returns the paths written."""
    pyplot()  # fail before any work when matplotlib is missing
    pr = precision_recall(gt, detections)
    matrix, classes = confusion_from_coco(gt, detections, score_threshold)
    out.mkdir(parents=True, exist_ok=True)
    counts = out / "confusion_matrix.json"
    payload = json.dumps({"rows": "predicted", "columns": "true", "classes": [*classes, "background"],
                          "score_threshold": score_threshold, "iou_threshold": 0.5, "matrix": matrix.tolist()},
                         indent=1)
    atomic_write(counts, lambda p: Path(p).write_text(payload))
    return [plot_pr_curves(pr, out / "pr_curve.png"), plot_pr_curves(pr, out / "pr_curve_iou50.png", 0.5),
            plot_confusion(matrix, classes, out / "confusion_matrix.png", score_threshold), counts]


def read_training_log(path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (one JSON object per line)."""
    if not path.is_file():
        raise SparsedetError(f"{path} not found; `sparsedet plot` takes a run folder written by `sparsedet train`")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SparsedetError(f"{path} line {number} is not valid JSON ({err.msg}); fix or delete the line"
                                 ) from None
        if not isinstance(record, dict) or "step" not in record:
            raise SparsedetError(f"{path} line {number} is not a training record (an object with a \"step\")")
        records.append(record)
    return records


def loss_groups(keys: list[str]) -> dict[str, list[str]]:
    """Loss terms grouped by their base name, suffixes (``_0``, ``_enc``, ``_dn``, ``_dn_0``) in
    the group: {"loss": ["loss"], "loss_cls": ["loss_cls", "loss_cls_0", ...], ...}."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        match = _TERM.match(key)
        groups.setdefault(match.group(1) if match else key, []).append(key)
    return groups


def plot_training(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw a run into ``out`` (default ``run_dir``): loss.png (the total and one panel per term over
    steps: the last decoder layer solid, the encoder and denoising parts dashed, earlier decoder
    layers thin grey) and lr.png from every step's value in ``steps.csv`` (the ``metrics.jsonl`` log
    lines of runs without it), and, when the run was evaluated, ap.png (AP, AP50, AP75; EMA dashed).
    Returns the paths written."""
    plt = pyplot()
    run_dir = Path(run_dir)
    records = read_training_log(run_dir / METRICS_LOG)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    if not steps and not evals:
        raise SparsedetError(f"{run_dir / METRICS_LOG} holds no training or evaluation records yet")
    every_step = read_steps(run_dir / STEPS_LOG) if (run_dir / STEPS_LOG).is_file() else []
    # A run resumed from a checkpoint written before steps.csv existed lacks the steps before it.
    if every_step and (not steps or every_step[0]["step"] <= steps[0]["step"]):
        steps = every_step
    out = Path(out) if out is not None else run_dir
    written = []
    if steps:
        keys = list(dict.fromkeys(k for r in steps for k in r if k.startswith("loss")))
        groups = loss_groups(keys)
        columns = min(3, len(groups))
        rows = -(-len(groups) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), dpi=100, squeeze=False)
        for ax, (base, members) in zip(axes.flat, groups.items()):
            earlier = [key for key in members if re.search(r"_\d+$", key)]
            for key in earlier:  # thin grey lines under the others, one legend entry for all of them
                ax.plot(*_series(steps, key), color="grey", linewidth=0.7, alpha=0.5,
                        label="earlier layers" if key == earlier[0] else None)
            for key in members:
                suffix = key[len(base):]
                if key not in earlier:
                    ax.plot(*_series(steps, key), linewidth=1.6, linestyle="--" if suffix else "-",
                            label=suffix.lstrip("_") or "final")
            ax.set(title=base, xlabel="step")
            ax.grid(alpha=0.3)
            if len(members) > 1:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(groups):]:
            ax.axis("off")
        written.append(save_figure(fig, out / "loss.png"))
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot(*_series(steps, "lr"))
        ax.set(title="learning rate", xlabel="step", ylabel="lr")
        ax.grid(alpha=0.3)
        written.append(save_figure(fig, out / "lr.png"))
    if evals:
        fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
        for prefix, style in (("eval", "-"), ("eval_ema", "--")):
            for colour, name in enumerate(("AP", "AP50", "AP75")):
                # -1 is pycocotools' "undefined", not a score: left out of the line.
                x, y = _series([{"step": r["step"], **r.get(prefix, {})} for r in evals
                                if r.get(prefix, {}).get(name, -1) >= 0], name)
                if x:
                    ax.plot(x, y, style, color=f"C{colour}", marker="o", markersize=3,
                            label=f"{name}{' (EMA)' * (prefix == 'eval_ema')}")
        ax.set(title="validation AP", xlabel="step", ylabel="AP")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out / "ap.png"))
    return written


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold ``key`` (logs of other presets may lack a term)."""
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]
