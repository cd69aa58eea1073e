"""Stopping training cleanly: SIGINT (Ctrl-C) and SIGTERM (batch schedulers, ``kill``, torchrun
passing a signal on) are recorded and acted on at the next step boundary, where the trainer saves a
resumable checkpoint and raises :class:`TrainingInterrupted`."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def resume_command(target: str | Path, distributed: bool = False) -> str:
    """The command that continues a run (``target``: its folder, or one of its checkpoints), as every
    message that tells the user how to go on prints it."""
    launcher = "torchrun ... -m sparsedet" if distributed else "sparsedet"
    return f"{launcher} train --resume {target}"


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training at a step boundary, after a resumable checkpoint of that
    step was saved in ``run_dir/checkpoints``. ``exit_code`` is the shell's 128 + signal number
    (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int, run_dir: str | Path):
        self.signum, self.step, self.run_dir = int(signum), step, Path(run_dir)
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + self.signum
        super().__init__(f"{self.signal_name} at step {step}")


class StopSignals:
    """While active (in the main thread), SIGINT and SIGTERM only record ``signum``, so that training
    stops at the next step boundary; a second signal raises KeyboardInterrupt at once. The previous
    handlers come back on exit."""

    def __init__(self, announce: bool):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:  # os.write: print() is not safe inside a signal handler
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
                        "(signal again to quit without saving)\n".encode())


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of data loaders: workers leave SIGINT/SIGTERM to the training process (a
    terminal's Ctrl-C reaches them too), which stops at a step boundary and then shuts them down."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
