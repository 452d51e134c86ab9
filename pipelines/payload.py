"""The served policy's request format, without MLflow: images travel as base64 text of a PNG or JPEG file.

`noisyrollout request` builds a request with `encode_image`; the model (pipelines/serving.py) reads it back with
`decode_image`.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any


def decode_image(value: Any) -> Any:
    """A PIL image from base64 text (or raw bytes) of a PNG / JPEG; a ValueError that says what was wrong otherwise."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image: not base64 text (send a PNG or JPEG file, base64-encoded)") from None
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"image: expected base64 text or bytes, got {type(value).__name__}")
    try:
        image = Image.open(io.BytesIO(value))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image: not a readable image ({exc})") from None
    return image.convert("RGB")


def encode_image(image: Any, fmt: str = "PNG") -> str:
    """The base64 text of `image` as a PNG: what a request's `image` column holds."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
