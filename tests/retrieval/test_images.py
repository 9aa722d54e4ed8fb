"""Photographs to encoder input: upright by EXIF, decoded at reduced size, bad files named."""
from __future__ import annotations

import io
import subprocess
import warnings

import pytest
from PIL import Image

from conftest import PYTHON, REPO, run_env
from retrieval.images import decode_photo, load_photo

EXIF_ORIENTATION = 0x0112
HUGE_SIDE = 12000


def half_red_half_blue(size: tuple[int, int]) -> Image.Image:
    """An upright test picture: red top half, blue bottom half."""
    im = Image.new("RGB", size, (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, size[0], size[1] // 2))
    return im


def jpeg(im: Image.Image, orientation: int | None = None, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    im.save(buf, format="JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def phone_photo(upright: Image.Image) -> bytes:
    """What a phone held upright stores: the sensor's landscape pixels plus EXIF
    orientation 6 (turn 90 degrees clockwise to view)."""
    return jpeg(upright.transpose(Image.Transpose.ROTATE_90), orientation=6)


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory) -> str:
    """A 12000 x 12000 JPEG (144 MP: above Pillow's decompression-bomb warning), cheap to
    make: one grey level at quality 50."""
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    Image.new("L", (HUGE_SIDE, HUGE_SIDE), 128).save(path, format="JPEG", quality=50)
    return str(path)


def test_phone_photo_is_turned_upright_by_its_exif_orientation():
    im = decode_photo(phone_photo(half_red_half_blue((40, 80))), 32)
    assert im.size == (40, 80)                         # portrait, as the photographer saw it
    top, bottom = im.getpixel((20, 5)), im.getpixel((20, 75))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_photo_without_exif_is_unchanged():
    im = decode_photo(jpeg(half_red_half_blue((40, 80))), 32)
    assert im.size == (40, 80) and im.mode == "RGB"


def test_file_that_is_not_an_image_is_named(tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("shopping list\n")
    with pytest.raises(ValueError, match=r"notes\.jpg: not an image") as err:
        load_photo(str(notes), 32)
    assert "BytesIO" not in str(err.value)


def test_truncated_jpeg_is_named(tmp_path):
    data = jpeg(Image.effect_noise((256, 256), 60).convert("RGB"))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.jpg: cannot decode image") as err:
        load_photo(str(cut), 256)
    assert "BytesIO" not in str(err.value)


def test_huge_jpeg_decodes_at_reduced_size_without_a_bomb_warning(huge_jpeg):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        im = load_photo(huge_jpeg, 512)
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []
    assert im.mode == "RGB" and 512 <= min(im.size) and max(im.size) <= HUGE_SIDE // 8


def test_huge_jpeg_decode_stays_small_in_memory(huge_jpeg):
    """Peak RSS of the decode alone, in a fresh process (a full decode is 432 MB as RGB)."""
    script = ("import resource, sys\n"
              "from retrieval.images import load_photo\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "load_photo(sys.argv[1], 512)\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    proc = subprocess.run([PYTHON, "-c", script, huge_jpeg], capture_output=True, text=True,
                          env=run_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown_mb = int(proc.stdout.strip()) / 1024           # ru_maxrss is in KiB on Linux
    assert grown_mb < 100, f"decoding grew the peak RSS by {grown_mb:.0f} MB"
