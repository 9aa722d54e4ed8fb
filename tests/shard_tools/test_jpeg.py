"""The copy-mode structural JPEG check and the reduced-size re-encode."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from conftest import jpeg_bytes
from shard_tools.jpeg import CorruptImage, check_jpeg, decode_jpeg, resize_jpeg


@pytest.mark.parametrize("progressive", [False, True])
def test_check_reads_the_size_of_baseline_and_progressive_jpegs(progressive):
    buf = io.BytesIO()
    Image.new("RGB", (37, 21), (10, 200, 30)).save(buf, "JPEG", progressive=progressive)
    assert check_jpeg(buf.getvalue()) == (37, 21)


@pytest.mark.parametrize("mangle, why", [
    (lambda d: d[: len(d) // 2], "truncated"),
    (lambda d: b"GIF89a" + d[6:], "no SOI"),
    (lambda d: d[:2] + b"\xff\xe0\xff\xff" + d[6:], "segment length"),
    (lambda d: d[:20] + b"\x00" * 8 + d[28:], "marker"),
])
def test_check_rejects_broken_jpegs(mangle, why):
    with pytest.raises(CorruptImage, match=why):
        check_jpeg(mangle(jpeg_bytes(3, (40, 30))))


def test_decode_rejects_what_the_header_check_cannot_see():
    data = bytearray(jpeg_bytes(4, (64, 64)))
    dht = data.index(b"\xff\xc4")
    data[dht + 5: dht + 21] = b"\xff" * 16  # Huffman code counts destroyed
    check_jpeg(bytes(data))  # the marker structure still looks fine
    with pytest.raises(CorruptImage):
        decode_jpeg(bytes(data))


def test_resize_keeps_aspect_and_leaves_small_images_alone():
    big = jpeg_bytes(5, (400, 100))
    out = resize_jpeg(big, 80)
    assert Image.open(io.BytesIO(out)).size == (80, 20)
    small = jpeg_bytes(6, (60, 40))
    assert resize_jpeg(small, 80) is small
