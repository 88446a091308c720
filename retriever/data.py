"""Training pairs <clip frames, shop image>, augmentations for both views, and a sampler that keeps two clips of
the same shop image out of one (global) batch -- they would be false negatives for InfoNCE."""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch

from lpr4m.cli import progress
from lpr4m.errors import BadInput, Problems
from lpr4m.images import check_image, load_rgb
from lpr4m.layout import Dataset
from retriever.crops import crop_boxes, largest_box, normalised_to_pixels
from retriever.preprocess import normalize, resize

logger = logging.getLogger(__name__)


@dataclass
class TrainPair:
    video_id: str
    frame_paths: list[Path]
    frame_boxes: list[list | None]  # one normalised box per kept frame (None = full frame)
    image_id: str
    image_path: Path


def load_pairs(ds: Dataset, problems: Problems | None = None, limit: int | None = None) -> list[TrainPair]:
    """Pairs from ``training_videoinfo``; in a clip with boxes, frames without a box (no product) are dropped."""
    problems = problems or Problems()
    pairs = []
    for clip in ds.training_clips(problems):
        paths = [ds.training_frame_path(f) for f in clip.frame_ids]
        boxes = [largest_box(b) for b in clip.boxes] if clip.boxes else [None] * len(paths)
        keep = [i for i in range(len(paths)) if paths[i].is_file() and (boxes[i] is not None or not clip.has_boxes)]
        img = ds.training_image_path(clip.image_id)
        if not keep or not img.is_file():
            problems.add(BadInput(ds.annotation("training_videoinfo"),
                                  f"clip {clip.video_id}: " + ("no frame files" if not keep else
                                                               f"shop image {img.name} missing"), clip.line),
                         "incomplete_pair")
            continue
        pairs.append(TrainPair(clip.video_id, [paths[i] for i in keep], [boxes[i] for i in keep],
                               clip.image_id, img))
        if limit and len(pairs) >= limit:
            break
    if not pairs:
        raise BadInput(ds.root, "no usable <clip, shop image> training pairs")
    return pairs


class _ReadCheck(torch.utils.data.Dataset):
    """``(index, BadInput or None)`` per path: a Dataset so that DataLoader workers share the reading."""

    def __init__(self, paths: list[Path], read):
        self.paths, self.read = paths, read

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            self.read(self.paths[i])
        except BadInput as err:
            return i, err
        return i, None


def unreadable_images(pairs: list[TrainPair], problems: Problems, read=check_image, workers: int = 0) -> set[Path]:
    """Read every frame and shop image of ``pairs`` once (in ``workers`` processes); each unreadable one is logged
    and counted once (``problems.strict``: the first one stops the run).

    Checking before training rather than when a batch meets the file keeps every batch full (DDP ranks must
    agree on its size) and makes which pairs train independent of worker timing.
    """
    paths = sorted({p for pair in pairs for p in pair.frame_paths} | {pair.image_path for pair in pairs}, key=str)
    loader = torch.utils.data.DataLoader(_ReadCheck(paths, read), batch_size=64, num_workers=workers,
                                         collate_fn=list)
    bad, bar = set(), progress(total=len(paths), desc="checking images", unit="img")
    for results in loader:
        for i, err in results:
            if err is not None:
                problems.add(err, "unreadable_image")
                bad.add(paths[i])
        bar.update(len(results))
    bar.close()
    return bad


def drop_images(pairs: list[TrainPair], bad: set[Path]) -> list[TrainPair]:
    """``pairs`` without the ``bad`` images: a frame leaves its clip; a clip with no frame left, or whose shop image
    is bad, is dropped."""
    if not bad:
        return pairs
    out = []
    for pair in pairs:
        keep = [i for i, p in enumerate(pair.frame_paths) if p not in bad]
        if keep and pair.image_path not in bad:
            out.append(dataclasses.replace(pair, frame_paths=[pair.frame_paths[i] for i in keep],
                                           frame_boxes=[pair.frame_boxes[i] for i in keep]))
    logger.warning("%d unreadable images: %d of %d training pairs dropped", len(bad), len(pairs) - len(out),
                   len(pairs))
    if not out:
        raise BadInput(None, "no training pair has a readable shop image and frame")
    return out


# -- augmentation ----------------------------------------------------------------------------------------------
@dataclass
class AugmentConfig:
    scale: tuple = (0.45, 1.0)  # random resized crop: fraction of the area kept
    ratio: tuple = (0.75, 1.333)
    flip: float = 0.0  # shop images carry text; mirrored text is not a product
    color: float = 0.3  # brightness / contrast / saturation jitter
    hue: float = 0.03
    rotate: float = 12.0  # degrees
    blur: float = 0.2  # probability of a Gaussian blur (motion, focus)
    box_jitter: float = 0.1  # crop padding jitter around a ground-truth box (fraction of the box size)
    grayscale: float = 0.05


def random_resized_crop(rgb: np.ndarray, rng: np.random.Generator, scale, ratio) -> np.ndarray:
    h, w = rgb.shape[:2]
    area = h * w
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            return rgb[y0:y0 + ch, x0:x0 + cw]
    return rgb


def augment(rgb: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Photometric + geometric augmentation on a uint8 RGB image (cv2, no torchvision dependency)."""
    out = random_resized_crop(rgb, rng, cfg.scale, cfg.ratio)
    if cfg.rotate and rng.random() < 0.5:
        h, w = out.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-cfg.rotate, cfg.rotate)), 1.0)
        out = cv2.warpAffine(out, m, (w, h), borderMode=cv2.BORDER_REFLECT101)
    if cfg.flip and rng.random() < cfg.flip:
        out = out[:, ::-1]
    x = out.astype(np.float32)
    if cfg.color:
        x *= rng.uniform(1 - cfg.color, 1 + cfg.color)  # brightness
        mean = x.mean()
        x = (x - mean) * rng.uniform(1 - cfg.color, 1 + cfg.color) + mean  # contrast
        gray = x.mean(axis=2, keepdims=True)
        x = (x - gray) * rng.uniform(1 - cfg.color, 1 + cfg.color) + gray  # saturation
    out = np.clip(x, 0, 255).astype(np.uint8)
    if cfg.hue:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + int(rng.uniform(-cfg.hue, cfg.hue) * 180)) % 180).astype(np.uint8)
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if cfg.grayscale and rng.random() < cfg.grayscale:
        out = np.repeat(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    if cfg.blur and rng.random() < cfg.blur:
        out = cv2.GaussianBlur(out, (5, 5), float(rng.uniform(0.3, 1.5)))
    return np.ascontiguousarray(out)


def frame_view(rgb: np.ndarray, box, rng: np.random.Generator | None, cfg: AugmentConfig | None) -> np.ndarray:
    """The product region of a training frame: its box (with jittered padding) or the full frame."""
    if box is not None:
        h, w = rgb.shape[:2]
        pad = 0.05 if rng is None or cfg is None else float(rng.uniform(0, cfg.box_jitter))
        crops = crop_boxes(rgb, [normalised_to_pixels(box, w, h)], pad)
        if crops:
            rgb = crops[0]
    return rgb if rng is None or cfg is None else augment(rgb, rng, cfg)


class ImageStore:
    """Decoded training images, shrunk to ``max_side`` once (a few hundred MB for a small set, no re-decoding)."""

    def __init__(self, max_side: int | None = None, problems: Problems | None = None, in_memory: bool = True):
        self.max_side = max_side
        self.in_memory = in_memory
        self.problems = problems or Problems()
        self._cache: dict[Path, np.ndarray] = {}

    def get(self, path: Path) -> np.ndarray:
        if path in self._cache:
            return self._cache[path]
        rgb = load_rgb(path)
        if self.max_side and max(rgb.shape[:2]) > self.max_side:
            s = self.max_side / max(rgb.shape[:2])
            rgb = cv2.resize(rgb, (max(1, round(rgb.shape[1] * s)), max(1, round(rgb.shape[0] * s))),
                             interpolation=cv2.INTER_AREA)
        if self.in_memory:
            self._cache[path] = rgb
        return rgb


def to_input(rgb: np.ndarray, config) -> torch.Tensor:
    return torch.from_numpy(normalize(resize(rgb, config.input_size, config.resize_mode, config.pad_value),
                                      config.mean, config.std))


# -- sampler ---------------------------------------------------------------------------------------------------
class UniqueImageBatchSampler:
    """Batches of pair indices in which no shop image appears twice across the GLOBAL batch (all ranks).

    Every rank builds the same global batches from ``seed + epoch`` and takes its own slice, so the negatives
    gathered from other ranks are never false negatives either. Incomplete last batches are dropped (ranks
    must agree on the batch size for all_gather).
    """

    def __init__(self, image_ids: Sequence[str], batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.image_ids = list(image_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._cached: tuple[int, list[list[int]]] | None = None
        n_images = len(set(self.image_ids))
        if n_images < batch_size * world_size:
            raise BadInput(None, f"global batch {batch_size * world_size} needs at least that many distinct shop "
                                 f"images; the data has {n_images} (lower --batch-size)")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        if self._cached is not None and self._cached[0] == self.epoch:
            return self._cached[1]
        rng = np.random.default_rng(self.seed + 1000003 * self.epoch)
        gb = self.batch_size * self.world_size
        order = rng.permutation(len(self.image_ids)).tolist()
        batches, open_batches = [], []  # open batch = (indices, image ids in it)
        for idx in order:
            img = self.image_ids[idx]
            for b in open_batches:
                if img not in b[1]:
                    b[0].append(idx)
                    b[1].add(img)
                    if len(b[0]) == gb:
                        batches.append(b[0])
                        open_batches.remove(b)
                    break
            else:
                open_batches.append(([idx], {img}))
                if gb == 1:
                    batches.append(open_batches.pop()[0])
        perm = rng.permutation(len(batches))
        self._cached = (self.epoch, [batches[i] for i in perm])
        return self._cached[1]

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.global_batches():
            yield b[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __len__(self) -> int:
        return len(self.global_batches())
