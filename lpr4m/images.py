"""Image reading that turns corrupt, empty or non-image files into a BadInput naming the file."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lpr4m.errors import BadInput


def load_rgb(path) -> np.ndarray:
    """An HxWx3 uint8 RGB array (EXIF orientation applied)."""
    with _opened(path) as im:
        from PIL import ImageOps
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def check_image(path) -> None:
    """Raise the BadInput ``load_rgb`` would, ~10x faster on a 720p JPEG (2 vs 22 ms): JPEGs decode at 1/8 scale
    (libjpeg's DCT scaling still reads and checks every byte), for a pre-flight pass over a whole dataset."""
    with _opened(path) as im:
        im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()


@contextlib.contextmanager
def _opened(path):
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadInput(path, "empty file (expected an image)")
        with Image.open(path) as im:
            yield im
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
