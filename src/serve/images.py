"""Images in and out of JSON: base64 (raw or a data: URL) decoded by tokenpaint.data.images (format allow-list,
pixel cap read from the header before the pixels are decoded), PNG out."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

from ..data.images import ImageLimits, decode_image as decode_image_bytes
from .errors import RequestError


def decode_image(data, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """base64 text -> an RGB PIL image. Over max_bytes (encoded) or max_pixels (from the header) is a 400, before
    the pixels are decoded (a small file can claim a huge canvas); anything unreadable is a 422 naming `field`."""
    if not isinstance(data, str) or not data:
        raise RequestError(422, "must be a base64-encoded image (raw or a data:image/...;base64, URL)", field)
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(422, "a data: URL must be base64 (data:image/png;base64,...)", field)
    if len(data) * 3 // 4 > max_bytes:
        raise RequestError(400, f"image is over the {max_bytes} byte upload limit", field)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        try:
            raw = base64.urlsafe_b64decode(data)
        except (binascii.Error, ValueError):
            raise RequestError(422, "is not valid base64", field) from None
    limits = ImageLimits(max_file_bytes=max_bytes, max_pixels=max_pixels)
    try:
        return decode_image_bytes(raw, limits)
    except Image.DecompressionBombError as e:  # Pillow's own header check, far over max_pixels
        raise RequestError(400, f"image is over the {max_pixels} pixel limit ({e})", field) from None
    except (ValueError, OSError) as e:
        status = 400 if "over the cap" in str(e) else 422
        raise RequestError(status, f"image: {e}", field) from None


def encode_png(image: Image.Image) -> str:
    """PIL -> base64 PNG text (no data: prefix, as the Stable Diffusion web UI answers)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
