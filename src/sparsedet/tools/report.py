"""What a run holds when training ends, as a YOLO user expects it (``sparsedet train`` adds
:class:`RunReport` to the trainer's hooks): ``results.csv``, the training curves, and validation
predictions drawn beside their ground truth."""
from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine.hooks import Hook
from ..errors import SparsedetError
from ..filewrite import WriteFailed, atomic_write
from .demo import prediction_pairs
from .plots import plot_training

if TYPE_CHECKING:
    from ..engine.trainer import Trainer

RESULTS = "results.csv"
VAL_PREDICTIONS = "val_predictions.png"
VAL_IMAGES = 8  # drawn in val_predictions.png: 4 pairs per row, 2 rows


def results_rows(records: list[dict]) -> list[dict]:
    """One row per step that was logged or evaluated, from a run's ``metrics.jsonl`` records: the
    log line's numbers (epoch, time, lr, losses) and the evaluation's (AP, AP50, ...; the EMA's
    prefixed ``ema_``), in step order."""
    rows: dict[int, dict] = {}
    for record in records:
        row = rows.setdefault(record["step"], {})
        for key, value in record.items():
            if key in ("eval", "eval_ema"):
                prefix = "ema_" if key == "eval_ema" else ""
                row.update({prefix + k: v for k, v in value.items() if isinstance(v, (int, float))})
            elif isinstance(value, (int, float)):
                row[key] = value
    return [rows[step] for step in sorted(rows)]


def write_results_csv(records: list[dict], path: Path) -> Path:
    """``results_rows(records)`` as CSV, the columns in the order they first appear (a cell is
    empty where its row has no such number)."""
    rows = results_rows(records)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    atomic_write(path, lambda p: Path(p).write_text(text.getvalue()))
    return path


class RunReport(Hook):
    """At the end of training (not after a signal or an error), process 0 writes into the run:
    results.csv, loss.png, lr.png and ap.png (`plots.plot_training`; without matplotlib, the
    ``[viz]`` extra, a line says how to get them) and, with a val set, val_predictions.png (the
    first ``VAL_IMAGES`` val images, ground truth left, predictions right, at the threshold the demo
    picks). A picture that cannot be drawn, or a file that cannot be written (a full disk), costs a
    message, never the run: its weights are complete by then."""

    def after_train(self, trainer: Trainer) -> None:
        if trainer.stop_signal is not None or not trainer.ctx.is_main:
            return
        try:
            self.write(trainer)
        except WriteFailed as err:
            warnings.warn(f"the run in {trainer.out_dir} is complete, but its report is not: {err}")

    def write(self, trainer: Trainer) -> None:
        out, say = trainer.out_dir, trainer.log.say
        written = [write_results_csv(trainer.log.history, out / RESULTS)]
        try:
            written += plot_training(out)
        except SparsedetError as err:
            if isinstance(err, WriteFailed):
                raise
            say(f"no loss/lr/AP plots: {err}")
        if trainer.val_set is not None:
            try:
                picture, threshold, _ = prediction_pairs(trainer.model, trainer.val_set.coco,
                                                         trainer.val_set.images_root, VAL_IMAGES)
                atomic_write(out / VAL_PREDICTIONS, lambda p: picture.save(p, format="PNG"))
                written.append(out / VAL_PREDICTIONS)
                say(f"{VAL_PREDICTIONS}: val images with their ground truth (left) and the predictions scored "
                    f"above {threshold:g} (right)")
            except WriteFailed:
                raise
            except SparsedetError as err:
                warnings.warn(f"no {VAL_PREDICTIONS}: {err}")
        say(f"wrote {', '.join(p.name for p in written)} in {out}")
