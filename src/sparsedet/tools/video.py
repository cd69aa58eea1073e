"""Video in and out through PyAV (FFmpeg's libraries; the ``[video]`` extra): frames of a file, a
stream URL or a webcam, decoded one at a time, and an H.264 (else MPEG-4) video written frame by frame."""
from __future__ import annotations

import re
import sys
from fractions import Fraction
from pathlib import Path

from PIL import Image

from ..errors import SparsedetError

VIDEO_SUFFIXES = {".avi", ".flv", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".ts", ".webm", ".wmv"}
_CODECS = ("libx264", "h264", "mpeg4")  # the first one this FFmpeg build can encode is used
_DEFAULT_FPS = 25.0  # for streams that state no frame rate


def require_av():
    """The ``av`` module, or the error that says how to install it."""
    try:
        import av
    except ImportError:
        raise SparsedetError("reading and writing videos needs PyAV: pip install 'sparsedet[video]'") from None
    return av


def is_stream(item: str) -> bool:
    """Whether a predict input names a live source rather than a file: a URL (rtsp://, http://, ...),
    a webcam index (``0``) or a V4L2 device (``/dev/video0``)."""
    return "://" in item or item.isdigit() or item.startswith("/dev/video")


def source_name(source: str) -> str:
    """A file-name stem for what is read from ``source``: a video file's stem, else the source with
    every run of other characters than letters and digits made one ``_`` (``rtsp_cam_1_live``)."""
    if not is_stream(source):
        return Path(source).stem
    return "webcam" + source if source.isdigit() else re.sub(r"[^A-Za-z0-9]+", "_", source).strip("_")[-60:]


def _open(source: str):
    """A PyAV input container for a file, URL, webcam index (V4L2 on Linux, AVFoundation on macOS)
    or V4L2 device."""
    av = require_av()
    if source.isdigit():
        if sys.platform.startswith("linux"):
            source, options = f"/dev/video{source}", {"format": "v4l2"}
        elif sys.platform == "darwin":
            options = {"format": "avfoundation"}
        else:
            raise SparsedetError(f"webcam index {source}: on this system pass the camera as a stream URL or "
                                 "device path that FFmpeg can open")
    else:
        options = {"format": "v4l2"} if source.startswith("/dev/video") else {}
    try:
        return av.open(source, **options)
    except (av.FFmpegError, OSError) as err:
        raise SparsedetError(f"cannot open video {source}: {err}; check the path, URL or camera") from None


class VideoReader:
    """``with VideoReader("clip.mp4") as video: for image in video: ...``: RGB PIL frames in order;
    ``fps`` is the stream's average rate (25 when it states none); ``frames`` the frame count the
    container states (None when it states none, as for a live stream)."""

    def __init__(self, source: str):
        self.source = source
        self.container = _open(source)
        if not self.container.streams.video:
            self.container.close()
            raise SparsedetError(f"{source} has no video stream")
        self.stream = self.container.streams.video[0]
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.fps = float(rate) if rate else _DEFAULT_FPS
        self.frames = self.stream.frames or None

    def __iter__(self):
        av = require_av()
        try:
            for frame in self.container.decode(self.stream):
                yield frame.to_image()
        except av.FFmpegError as err:
            raise SparsedetError(f"cannot decode {self.source}: {err}") from None

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VideoWriter:
    """Writes RGB PIL frames into ``path`` at ``fps``; the first frame fixes the size (rounded down
    to even, as yuv420p needs), later frames of another size are scaled to it."""

    def __init__(self, path: Path, fps: float):
        av = require_av()
        codec = _encoder(av)
        self.path = path
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        self.stream.pix_fmt = "yuv420p"
        self.size: tuple[int, int] | None = None  # (width, height)

    def write(self, image: Image.Image) -> None:
        av = require_av()
        if self.size is None:
            self.size = (max(2, image.width // 2 * 2), max(2, image.height // 2 * 2))
            self.stream.width, self.stream.height = self.size
        frame = av.VideoFrame.from_image(image.convert("RGB"))
        frame = frame.reformat(width=self.size[0], height=self.size[1], format="yuv420p")
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        if self.size is not None:
            self.container.mux(self.stream.encode(None))  # flush the encoder's delayed frames
        self.container.close()


def _encoder(av) -> str:
    """The first codec of ``_CODECS`` this FFmpeg build can encode with."""
    for name in _CODECS:
        try:
            av.codec.Codec(name, "w")
            return name
        except ValueError:  # an unknown codec, or one this build only decodes
            continue
    raise SparsedetError(f"this FFmpeg build (PyAV {av.__version__}) encodes none of {', '.join(_CODECS)}; "
                         "install the PyAV wheel from PyPI: pip install 'sparsedet[video]'")
