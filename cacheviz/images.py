"""Uploaded image bytes -> (H, W, 3) uint8, robustly; and small helpers to display images.

Whatever arrives (a photo from a phone, a 16-bit scan, a palette GIF, a renamed text file, a
decompression bomb), `decode_upload` either returns an RGB array the model can take or raises
`CachevizError` with one sentence saying what to do. Nothing here touches Pillow's global
settings, so one session's bad upload never changes how another session decodes.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CachevizError

# The formats the app accepts (file extensions map onto these). Restricting Image.open to them
# also keeps Pillow away from formats that run external programs (EPS -> Ghostscript).
ACCEPTED_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "GIF", "TIFF")

# Refuse anything larger before its pixels are decoded (a 12 MP phone photo is 12e6).
MAX_PIXELS = 50_000_000
# The app's upload limit (server.maxUploadSize in .streamlit/config.toml) is 10 MB.
MAX_BYTES = 10 * 2**20
# Decoded images are shrunk to at most this side: the models take 8x8 to 224x224 inputs.
MAX_SIDE = 1024
# Smaller than this on a side, an upload holds nothing a classifier can see.
MIN_SIDE = 4

_KINDS = "png, jpg, webp, bmp, gif or tiff"


def decode_upload(data: bytes, name: str = "upload", max_side: int | None = MAX_SIDE) -> np.ndarray:
    """Decode uploaded bytes into an (H, W, 3) uint8 RGB array.

    EXIF orientation is applied, transparency is composited on white, 16-bit and float images
    are scaled to 8 bits, CMYK and palette images become RGB, an animation gives its first frame.
    Images with more than `MAX_PIXELS` pixels are refused from their header, before decoding.
    Raises `CachevizError` (one sentence naming the fix) for anything that is not a usable image.
    """
    name = str(name or "upload")
    if data is None or len(data) == 0:
        raise CachevizError(f"{name} is empty (0 bytes); upload an image file ({_KINDS}).")
    if len(data) > MAX_BYTES:
        raise CachevizError(
            f"{name} is {len(data) / 2**20:.1f} MB; upload an image of at most {MAX_BYTES // 2**20} MB."
        )
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check only warns below 2x its limit; make every level an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(bytes(data)), formats=_formats())
            _check_size(im, name)
            if getattr(im, "is_animated", False):
                im.seek(0)  # the first frame of an animated GIF / WebP / multi-page TIFF
            if max_side and im.format in ("JPEG", "MPO"):
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the photo is far larger than needed.
                im.draft(im.mode, (max_side, max_side))
            im.load()
            im = _upright(im)
            rgb = _to_rgb(im)
    except CachevizError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CachevizError(
            f"{name} declares too many pixels to decode safely; upload an image under "
            f"{MAX_PIXELS // 1_000_000} megapixels."
        ) from None
    except UnidentifiedImageError:
        raise CachevizError(f"{name} is not an image this app can read; upload a {_KINDS} file.") from None
    except MemoryError:
        raise CachevizError(f"{name} is too large to decode; upload a smaller image.") from None
    except Exception:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... for damaged files
        raise CachevizError(f"{name} is damaged or truncated; re-save it as {_KINDS} and upload it again.") from None
    if max_side and max(rgb.shape[:2]) > max_side:
        rgb = _shrink(rgb, max_side)
    return np.ascontiguousarray(rgb)


def _formats() -> tuple[str, ...]:
    # Image.open(formats=...) only knows the preloaded plugins until Image.init() has run.
    if not all(f in Image.OPEN for f in _FORMATS):
        Image.init()
    return tuple(f for f in _FORMATS if f in Image.OPEN)


def _check_size(im: Image.Image, name: str) -> None:
    w, h = im.size
    if min(w, h) < MIN_SIDE:
        raise CachevizError(f"{name} is only {w}x{h} pixels", f"upload a picture at least {MIN_SIDE}x{MIN_SIDE}")
    if w * h > MAX_PIXELS:
        raise CachevizError(
            f"{name} is {w}x{h} pixels, too many to decode safely; upload an image under "
            f"{MAX_PIXELS // 1_000_000} megapixels."
        )


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (photos from phones); a broken EXIF block is ignored."""
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception:
        return im


def _on_white(im: Image.Image) -> np.ndarray:
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
    alpha = rgba[..., 3:4] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _gray_to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    a = arr.astype(np.float64)
    if mode.startswith("I;16"):
        a = a / 257.0
    elif mode == "I":
        # 32-bit integer images are mostly 16-bit data (Pillow opens some 16-bit PNG/TIFF so).
        a = np.clip(a, 0, 65535) / 257.0 if a.size and a.max() > 255 else np.clip(a, 0, 255)
    elif mode == "F":
        finite = np.isfinite(a)
        a = np.where(finite, a, 0.0)
        top = a.max() if a.size else 0.0
        a = a * 255.0 if 0.0 <= a.min() and top <= 1.0 else np.clip(a, 0, 255)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        return _on_white(im)
    if mode == "P":
        return np.asarray(im.convert("RGB"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _gray_to_8bit(np.asarray(im), mode)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("1", "L"):
        gray = np.asarray(im.convert("L"))
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "CMYK":
        return np.asarray(_cmyk_to_rgb(im))
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:
            pass  # a broken profile: fall back to the plain conversion
    return im.convert("RGB")


def _shrink(rgb: np.ndarray, max_side: int) -> np.ndarray:
    im = Image.fromarray(rgb)
    im.thumbnail((max_side, max_side), Image.LANCZOS)
    return np.asarray(im)


# ---------------------------------------------------------------------------------------------
# Display helpers (pure numpy/PIL; the pages show what these return)


def enlarge(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) uint8 -> about `size` pixels on the longer side; tiny images stay crisp (nearest)."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    h, w = img.shape[:2]
    scale = size / max(h, w)
    if scale >= 1:
        f = max(1, int(scale))
        return np.ascontiguousarray(img.repeat(f, axis=0).repeat(f, axis=1))
    im = Image.fromarray(img)
    im.thumbnail((size, size), Image.LANCZOS)
    return np.asarray(im)


def framed(img: np.ndarray, color: tuple[int, int, int], width: int = 5) -> np.ndarray:
    """A coloured frame `width` pixels wide around an (H, W, 3) uint8 image."""
    h, w = img.shape[:2]
    out = np.empty((h + 2 * width, w + 2 * width, 3), dtype=np.uint8)
    out[:] = np.asarray(color, dtype=np.uint8)
    out[width : width + h, width : width + w] = img[..., :3]
    return out
