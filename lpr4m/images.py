"""Image reading that turns corrupt, empty or non-image files into a BadInput naming the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lpr4m.errors import BadInput


def load_rgb(path) -> np.ndarray:
    """An HxWx3 uint8 RGB array (EXIF orientation applied)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadInput(path, "empty file (expected an image)")
        with Image.open(path) as im:
            from PIL import ImageOps
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except BadInput:  # a ValueError subclass: keep its message ("empty file") rather than re-wrap it below
        raise
    except FileNotFoundError:
        raise BadInput(path, "image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadInput(path, f"corrupt or unreadable image ({type(e).__name__})") from None


def save_jpeg(path, rgb: np.ndarray, quality: int = 90) -> None:
    """Atomic JPEG write."""
    from lpr4m.io import atomic_write
    with atomic_write(path, "wb") as f:
        Image.fromarray(rgb).save(f, format="JPEG", quality=quality)
