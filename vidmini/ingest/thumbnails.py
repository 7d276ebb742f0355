"""A frame's JPEG thumbnail (what the timeline and search results show); PIL and numpy only, so the decoding
child process can make it too."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

THUMB_WIDTH = 160


def thumbnail_jpeg(image: np.ndarray, width: int = THUMB_WIDTH) -> bytes:
    h, w = image.shape[:2]
    thumb = Image.fromarray(image).resize((width, max(1, round(h * width / w))), Image.BILINEAR)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=80)
    return buf.getvalue()
