"""The images a request brings (the ControlNet condition image, an image to start from and its
mask): opened from what a user gives and checked, and an edge map made from a photo. The
panorama size an image implies is a size rule: `inputs.panorama_size`.

An image is read whole and only when it is a PNG, JPEG or WebP file of 8-bit RGB or grayscale
pixels, of a size and (a JPEG) a number of scans we are willing to decode; anything else is
refused with an `InputError` that names the input (`control_image`, `image` or `mask`), what was
given and what is taken.
"""

from __future__ import annotations

import io
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

from ..errors import InputError, shown
from .inputs import MAX_SIDE

ControlImageSource = str | os.PathLike[str] | bytes | IO[bytes] | Image.Image

# The condition image is resized to the panorama, which is at most MAX_SIDE on a side, so a larger
# image only costs memory. Four times the largest panorama, side and area, takes any phone photo
# (48 MP is 8000x6000) and decodes to at most 192 MiB of RGB. The area stays under Pillow's own
# bomb limit (Image.MAX_IMAGE_PIXELS, 89 million), so Pillow never warns of an image we open.
MAX_CONTROL_SIDE = 4 * MAX_SIDE
MAX_CONTROL_PIXELS = 4 * MAX_SIDE * MAX_SIDE

CONTROL_PREPROCESSORS = ("none", "canny")
"""What `preprocess` makes of a condition image: nothing, or its Canny edges."""

_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}  # Pillow's name: the one we print
_ALLOWED = "a PNG, JPEG or WebP image"
_COMPLETE = "a complete PNG, JPEG or WebP image"
_MODES = ("RGB", "L", "1")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Other images a user may well have (a phone's HEIC photo, a GIF), named in the refusal.
_OTHER_SIGNATURES = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
_HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF"}
# JPEG's frame headers (SOF0..SOF15 but DHT, JPG and DAC): the one that holds the image's size.
_JPEG_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# A progressive JPEG is decoded scan by scan, each over the whole picture, and a scan can be a few
# bytes: a 2048x2048 file of 57 KB, its last scan repeated 2,000 times, takes seconds to decode
# on a CPU, an 8192x8192 one minutes. The scans are counted before decoding, the idea of
# libjpeg-turbo's own scan limit (TJPARAM_SCANLIMIT, djpeg -maxscans). libjpeg's progression
# writes 10 scans for colour and 6 for grayscale, a baseline JPEG at most 4, an optimiser
# (mozjpeg) a few more: 100 leaves room ten times over.
MAX_JPEG_SCANS = 100
# In a JPEG's coded data a 0xFF byte is followed by 0x00 (stuffed) or a restart marker (RST0-7);
# anything else is a marker (0xFF fill bytes may come before it).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
_JPEG_STANDALONE = {0x01, 0xD8}  # TEM, SOI: markers without a length (EOI ends the count)
_READ_BYTES = 1 << 20
# Errors Pillow raises on a file cut short or damaged (UnidentifiedImageError is an OSError).
_DAMAGED = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def open_control_image(source: ControlImageSource) -> Image.Image:
    """The condition image in `source`, checked and opened by `open_image`."""
    return open_image(source, "control_image")


def open_image(source: ControlImageSource, name: str) -> Image.Image:
    """The image of input `name` in `source` (a path, bytes, a binary file or a PIL image), checked,
    decoded whole, turned upright by its EXIF orientation (a phone photo for Canny edges is
    upright) and in mode RGB.

    Taken: PNG, JPEG and WebP files of 8-bit RGB or grayscale pixels (bilevel too), at most
    `MAX_CONTROL_SIDE` pixels on a side and `MAX_CONTROL_PIXELS` in all, judged by the size the
    file's header declares before anything is decoded, and a JPEG of at most `MAX_JPEG_SCANS`
    scans, counted before decoding (each scan is decoded over the whole picture). Refused with
    an `InputError`: anything else, a file cut short or damaged, pixels with alpha, a palette,
    16 bits or CMYK (the message says how to convert them), and an animation (APNG, WebP): which
    of its frames is meant is not ours to guess, so it is refused rather than cut to its first.
    A JPEG that carries more pictures after the photo (MPO: a phone's depth map, a camera's
    second eye) gives the photo.
    """
    if isinstance(source, Image.Image):
        if source.format in ("JPEG", "MPO") and hasattr(getattr(source, "fp", None), "seek"):
            at = source.fp.tell()  # not decoded yet: its file is still open
            _check_scans(source.fp, "a PIL image: a JPEG", name)
            source.fp.seek(at)
        return _checked(source, "a PIL image", name)
    with _binary(source, name) as (fp, given):
        head = fp.read(32)
        if not head:
            raise InputError(f"{name} must be {_ALLOWED}; got {given}: empty")
        kind = _kind(head)
        if kind is None:
            raise InputError(f"{name} must be {_ALLOWED}; got {given}: {_not_ours(head)}")
        described = f"{given}: a {_FORMATS[kind]}"
        size = _declared_size(fp, kind)
        if size is None:
            raise InputError(
                f"{name} must be {_COMPLETE}; got {described} whose header is cut short or damaged"
            )
        _check_size(size, described, name)
        if kind == "JPEG":
            _check_scans(fp, described, name)
        fp.seek(0)
        try:
            image = Image.open(fp, formats=[kind])
        except _DAMAGED as exc:
            raise _damaged(described, exc, name) from exc
        return _checked(image, described, name)


@contextmanager
def _binary(source: Any, name: str) -> Iterator[tuple[IO[bytes], str]]:
    """A seekable binary file of `source` at its start, and `source` as a refusal names it."""
    if isinstance(source, str | os.PathLike):
        given = shown(os.fspath(source))
        try:
            fp = open(source, "rb")  # noqa: SIM115 (closed below, after the image is decoded)
        except OSError as exc:
            raise InputError(
                f"{name} must be {_ALLOWED}; got {given}, which cannot be read "
                f"({exc.strerror or exc})"
            ) from exc
        with fp:
            yield fp, given
    elif isinstance(source, bytes | bytearray):
        yield io.BytesIO(source), f"{len(source):,} bytes"
    elif hasattr(source, "read"):
        given = shown(source.name) if isinstance(getattr(source, "name", None), str) else "a file"
        seekable = getattr(source, "seekable", lambda: False)()
        data = source.read(0) if seekable else source.read()
        if not isinstance(data, bytes | bytearray):
            raise InputError(
                f"{name} must be {_ALLOWED}; got {given} opened in text mode: open it with 'rb'"
            )
        fp = source if seekable else io.BytesIO(data)
        fp.seek(0)
        yield fp, given
    else:
        raise InputError(
            f"{name} must be {_ALLOWED}: a path, bytes, a binary file or a PIL image; "
            f"got {shown(source)}"
        )


def _kind(head: bytes) -> str | None:
    """Pillow's name of the format whose signature `head` starts with, among those we take."""
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _not_ours(head: bytes) -> str:
    """What a file we do not take is, as far as its first bytes tell."""
    for signature, kind in _OTHER_SIGNATURES:
        if head.startswith(signature):
            return f"a {kind} image; save it as PNG, or as JPEG for a photo"
    if head[4:8] == b"ftyp" and (kind := _HEIF_BRANDS.get(head[8:12])):
        return f"a {kind} image; save it as JPEG or PNG"
    return f"not an image (it begins {head[:16]!r})"


def _declared_size(fp: IO[bytes], kind: str) -> tuple[int, int] | None:
    """The width and height the header of a PNG, JPEG or WebP file declares, read without
    decoding anything (Pillow's WebP opener allocates the canvas); None when there is no header.
    """
    fp.seek(0)
    if kind == "JPEG":
        return _jpeg_size(fp)
    head = fp.read(30)
    if kind == "PNG":  # the IHDR chunk comes first: width, height as big-endian 32-bit
        ihdr = head[12:16] == b"IHDR" and len(head) >= 24
        return struct.unpack(">II", head[16:24]) if ihdr else None
    chunk, body = head[12:16], head[20:30]  # WebP's first chunk: its name, then its data
    if len(body) < 10:
        return None
    if chunk == b"VP8X":  # extended: the canvas, 24 bits each, less one
        return 1 + int.from_bytes(body[4:7], "little"), 1 + int.from_bytes(body[7:10], "little")
    if chunk == b"VP8L" and body[0] == 0x2F:  # lossless: 14 bits each, less one
        bits = int.from_bytes(body[1:5], "little")
        return 1 + (bits & 0x3FFF), 1 + (bits >> 14 & 0x3FFF)
    if chunk == b"VP8 " and body[3:6] == b"\x9d\x01\x2a":  # lossy key frame: 14 bits each
        return (
            int.from_bytes(body[6:8], "little") & 0x3FFF,
            int.from_bytes(body[8:10], "little") & 0x3FFF,
        )
    return None


def _jpeg_size(fp: IO[bytes]) -> tuple[int, int] | None:
    """The size in a JPEG's frame header, found by skipping the marker segments before it."""
    fp.seek(2)  # past the start-of-image marker
    while fp.read(1) == b"\xff":
        marker = fp.read(1)
        while marker == b"\xff":  # fill bytes
            marker = fp.read(1)
        if not marker or marker[0] in (0xD9, 0xDA):  # the end, or the scan before any frame
            return None
        if 0xD0 <= marker[0] <= 0xD7 or marker[0] == 0x01:  # markers without a segment
            continue
        segment = fp.read(7)  # length (2 bytes); in a frame header precision, height, width
        if len(segment) < 2 or (length := struct.unpack(">H", segment[:2])[0]) < 2:
            return None  # a length under 2 would never move on
        if marker[0] in _JPEG_FRAMES:
            if len(segment) < 7:
                return None
            height, width = struct.unpack(">HH", segment[3:7])
            return width, height
        fp.seek(length - len(segment), io.SEEK_CUR)
    return None


def _check_size(size: tuple[int, int], described: str, name: str) -> None:
    width, height = size
    if max(width, height) > MAX_CONTROL_SIDE or width * height > MAX_CONTROL_PIXELS:
        raise InputError(
            f"{name} must be at most {MAX_CONTROL_SIDE:,} pixels on a side and "
            f"{MAX_CONTROL_PIXELS:,} in all (4 times the largest panorama, {MAX_SIDE}x{MAX_SIDE});"
            f" got {described} of {width}x{height} pixels"
        )


def _jpeg_scans(fp: IO[bytes], limit: int) -> int:
    """How many scans (SOS markers) a JPEG's first picture holds, counted to its end (EOI), or to
    `limit` + 1 when it has more. Marker segments are skipped by their length, so the scans of
    a thumbnail inside EXIF are not counted; what lies after the end (MPO's pictures) is not read.
    """
    fp.seek(2)  # past the start-of-image marker
    data, at, scans = b"", 0, 0  # `at` indexes `data`, a part of the file read into memory
    while True:
        marker = _JPEG_MARKER.search(data, at)
        if marker is None or len(data) < marker.end() + 2:  # its length may be in the next read
            more = fp.read(_READ_BYTES)
            if not more:
                return scans  # cut short: decoding says so
            keep = marker.start() if marker else max(at, len(data) - 1)  # a 0xFF may end `data`
            data, at = data[keep:] + more, 0
            continue
        code, at = data[marker.end() - 1], marker.end()
        if code == 0xD9:
            return scans
        scans += code == 0xDA
        if scans > limit:
            return scans
        if code not in _JPEG_STANDALONE:
            at += max(2, struct.unpack(">H", data[at : at + 2])[0])  # the length counts itself
        if at > len(data):  # a segment longer than what is read: skip the rest unread
            fp.seek(at - len(data), io.SEEK_CUR)
            data, at = b"", 0


def _check_scans(fp: IO[bytes], described: str, name: str) -> None:
    if _jpeg_scans(fp, MAX_JPEG_SCANS) > MAX_JPEG_SCANS:
        raise InputError(
            f"{name} must be a JPEG of at most {MAX_JPEG_SCANS} scans (a progressive "
            f"JPEG has about 10, each decoded over the whole picture); got {described} of more "
            f"than {MAX_JPEG_SCANS} scans: save it again, as any image editor writes it"
        )


def _checked(image: Image.Image, described: str, name: str) -> Image.Image:
    """`image` refused or taken: size, frames and mode judged before it is decoded, then decoded,
    turned upright and converted to RGB."""
    _check_size(image.size, described, name)
    # A phone's JPEG may hold more pictures (MPO: a depth map, a preview); its first is the photo.
    if (frames := getattr(image, "n_frames", 1)) > 1 and image.format != "MPO":
        raise InputError(
            f"{name} must be a still image; got {described} of {frames} frames (an "
            "animation): save the frame to use as a still image"
        )
    if image.mode not in _MODES:
        raise InputError(
            f"{name} must be 8-bit RGB or grayscale (mode RGB, L or 1); "
            f"got {described} in mode {image.mode}{_mode_advice(image.mode)}"
        )
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)
    except _DAMAGED as exc:
        raise _damaged(described, exc, name) from exc
    return upright.convert("RGB")


def _mode_advice(mode: str) -> str:
    """What the pixels of `mode` are, and how to make an image we take of them."""
    if mode.upper().endswith("A"):  # RGBA, LA, PA and their premultiplied forms
        return ", with an alpha channel: flatten it onto a background and save it as RGB"
    if mode == "P":
        return ", with a colour palette: convert it to RGB"
    if mode.startswith("I;16"):
        return ", 16 bits a pixel: convert it to 8-bit grayscale (mode L)"
    if mode == "I":
        return ", 32-bit integer pixels: convert it to 8-bit grayscale (mode L)"
    if mode == "F":
        return ", floating-point pixels: scale them to 0-255 and convert it to mode L"
    if mode == "CMYK":
        return ", CMYK colours: convert it to RGB"
    return ": convert it to RGB"


def _damaged(described: str, exc: Exception, name: str) -> InputError:
    return InputError(f"{name} must be {_COMPLETE}; got {described}, cut short or damaged ({exc})")


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """The edges of `image` by OpenCV's Canny with hysteresis thresholds `low` and `high`,
    white on black in mode RGB: the canny ControlNet's condition. 100 and 200 are the thresholds
    of diffusers' ControlNet examples, which run Canny on the RGB pixels as here."""
    import cv2  # OpenCV: only where edges are asked for

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)  # (H, W): 0 or 255
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def preprocess(image: Image.Image, name: str) -> Image.Image:
    """`image` made into a condition by the preprocessor `name`, one of CONTROL_PREPROCESSORS."""
    if name == "none":
        return image
    if name == "canny":
        return canny(image)
    raise InputError(
        f"control_preprocess must be one of {', '.join(CONTROL_PREPROCESSORS)}; got {shown(name)}"
    )
