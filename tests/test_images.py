"""Uploaded bytes -> (H, W, 3) uint8, for every kind of awkward or hostile upload."""
from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from cacheviz.errors import CachevizError
from cacheviz.images import MAX_PIXELS, decode_upload, enlarge, framed


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _check_rgb(a: np.ndarray, h: int, w: int) -> None:
    assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.shape == (h, w, 3)


def _one_sentence(msg: str) -> None:
    assert msg.endswith(".") and msg.count(". ") == 0 and "Traceback" not in msg


# --- images that must decode correctly ---------------------------------------------------------


def test_plain_rgb_png_roundtrips():
    rgb = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    out = decode_upload(_save(Image.fromarray(rgb), "PNG"), "a.png")
    _check_rgb(out, 12, 20)
    assert np.array_equal(out, rgb)


def test_16_bit_png_is_scaled_to_8_bits():
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000
    im = Image.fromarray(ramp)
    assert im.mode.startswith("I;16")
    out = decode_upload(_save(im, "PNG"), "deep.png")
    _check_rgb(out, 8, 8)
    expect = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.abs(out[..., 0].astype(int) - expect).max() <= 1
    assert np.array_equal(out[..., 0], out[..., 2])  # gray stays gray


def test_cmyk_jpeg_becomes_rgb():
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_upload(_save(im, "JPEG", quality=95), "print.jpg")
    _check_rgb(out, 16, 16)
    r, g, b = out[8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_palette_png_with_transparency_is_composited_on_white():
    im = Image.new("P", (10, 10), 0)
    im.putpalette([0, 0, 255] + [255, 0, 0] + [0, 0, 0] * 254)
    im.paste(1, (0, 0, 5, 10))  # left half palette index 1 = red, right half index 0 = blue
    data = _save(im, "PNG", transparency=0)  # index 0 (the blue) is transparent
    out = decode_upload(data, "palette.png")
    _check_rgb(out, 10, 10)
    assert tuple(out[5, 2]) == (255, 0, 0)
    assert tuple(out[5, 8]) == (255, 255, 255)


def test_palette_png_without_transparency():
    im = Image.fromarray(np.full((6, 6, 3), (10, 200, 30), np.uint8)).convert("P", palette=Image.ADAPTIVE)
    out = decode_upload(_save(im, "PNG"), "p.png")
    _check_rgb(out, 6, 6)
    assert np.abs(out[3, 3].astype(int) - (10, 200, 30)).max() <= 8


def test_rgba_png_is_composited_on_white():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:, :3] = (0, 0, 0, 255)  # opaque black
    rgba[:, 3:] = (0, 0, 0, 0)  # fully transparent
    rgba[0, 0] = (255, 0, 0, 128)  # half-transparent red
    out = decode_upload(_save(Image.fromarray(rgba, "RGBA"), "PNG"), "alpha.png")
    _check_rgb(out, 4, 6)
    assert tuple(out[2, 1]) == (0, 0, 0)
    assert tuple(out[2, 4]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (255, 127, 127)


def test_gray_alpha_png():
    la = Image.fromarray(np.dstack([np.full((5, 5), 40, np.uint8), np.zeros((5, 5), np.uint8)]), "LA")
    out = decode_upload(_save(la, "PNG"), "la.png")
    assert np.all(out == 255)


def test_animated_gif_gives_its_first_frame():
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    data = _save(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decode_upload(data, "anim.gif")
    _check_rgb(out, 8, 8)
    assert tuple(out[4, 4]) == (255, 0, 0)


def test_exif_orientation_is_applied():
    # 40 wide, 20 high; a white block in the top-left corner.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:6, :6] = 255
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = _save(im, "JPEG", quality=95, exif=exif.tobytes())
    out = decode_upload(data, "phone.jpg")
    _check_rgb(out, 40, 20)  # portrait now
    # Rotating clockwise moves the top-left corner to the top-right.
    assert out[:6, -6:].mean() > 200 and out[:6, :6].mean() < 50


@pytest.mark.parametrize("fmt,name", [("BMP", "a.bmp"), ("TIFF", "a.tiff"), ("WEBP", "a.webp"), ("JPEG", "a.jpg")])
def test_other_accepted_formats(fmt, name):
    im = Image.new("RGB", (9, 7), (20, 120, 220))
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_upload(_save(im, fmt, **kw), name)
    _check_rgb(out, 7, 9)
    assert np.abs(out[3, 4].astype(int) - (20, 120, 220)).max() <= 6


def test_mode_1_and_float_images():
    bw = Image.fromarray(np.eye(8, dtype=bool))
    out = decode_upload(_save(bw, "PNG"), "bw.png")
    assert out[0, 0, 0] == 255 and out[0, 1, 0] == 0
    f = Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), "F")
    out = decode_upload(_save(f, "TIFF"), "f.tiff")
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_large_photo_is_shrunk():
    im = Image.new("RGB", (3000, 1500), (1, 2, 3))
    out = decode_upload(_save(im, "JPEG"), "big.jpg", max_side=1024)
    assert max(out.shape[:2]) <= 1024 and out.shape[2] == 3
    assert abs(out.shape[1] / out.shape[0] - 2.0) < 0.05


# --- uploads that must be refused with one clear sentence ---------------------------------------


def test_empty_file():
    with pytest.raises(CachevizError, match="empty") as e:
        decode_upload(b"", "nothing.png")
    _one_sentence(str(e.value))


def test_text_renamed_png():
    with pytest.raises(CachevizError, match="not an image") as e:
        decode_upload(b"hello, this is a text file\n" * 20, "notes.png")
    _one_sentence(str(e.value))


def test_truncated_png():
    rgb = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _save(Image.fromarray(rgb), "PNG")
    with pytest.raises(CachevizError, match="damaged or truncated") as e:
        decode_upload(data[: len(data) // 2], "cut.png")
    _one_sentence(str(e.value))


def test_truncated_jpeg():
    rgb = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _save(Image.fromarray(rgb), "JPEG")
    with pytest.raises(CachevizError, match="damaged or truncated"):
        decode_upload(data[: len(data) // 3], "cut.jpg")


def _bomb_png(w: int, h: int) -> bytes:
    """A valid 1-bit PNG of w x h zeros, built by hand: a few tens of kB, far too many pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (w + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    data = _bomb_png(20000, 20000)  # 400 megapixels
    assert len(data) < 200_000
    t = time.perf_counter()
    with pytest.raises(CachevizError, match="pixels") as e:
        decode_upload(data, "bomb.png")
    assert time.perf_counter() - t < 1.0  # refused from the header, not after decoding 400 MP
    _one_sentence(str(e.value))


def test_bomb_just_over_our_limit_but_under_pillows():
    side = int((MAX_PIXELS * 1.2) ** 0.5)  # over our limit, below Pillow's own warning threshold
    with pytest.raises(CachevizError, match="megapixels"):
        decode_upload(_bomb_png(side, side), "big.png")


def test_unsupported_format_is_refused():
    data = _save(Image.new("RGB", (4, 4)), "PPM")
    with pytest.raises(CachevizError, match="not an image this app can read"):
        decode_upload(data, "x.ppm")


def test_oversized_file_is_refused():
    with pytest.raises(CachevizError, match="MB"):
        decode_upload(b"\x89PNG" + b"\x00" * (11 * 2**20), "huge.png")


def test_a_bad_upload_leaves_decoding_of_good_ones_intact():
    with pytest.raises(CachevizError):
        decode_upload(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "bad.png")
    good = decode_upload(_save(Image.new("RGB", (5, 5), (9, 9, 9)), "PNG"), "good.png")
    assert tuple(good[1, 1]) == (9, 9, 9)
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- display helpers --------------------------------------------------------------------------


def test_enlarge_and_frame():
    tiny = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    big = enlarge(tiny, 96)
    assert big.shape == (96, 96, 3) and big[0, 0, 0] == 0 and big[-1, -1, 0] == 63
    f = framed(big, (1, 2, 3), width=4)
    assert f.shape == (104, 104, 3) and tuple(f[0, 0]) == (1, 2, 3) and np.array_equal(f[4:-4, 4:-4], big)
