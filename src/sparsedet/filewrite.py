"""Writing files so that a failed write loses nothing and says so.

Every file sparsedet writes goes through :func:`atomic_write` (a temporary file beside it, renamed
when complete) or ``engine.checkpoint``'s temporary folder; both run inside :func:`guarded`, which
turns a failed write into :class:`WriteFailed`: one line naming what was being written, where, why,
and the free space left on that file system. The temporary file or folder is removed first.

What counts as a failed write (and nothing else, so that bugs keep their tracebacks):

- an ``OSError`` whose errno is one of ``WRITE_ERRNOS`` (disk full, quota, read-only file system,
  I/O error, file too large, permission denied);
- any other exception raised while writing whose message carries one of ``WRITE_MARKERS``:
  torch.save raises ``RuntimeError`` ("basic_ios::clear: iostream error", "[enforce fail at
  inline_container.cc] unexpected pos", "PytorchStreamWriter failed writing file") and safetensors
  its ``SafetensorError`` ("No space left on device (os error 28)"), with the OS error's text
  buried inside or lost;
- any ``RuntimeError`` raised while writing when the file system now has less free space than the
  write was known to need (``needed``): the writers' messages change between versions, the
  arithmetic does not.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from .errors import SparsedetError

SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
WRITE_ERRNOS = SPACE_ERRNOS | {errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}
WRITE_MARKERS = tuple(os.strerror(e) for e in sorted(WRITE_ERRNOS)) + (
    "iostream error", "unexpected pos", "PytorchStreamWriter failed", "file write failed")


class WriteFailed(SparsedetError):
    """Writing ``what`` to ``path`` failed (``reason``) with ``free`` bytes left on its file system.
    ``advice`` (what to run next) ends the message; :meth:`relabel` and :meth:`advise` return
    copies with the outer writer's label or the caller's advice."""

    def __init__(self, what: str, path: str | Path, reason: str, free: int | None, out_of_space: bool,
                 needed: int | None = None, advice: str = ""):
        self.what, self.path, self.reason, self.free = what, Path(path), reason, free
        self.out_of_space, self.needed, self.advice = out_of_space, needed, advice
        room = "free space unknown" if free is None else f"{human_bytes(free)} free on that file system"
        if needed:
            room += f", about {human_bytes(needed)} needed"
        fix = "free some space or write elsewhere" if out_of_space else "check the disk and the folder's permissions"
        then = advice or "Then run the command again."
        super().__init__(f"could not write the {what} to {self.path}: {reason} ({room}); {fix}. {then}")

    def relabel(self, what: str, path: str | Path, needed: int | None) -> WriteFailed:
        return WriteFailed(what, path, self.reason, self.free, self.out_of_space, needed or self.needed, self.advice)

    def advise(self, advice: str) -> WriteFailed:
        return WriteFailed(self.what, self.path, self.reason, self.free, self.out_of_space, self.needed, advice)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # the loop always returns


def free_bytes(path: str | Path) -> int | None:
    """Free bytes (for an unprivileged user) on the file system that holds ``path`` or would."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            if folder.exists():
                return shutil.disk_usage(folder).free
    return None


def _diagnose(err: BaseException, free: int | None, needed: int | None) -> tuple[str, bool] | None:
    """(reason, out of space) when ``err`` is a failed write (see the module docstring), else None."""
    if isinstance(err, OSError):
        if err.errno in WRITE_ERRNOS:
            return err.strerror or os.strerror(err.errno), err.errno in SPACE_ERRNOS
        return None
    text = str(err)
    for e in sorted(WRITE_ERRNOS):
        if os.strerror(e) in text:
            return os.strerror(e), e in SPACE_ERRNOS
    short = (text.strip().splitlines() or [type(err).__name__])[0][:160]
    if any(marker in text for marker in WRITE_MARKERS):
        low = free is not None and (free < (needed or 0) or free < 1024 * 1024)
        return f"the writer failed ({short})", low
    if isinstance(err, RuntimeError) and free is not None and needed and free < needed:
        return f"the writer failed with the disk nearly full ({short})", True
    return None


class guarded:
    """``with guarded(path, what, needed):`` raises :class:`WriteFailed` (naming ``what``, ``path``
    and the free space) for a failed write inside; a WriteFailed from an inner writer takes this,
    the outer, label. Other errors pass. A class, not a generator: its ``__exit__`` must drop the
    failed write's traceback (see `_release`), which contextlib's would keep."""

    def __init__(self, path: str | Path, what: str, needed: int | None = None):
        self.path, self.what, self.needed = Path(path), what, needed

    def __enter__(self) -> guarded:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        del tb  # the failed writer's frames: see _release
        if isinstance(err, WriteFailed):
            raise err.relabel(self.what, self.path, self.needed) from err.__cause__
        found = _diagnose(err, free_bytes(self.path), self.needed) if isinstance(err, Exception) else None
        if found is None:
            return False  # no error, or not a failed write: it goes on as it was
        _release(err)
        free = free_bytes(self.path)  # now that the partial file's space is back: what the user has
        raise WriteFailed(self.what, self.path, found[0], free, found[1], self.needed) from err


def _release(err: BaseException) -> None:
    """Drop the frames of a failed write: torch.save leaves its file open when a write fails, and
    the space of that (already deleted) temporary file comes back only once the file is closed."""
    seen: BaseException | None = err
    while seen is not None:
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__
    gc.collect()


def fresh_path(folder: Path, prefix: str, create: Callable[[Path], None]) -> Path:
    """A new, unused ``folder/prefix*.tmp`` made by ``create(path)`` (which fails if it exists).
    Unlike ``tempfile``, which makes files 0600 and folders 0700, the permissions follow the umask."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(4)}.tmp"
        try:
            create(path)
            return path
        except FileExistsError:
            continue


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def atomic_write(path: str | Path, write: Callable[[str], object], what: str | None = None,
                 needed: int | None = None) -> None:
    """``write(tmp)`` a temporary file in the same folder, then rename it to ``path``: a crash never
    leaves a half-written file in place of the previous one, and a failed write (WriteFailed, naming
    ``what``, default the file's name) leaves no temporary file. The mode honours the umask."""
    path = Path(path)
    with guarded(path, what or path.name, needed):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(fresh_path(path.parent, f".{path.name}.", _create_file))
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0666 less the umask, as the kernel made it
        try:
            write(tmp)
            with contextlib.suppress(OSError):  # some writers (safetensors) make their file 0600
                os.chmod(tmp, mode)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
