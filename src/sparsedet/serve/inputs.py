"""What a request may send, checked before the model sees it: a size-limited body, an image
content type (a raw ``image/*`` body or a multipart field ``file``), and an image that decodes
in full within the pixel limit. Each refusal is an ``HttpError`` with the status and a message that
says what to send instead."""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request


class HttpError(Exception):
    """A refusal: ``status`` and ``message`` become the JSON answer ``{"detail": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 20 * 1024 * 1024  # a request body
    max_pixels: int = 50_000_000       # width x height of a decoded image

    def check(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError("max_bytes and max_pixels must be at least 1")


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body, refused with 413 as soon as it is larger than ``limits.max_bytes`` (by its
    Content-Length when sent, else while it streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
        raise HttpError(413, f"the body is {int(declared)} bytes; this server takes at most {limits.max_bytes} "
                        "(--max-bytes): send a smaller image")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_bytes:
            raise HttpError(413, f"the body is over {limits.max_bytes} bytes (--max-bytes): send a smaller image")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request: Request, limits: Limits) -> bytes:
    """The image file a request carries: a raw body of type ``image/*``, or the field ``file`` of
    a ``multipart/form-data`` body. 415 for any other content type, 400 for a form without ``file``."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (kind.startswith("image/") or kind == "multipart/form-data"):
        raise HttpError(415, f"content type {kind or '(none)'!r} is not an image: send the file as the body with "
                        "Content-Type image/jpeg, image/png, ... or as the field 'file' of a multipart/form-data form")
    body = await read_body(request, limits)
    if kind.startswith("image/"):
        return body
    return await _form_file(request, body, limits)


async def _form_file(request: Request, body: bytes, limits: Limits) -> bytes:
    async def once():
        yield body
        yield b""

    try:
        form = await MultiPartParser(request.headers, once(), max_files=1, max_fields=16,
                                     max_part_size=limits.max_bytes).parse()
    except MultiPartException as err:
        raise HttpError(400, f"the multipart form could not be read ({err}); send the image as the field 'file'")
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HttpError(400, "the multipart form has no file field 'file': send the image as "
                            "`-F file=@photo.jpg` (curl) or FormData.append('file', ...)")
        return await upload.read()
    finally:
        await form.close()


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """The image as RGB, as ``sparsedet predict`` reads a file (pixels as stored, no EXIF rotation).
    400 when it is not an image or is cut short; 413 when it has more than ``limits.max_pixels``
    pixels (checked from its header, before it is decoded). Pillow's own decompression-bomb limit
    stays above ours (``allow_pixels``), so it never warns about an image we accept."""
    if not data:
        raise HttpError(400, "the body is empty: send an image file")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limits.max_pixels:
            raise HttpError(413, f"the image is {width}x{height} = {width * height} pixels; this server takes at "
                            f"most {limits.max_pixels} (--max-pixels): send a smaller image")
        image.load()
        return image.convert("RGB")
    except HttpError:
        raise
    except Image.DecompressionBombError as err:
        raise HttpError(413, f"the image is too large to decode ({err})")
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        if isinstance(err, Image.UnidentifiedImageError):
            raise HttpError(400, "the body is not an image this server can read: send a JPEG, PNG, BMP, WebP or "
                            "TIFF file") from None
        raise HttpError(400, f"the image could not be decoded, it may be cut short ({err}); send the whole file")


def allow_pixels(limits: Limits) -> None:
    """Raise Pillow's process-wide decompression-bomb limit to ours where ours is higher (set once,
    at start: a warnings filter changed per request would not be thread-safe)."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limits.max_pixels:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels
