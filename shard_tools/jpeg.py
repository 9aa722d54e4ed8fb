"""JPEG bytes: a cheap structural check for copy mode, and a reduced-size re-encode.

Copy mode must run near tar speed, so it does not decode: it checks the SOI
and EOI markers and lets Pillow parse the header. ``verify`` decodes fully.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError


class CorruptImage(ValueError):
    """The bytes are not a complete JPEG."""


class TooLarge(CorruptImage):
    """A JPEG whose header claims more pixels than allowed (a decompression bomb, or a
    corrupt header): rejected before any memory is spent on it."""

    reason = "too large"


# Pillow's own hard limit (it raises DecompressionBombError above twice MAX_IMAGE_PIXELS).
DEFAULT_MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
_EXIF_ORIENTATION = 0x0112


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def check_jpeg(data: bytes) -> tuple[int, int]:
    """(width, height) of a structurally complete JPEG; ``CorruptImage`` otherwise.

    Walks the marker segments up to the frame header (no decoding, a few
    microseconds) and requires the end-of-image marker.
    """
    n = len(data)
    if n < 4 or data[:3] != b"\xff\xd8\xff":
        raise CorruptImage("not a JPEG (no SOI marker)")
    end = data.rstrip(b"\x00\r\n ")
    if end[-2:] != b"\xff\xd9":
        raise CorruptImage("truncated JPEG (no EOI marker)")
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise CorruptImage(f"corrupt JPEG header (no marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > n:
            raise CorruptImage(f"corrupt JPEG header (bad segment length at byte {pos})")
        if marker in _SOF:
            if length < 7:
                raise CorruptImage("corrupt JPEG frame header")
            height = int.from_bytes(data[pos + 5:pos + 7], "big")
            width = int.from_bytes(data[pos + 7:pos + 9], "big")
            if not width or not height:
                raise CorruptImage("JPEG with zero size")
            return width, height
        if marker == 0xDA:
            break
        pos += 2 + length
    raise CorruptImage("corrupt JPEG header (no frame header before the scan)")


def check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    """``TooLarge`` when ``width * height`` exceeds ``max_pixels`` (None: no limit)."""
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise TooLarge(f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, more than "
                       f"--max-pixels {max_pixels:,}")


@contextlib.contextmanager
def _pillow_limit(max_pixels: int | None):
    """Let Pillow open what ``max_pixels`` allows (its own bomb check would refuse
    above ~179 MP, or warn above ~89 MP); we have already checked the header."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None if max_pixels is None else max(max_pixels, old or 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def decode_jpeg(data: bytes, draft_side: int | None = None) -> Image.Image:
    """Fully decode (optionally at reduced DCT scale); ``CorruptImage`` on any error,
    ``TooLarge`` (a ``CorruptImage``) for Pillow's decompression-bomb refusal."""
    try:
        im = Image.open(io.BytesIO(data))
        if draft_side:
            im.draft("RGB", (draft_side, draft_side))
        im.load()
        return im.convert("RGB") if im.mode != "RGB" else im
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"too large to decode: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CorruptImage(f"cannot decode JPEG: {exc}") from None


@dataclass(frozen=True)
class Resized:
    """The bytes to store and what was done to them."""

    data: bytes
    exif_orientation: int | None = None   # the EXIF orientation applied to the pixels, if any


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright, 2..8 = flipped/rotated); 1 when absent."""
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is not a reason to lose the image
        return 1
    return value if 1 <= value <= 8 else 1


def shrink_jpeg(data: bytes, max_side: int, quality: int = 90,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Resized:
    """``resize_jpeg`` that also says whether an EXIF orientation was applied.

    A rotated photograph (EXIF orientation 2..8) is turned upright before the
    resize, because the re-encoded JPEG carries no EXIF: without this a
    portrait photo would come out landscape.
    """
    size = check_jpeg(data)
    check_pixels(size, max_pixels)
    if max(size) <= max_side:
        return Resized(data)
    scale = max_side / max(size)
    target = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
    try:
        with _pillow_limit(max_pixels):
            im = Image.open(io.BytesIO(data))
            orientation = exif_orientation(im)
            im.draft("RGB", target)
            if orientation != 1:
                im = ImageOps.exif_transpose(im)
                if orientation >= 5:  # a quarter turn: the target's sides swap too
                    target = (target[1], target[0])
            im = im.convert("RGB") if im.mode != "RGB" else im
            if im.size != target:
                im = im.resize(target, Image.Resampling.BICUBIC)
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"too large to decode: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImage(f"cannot decode JPEG: {exc}") from None
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality, optimize=False)
    return Resized(out.getvalue(), orientation if orientation != 1 else None)


def resize_jpeg(data: bytes, max_side: int, quality: int = 90,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> bytes:
    """Shrink so the longer side is ``max_side``; smaller images come back untouched.

    Decodes at the smallest DCT scale that still covers ``max_side`` (libjpeg's
    draft mode), applies the EXIF orientation, then resamples once and encodes once.
    """
    return shrink_jpeg(data, max_side, quality, max_pixels).data
