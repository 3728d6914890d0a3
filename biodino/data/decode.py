"""Pictures as a person sees them: 8-bit RGB with EXIF orientation applied, whatever the file's mode.

Used wherever pixels are read (packing, training crops, embedding), so a 16-bit scan, a palette GIF, a CMYK JPEG,
a PNG with alpha or a phone photo stored sideways reach the model as a viewer shows them. Pillow's plain
``convert("RGB")`` clips 16-bit values above 255 to white and drops alpha onto whatever colour lies beneath.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

ORIENTATION = 0x0112  # the EXIF tag
TRANSPOSED = {5, 6, 7, 8}  # orientations that swap width and height
BACKGROUND = (255, 255, 255)  # transparent pixels are shown over white, as viewers and specimen photos do
SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1: stored upright), read without decoding the pixels."""
    try:
        return int(img.getexif().get(ORIENTATION, 1) or 1)
    except (ValueError, TypeError, OSError):
        return 1


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed."""
    w, h = img.size
    return (h, w) if orientation(img) in TRANSPOSED else (w, h)


def needs_conversion(img: Image.Image) -> bool:
    """Whether stored pixels differ from what a viewer shows (rotation, bit depth, alpha, palette, CMYK)."""
    return orientation(img) != 1 or img.mode not in ("RGB", "L") or "transparency" in img.info


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer or float grayscale scaled from its type's full range to 0..255."""
    if img.mode in SIXTEEN_BIT:
        values, top = np.asarray(img).astype(np.float64), 65535.0
    elif img.mode == "I":
        values = np.asarray(img).astype(np.float64)
        top = 65535.0 if values.min() >= 0 and values.max() <= 65535 else max(float(values.max()), 1.0)
        values = values.clip(0, None)
    else:  # "F": [0, 1] when it fits, else its own maximum
        values = np.nan_to_num(np.asarray(img).astype(np.float64)).clip(0, None)
        top = 1.0 if values.max() <= 1.0 else float(values.max())
    return Image.fromarray(np.rint(values * (255.0 / top)).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, upright, transparent areas composited over white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT or img.mode in ("I", "F"):
        img = _to_8bit(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")
