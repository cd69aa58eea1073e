"""A run's records and messages: ``metrics.jsonl``, ``steps.csv``, TensorBoard scalars and lines
for the user."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from tqdm import tqdm

from ..filewrite import atomic_write, guarded

METRICS_LOG = "metrics.jsonl"
STEPS_LOG = "steps.csv"  # every step's lr and loss terms: one row per step after a header


def read_steps(path: Path) -> list[dict]:
    """The rows of a run's steps.csv as {"step": int, column: float}; cells left empty are left out."""
    with open(path, newline="") as f:
        return [{k: int(v) if k == "step" else float(v) for k, v in row.items() if v}
                for row in csv.DictReader(f)]


class RunLog:
    """What process 0 writes about a run in ``out_dir``: one JSON object per logged step and per
    evaluation in ``metrics.jsonl`` (also kept in ``history``), every step's lr and loss terms in
    ``steps.csv`` (:meth:`record_step`), the logged scalars in ``tensorboard/`` (with ``tensorboard``
    and the package installed), and messages (:meth:`say`). Other processes write nothing.
    ``progress``: messages go above a progress bar instead of plain flushed lines."""

    def __init__(self, out_dir: str | Path, is_main: bool, progress: bool, tensorboard: bool):
        self.path = Path(out_dir) / METRICS_LOG
        self.steps_path = Path(out_dir) / STEPS_LOG
        self.is_main, self.progress, self.tensorboard = is_main, progress and is_main, tensorboard
        self.history: list[dict] = []
        self._pending_steps: list[dict] = []  # recorded steps not yet in steps.csv
        self._writer = None
        self._first_step = 1

    def start(self, step: int, resumed: bool) -> None:
        """Begin logging after ``step``: a new run starts a new log; a resumed one drops what was
        logged after its checkpoint (and TensorBoard purges those steps)."""
        self._first_step = step + 1
        if not self.is_main:
            return
        if not resumed:
            self.path.unlink(missing_ok=True)
            self.steps_path.unlink(missing_ok=True)
            return
        if self.path.is_file():
            # A kill or a full disk while appending may leave a last line without its end: it goes.
            lines = [r for r in self.path.read_text().splitlines(keepends=True) if r.endswith("\n")]
            self.history = [r for r in map(json.loads, lines) if r["step"] <= step]
            text = "".join(json.dumps(r) + "\n" for r in self.history)
            atomic_write(self.path, lambda p: Path(p).write_text(text))
        if self.steps_path.is_file():
            # A kill while appending may leave a last line without its end: it goes too.
            rows = [r for r in self.steps_path.read_text().splitlines(keepends=True) if r.endswith("\n")]
            kept = "".join(rows[:1] + [r for r in rows[1:] if int(r.split(",", 1)[0]) <= step])
            atomic_write(self.steps_path, lambda p: Path(p).write_text(kept))

    def record_step(self, values: dict[str, float]) -> None:
        """Keep one step's ``values`` (``step``, ``lr``, loss terms) for steps.csv. They reach the
        file with the next :meth:`write`, :meth:`flush` or :meth:`close`: the step loop writes no file."""
        if self.is_main:
            self._pending_steps.append(values)

    def write(self, record: dict) -> None:
        """Append ``record`` (it has a ``step``) to the log; losses, lr and evaluations go to TensorBoard."""
        if not self.is_main:
            return
        self.flush()
        self.history.append(record)
        with guarded(self.path, f"training log ({METRICS_LOG})"), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            scalars = {k: v for k, v in record.items() if k.startswith("loss") or k == "lr"}
            for prefix in ("eval", "eval_ema"):
                scalars.update({f"{prefix}/{k}": v for k, v in record.get(prefix, {}).items()})
            for k, v in scalars.items():
                writer.add_scalar(k, v, record["step"])

    def say(self, text: str) -> None:
        """A message for the user: above the progress bar, or a plain flushed line (for nohup and
        batch-scheduler logs)."""
        if not self.is_main:
            return
        if self.progress:
            tqdm.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def flush(self) -> None:
        """Append the pending steps to steps.csv; a new file takes its columns from the first of them."""
        if not self._pending_steps:
            return
        new = not self.steps_path.is_file() or self.steps_path.stat().st_size == 0
        if new:
            columns = list(self._pending_steps[0])
        else:
            with open(self.steps_path, newline="") as f:
                columns = next(csv.reader(f))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, restval="", extrasaction="ignore", lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerows({k: v if k == "step" else f"{v:.6g}" for k, v in row.items()} for row in self._pending_steps)
        with guarded(self.steps_path, f"training log ({STEPS_LOG})"), open(self.steps_path, "a", newline="") as f:
            f.write(text.getvalue())
        self._pending_steps = []

    def _tensorboard(self):
        if self._writer is None and self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the [tensorboard] extra is not installed
                self.tensorboard = False
                return None
            self._writer = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=self._first_step)
        return self._writer
