"""Images read from training data: bounded file reads, an allow-list of formats, a pixel cap, every mode to RGB.

ImageLimits bounds what one image may cost: a file must be a regular file (a device, FIFO or socket is refused
before it is opened, and the open never blocks) of at most max_file_bytes; a decoded image must be one of `formats`
(no EPS or PDF: Pillow would run Ghostscript on them) and at most max_pixels, checked from the header before the
pixels are decoded. 16-bit and float greyscale keep their scale (Pillow's own convert clips them to white).
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")


@dataclass(frozen=True)
class ImageLimits:
    """What an image column may read and decode (see the module docstring); train.py's --allow-outside-paths."""

    allow_outside_paths: bool = False
    max_file_bytes: int = 64 << 20  # an image file or decoded base64 field
    max_pixels: int = 40_000_000  # width x height; Pillow itself only warns from 89 Mpx (~270 MB as RGB)
    formats: tuple = ALLOWED_FORMATS


def read_regular_file(path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes; ValueError for anything else (nothing else is opened)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path} is not a regular file (a directory, device, FIFO or socket)")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced between the check and the open
            raise ValueError(f"{path} is not a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} is over the cap of {max_bytes} bytes")
    return data


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Image bytes -> RGB PIL, refusing formats outside limits.formats and images over limits.max_pixels (checked
    from the header, before the pixels are decoded). Raises ValueError / OSError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap, below Pillow's, applies
        try:
            img = Image.open(io.BytesIO(data), formats=list(limits.formats))
        except Image.UnidentifiedImageError:
            raise ValueError(f"not an image in an accepted format ({', '.join(limits.formats)})") from None
    with img:
        width, height = img.size
        if width * height > limits.max_pixels:
            raise ValueError(f"{width}x{height} pixels ({width * height / 1e6:.1f} Mpx) is over the cap of "
                             f"{limits.max_pixels / 1e6:g} Mpx")
        img.load()
        return _to_rgb(img)


_INTEGER_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale PNGs open as I;16 or I


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float greyscale -> "L" on the same scale (Pillow's convert clips at 255, so a
    16-bit mid-grey 32768 would become white). Integer modes are read as 16-bit (0..65535); float as 0..1."""
    pixels = np.asarray(img)
    if img.mode == "F":
        scaled = np.nan_to_num(pixels.astype(np.float64)) * 255.0
    else:
        scaled = pixels.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    if img.mode in _INTEGER_GREY_MODES or img.mode == "F":
        img = _to_8bit_grey(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))  # transparent pixels become white, not black
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` (bicubic, antialiased by Pillow) and center-crop a square."""
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> float [3,H,W] in [-1,1]."""
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return rearrange(pixels, "h w c -> c h w").float().div_(127.5).sub_(1.0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """float [3,H,W] in [-1,1] (clamped) -> RGB PIL."""
    pixels = rearrange(((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), "c h w -> h w c")
    return Image.fromarray(pixels.cpu().numpy(), "RGB")


