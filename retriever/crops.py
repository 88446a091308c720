"""What the embedder sees of a clip: ground-truth crops, detector crops or full frames, on up to N frames."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from lpr4m.errors import BadInput
from retriever.aggregate import l2_normalise

logger = logging.getLogger(__name__)

CROP_MODES = ("gt", "detector", "none")
CROP_POLICIES = ("fuse", "crop")
# detector score at which a crop starts to count, and where it alone counts (see crop_weight)
FUSE_LOW, FUSE_HIGH = 0.4, 0.6


def even_indices(n_total: int, n: int = 10) -> list[int]:
    """Up to ``n`` indices spread evenly over ``range(n_total)`` (first and last included), as RICE samples."""
    if n_total <= 0 or n <= 0:
        return []
    if n_total <= n:
        return list(range(n_total))
    return sorted(set(np.linspace(0, n_total - 1, num=n).round().astype(int).tolist()))


def normalised_to_pixels(box, w: int, h: int) -> np.ndarray:
    """A normalised [x1, y1, x2, y2] -> pixel coordinates (float32) in a ``w`` x ``h`` image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([x1 * w, y1 * h, x2 * w, y2 * h], np.float32)


def crop_boxes(rgb: np.ndarray, boxes_xyxy_pixels, pad: float = 0.05, min_size: int = 2) -> list[np.ndarray]:
    """One crop per pixel box, each side widened by ``pad`` x the box size and clipped to the image.

    Boxes smaller than ``min_size`` pixels after clipping are dropped (a crop must show something).
    """
    h, w = rgb.shape[:2]
    crops = []
    for box in np.asarray(boxes_xyxy_pixels, np.float32).reshape(-1, 4):
        x1, y1, x2, y2 = box
        if not np.all(np.isfinite(box)) or x2 < x1 or y2 < y1:
            continue
        bw, bh = x2 - x1, y2 - y1
        x1, x2 = max(0, int(np.floor(x1 - pad * bw))), min(w, int(np.ceil(x2 + pad * bw)))
        y1, y2 = max(0, int(np.floor(y1 - pad * bh))), min(h, int(np.ceil(y2 + pad * bh)))
        if x2 - x1 >= min_size and y2 - y1 >= min_size:
            crops.append(np.ascontiguousarray(rgb[y1:y2, x1:x2]))
    return crops


def largest_box(boxes) -> list | None:
    """The largest of some normalised boxes (the product being presented is usually the biggest)."""
    boxes = [b for b in (boxes or []) if b is not None]
    if not boxes:
        return None
    return max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))


def gt_crops(frames: Sequence[np.ndarray], boxes: Sequence[list | None], pad: float = 0.05,
             all_boxes: bool = False) -> list[np.ndarray]:
    """Crops by normalised ground-truth boxes; frames without a box are left out, unless no frame has one."""
    out = []
    for rgb, frame_boxes in zip(frames, boxes):
        if not frame_boxes:
            continue
        chosen = frame_boxes if all_boxes else [largest_box(frame_boxes)]
        h, w = rgb.shape[:2]
        out += crop_boxes(rgb, [normalised_to_pixels(b, w, h) for b in chosen], pad)
    return out if out else list(frames)


def load_detector(weights, device: str = "cpu", conf: float = 0.25):
    """The detector package's ``load_detector``, imported only when detector crops are asked for."""
    try:
        from detector import load_detector as _load
    except ImportError as e:
        raise BadInput(weights, f"--crops detector needs the detector package ({e})") from None
    return _load(weights, device=device, conf=conf)


def detector_views(frames: Sequence[np.ndarray], detector, policy: str = "fuse", pad: float = 0.05):
    """The images to embed for detector-cropped frames, and per frame ``(crop row, full-frame row, weight)``
    saying how ``combine_views`` makes its embedding (a row is None when that image is not embedded)."""
    images, plan = [], []
    for rgb, det in zip(frames, detector.detect(list(frames))):
        xyxy = np.asarray(det.xyxy, np.float32).reshape(-1, 4)
        scores = np.asarray(det.scores, np.float32).reshape(-1)
        best = int(np.argmax(scores)) if len(scores) else None
        crops = crop_boxes(rgb, xyxy[best:best + 1], pad) if best is not None else []
        weight = crop_weight(scores[best], policy) if crops else 0.0
        crop_row = full_row = None
        if crops:
            crop_row = len(images)
            images.append(crops[0])
        if weight < 1.0:
            full_row = len(images)
            images.append(rgb)
        plan.append((crop_row, full_row, weight))
    return images, plan


def combine_views(embs: np.ndarray, plan) -> np.ndarray:
    """One embedding per frame from ``detector_views``' plan."""
    rows = []
    for crop_row, full_row, weight in plan:
        if crop_row is None or full_row is None:
            rows.append(embs[full_row if crop_row is None else crop_row])
        else:
            rows.append(fuse(embs[crop_row], embs[full_row], [weight])[0])
    return np.stack(rows).astype(np.float32)


def detector_crops(frames: Sequence[np.ndarray], detector, pad: float = 0.05) -> list[np.ndarray]:
    """The best detection of each frame; a frame with none contributes its full frame."""
    images, plan = detector_views(frames, detector, "crop", pad)
    return [images[c if c is not None else f] for c, f, _ in plan]


def crop_weight(score: float, policy: str = "fuse") -> float:
    """How much a detector crop counts against its full frame: 0 (full frame) to 1 (crop alone).

    ``fuse`` ramps linearly from 0 at score ``FUSE_LOW`` to 1 at ``FUSE_HIGH``: a confident detection (the
    detector's own world) is the crop, an unsure one on unfamiliar footage leans on the whole frame, so an unsure
    detector costs nothing against full frames; ``crop`` is the crop alone whatever its score.
    """
    if policy == "crop":
        return 1.0
    if policy != "fuse":
        raise ValueError(f"unknown crop policy {policy!r}; expected one of {CROP_POLICIES}")
    return float(min(1.0, max(0.0, (float(score) - FUSE_LOW) / (FUSE_HIGH - FUSE_LOW))))


def fuse(crop_embs: np.ndarray, full_emb: np.ndarray, weights) -> np.ndarray:
    """Rows ``w * crop + (1 - w) * full``, re-normalised: one row per crop of a frame."""
    crop_embs = np.asarray(crop_embs, np.float32).reshape(len(weights), -1)
    w = np.asarray(weights, np.float32).reshape(-1, 1)
    return l2_normalise(w * crop_embs + (1 - w) * np.asarray(full_emb, np.float32).reshape(1, -1))


def clip_inputs(frames: Sequence[np.ndarray], mode: str = "none", boxes: Sequence[list | None] | None = None,
                detector=None, pad: float = 0.05) -> list[np.ndarray]:
    """The images to embed for one clip under ``--crops gt|detector|none``."""
    if mode == "none":
        return list(frames)
    if mode == "gt":
        return gt_crops(frames, boxes if boxes is not None else [None] * len(frames), pad)
    if mode == "detector":
        if detector is None:
            raise ValueError("--crops detector needs a detector")
        return detector_crops(frames, detector, pad)
    raise ValueError(f"unknown crop mode {mode!r}; expected one of {CROP_MODES}")
