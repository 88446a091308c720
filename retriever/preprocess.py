"""Image -> network input, driven only by an EmbedderConfig (the same code for every backend)."""
from __future__ import annotations

import cv2
import numpy as np

from lpr4m.errors import BadInput


def resize(rgb: np.ndarray, size: int, mode: str = "letterbox", pad_value: int = 114) -> np.ndarray:
    """Square ``size`` x ``size`` uint8 image: letterbox keeps the aspect ratio and pads, squash stretches."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 \
            or rgb.shape[1] < 1:
        raise BadInput(None, f"expected an HxWx3 RGB image, got array of shape "
                             f"{getattr(rgb, 'shape', type(rgb).__name__)}")
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    h, w = rgb.shape[:2]
    if mode == "squash":
        interp = cv2.INTER_AREA if (h > size or w > size) else cv2.INTER_LINEAR
        return cv2.resize(rgb, (size, size), interpolation=interp)
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(rgb, (nw, nh), interpolation=interp)
    out = np.full((size, size, 3), pad_value, np.uint8)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = small
    return out


def normalize(square: np.ndarray, mean, std) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW, ``(x / 255 - mean) / std``."""
    x = square.astype(np.float32) * (1.0 / 255.0)
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def to_batch(images, config) -> np.ndarray:
    """A list of RGB arrays -> (N, 3, S, S) float32 as ``config`` says."""
    return np.stack([normalize(resize(im, config.input_size, config.resize_mode, config.pad_value),
                               config.mean, config.std) for im in images]) if len(images) else \
        np.zeros((0, 3, config.input_size, config.input_size), np.float32)
