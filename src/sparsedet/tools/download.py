"""The download cache behind the model zoo and ImageNet backbones by name.

Files land in ``$SPARSEDET_HOME/downloads`` (default ``~/.cache/sparsedet``). A download writes
``FILE.part`` and resumes it with an HTTP Range request after an interruption; the finished file is
renamed into place and its SHA-256 recorded beside it (``FILE.sha256``), then checked on every later
use. ``SPARSEDET_MIRROR=URL`` fetches every file as ``URL/FILE`` instead (Google Drive ones too).
"""
from __future__ import annotations

import glob
import hashlib
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..errors import SparsedetError

TIMEOUT_S = 30
CHUNK = 1 << 20


def cache_root() -> Path:
    """``$SPARSEDET_HOME``, else ``~/.cache/sparsedet``."""
    return Path(os.environ.get("SPARSEDET_HOME") or Path.home() / ".cache" / "sparsedet").expanduser()


def mirror_url(file: str) -> str | None:
    """``$SPARSEDET_MIRROR/FILE`` when a mirror is set."""
    mirror = os.environ.get("SPARSEDET_MIRROR", "").strip()
    return f"{mirror.rstrip('/')}/{urllib.parse.quote(file)}" if mirror else None


def fetch(file: str, url: str = "", drive_id: str = "", hash_prefix: str = "", fix: str = "") -> Path:
    """The cached, verified copy of ``file``, downloaded from the mirror, ``url`` or the Google Drive
    file ``drive_id`` when absent. ``hash_prefix``: the first hex digits its SHA-256 must start with
    (torchvision's file names carry them). ``fix``: what the user can do instead, for the error when
    the download fails."""
    target = cache_root() / "downloads" / file
    http_url = mirror_url(file) or url
    source = http_url or (f"Google Drive file {drive_id}" if drive_id else "")
    if not target.is_file():
        if not source:
            raise SparsedetError(f"no download link is known for {file}. {fix}{_mirror_hint(file)}")
        _record(target).unlink(missing_ok=True)  # a record without its file describes nothing
        _download(http_url, drive_id, target, fix)
    digest = sha256(target)
    if hash_prefix and not digest.startswith(hash_prefix):
        forget(target)
        raise SparsedetError(f"{file} from {source or 'the cache'} has SHA-256 {digest[:16]}..., not the "
                             f"{hash_prefix}... its name promises: removed it from the cache; run again to download "
                             "it afresh")
    check_recorded(target, digest)
    return target


def _download(url: str, drive_id: str, target: Path, fix: str) -> None:
    """``url`` over HTTP, else the Google Drive file ``drive_id``; network failures become one error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if url:
            _download_http(url, target)
        else:
            _download_drive(drive_id, target)
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        kept = _partial_bytes(target)
        resume = f"; the {kept / 2**20:.1f} MiB received are kept and the next try resumes them" if kept else ""
        raise SparsedetError(f"could not download {target.name} from {url or f'Google Drive file {drive_id}'} "
                             f"({reason}){resume}. {fix}{_mirror_hint(target.name)}") from None


def _partial_bytes(target: Path) -> int:
    """Bytes of ``target`` received so far: our ``FILE.part`` or gdown's ``FILE<random>.part``."""
    return sum(p.stat().st_size for p in target.parent.glob(f"{glob.escape(target.name)}*.part") if p.is_file())


def _mirror_hint(file: str) -> str:
    """How to fetch ``file`` from a mirror, unless one is set already (then it was the source)."""
    return "" if mirror_url(file) else f"; or set SPARSEDET_MIRROR=URL to fetch URL/{file} from a mirror"


def check_recorded(path: Path, digest: str) -> None:
    """Compare a cached file's SHA-256 ``digest`` with the one recorded when it was downloaded
    (recorded now on first use, also for a file put into the cache by hand); a file that changed is
    removed."""
    record = _record(path)
    if not record.is_file():
        record.write_text(digest + "\n")
        return
    expected = record.read_text().strip()
    if digest != expected:
        forget(path)
        raise SparsedetError(f"{path} changed since it was downloaded (SHA-256 {digest[:16]}..., recorded "
                             f"{expected[:16]}...): removed it from the cache; run again to download it afresh")


def forget(path: Path) -> None:
    """Remove a cached file and its SHA-256 record."""
    path.unlink(missing_ok=True)
    _record(path).unlink(missing_ok=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _download_http(url: str, target: Path) -> None:
    """``url`` into ``target`` through ``target.part``, asking only for the bytes a partial file lacks."""
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is no prefix of the file: start over
            part.unlink()
            return _download_http(url, target)
        raise
    with response:
        if have and response.status != 206:  # the server sends the whole file
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                           unit_divisor=1024, desc=target.name, disable=None) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")
    part.replace(target)


def _download_drive(file_id: str, target: Path) -> None:
    """A Google Drive file through gdown, which answers Drive's confirmation page for large files
    and resumes its own partial file."""
    try:
        import gdown
    except ImportError:
        raise SparsedetError(f"{target.name} is on Google Drive, which needs the gdown package: pip install gdown "
                             "(or set SPARSEDET_MIRROR to a mirror that holds it)") from None
    try:
        done = gdown.download(id=file_id, output=str(target), quiet=False, resume=True)
    except Exception as e:  # noqa: BLE001 - gdown raises its own types for quota, permission and network errors
        raise OSError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    if not done or not target.is_file():
        raise OSError("gdown returned no file")
