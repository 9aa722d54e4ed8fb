"""JPEG bytes: a cheap structural check for copy mode, and a reduced-size re-encode.

Copy mode must run near tar speed, so it does not decode: it checks the SOI
and EOI markers and lets Pillow parse the header. ``verify`` decodes fully.
"""
from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError


class CorruptImage(ValueError):
    """The bytes are not a complete JPEG."""


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


def decode_jpeg(data: bytes, draft_side: int | None = None) -> Image.Image:
    """Fully decode (optionally at reduced DCT scale); ``CorruptImage`` on any error."""
    try:
        im = Image.open(io.BytesIO(data))
        if draft_side:
            im.draft("RGB", (draft_side, draft_side))
        im.load()
        return im.convert("RGB") if im.mode != "RGB" else im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CorruptImage(f"cannot decode JPEG: {exc}") from None


def resize_jpeg(data: bytes, max_side: int, quality: int = 90) -> bytes:
    """Shrink so the longer side is ``max_side``; smaller images come back untouched.

    Decodes at the smallest DCT scale that still covers ``max_side`` (libjpeg's
    draft mode), then resamples once and encodes once.
    """
    size = check_jpeg(data)
    if max(size) <= max_side:
        return data
    scale = max_side / max(size)
    target = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
    try:
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", target)
        im = im.convert("RGB")
        if im.size != target:
            im = im.resize(target, Image.Resampling.BICUBIC)
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImage(f"cannot decode JPEG: {exc}") from None
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality, optimize=False)
    return out.getvalue()
