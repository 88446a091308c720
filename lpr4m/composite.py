"""Detection data from a shop catalogue: real shop images held up in real frames, with exact boxes.

    python -m lpr4m composite OUT --products DIR [DIR ...] --backgrounds PATH [PATH ...]
                              [--test-products 0.25] [--test-backgrounds PATH ...] [--clips 300] [--seed 0]

Most platforms have shop images and stream recordings but no boxes. This writes an LPR4M root that
``detector/train.py`` trains on unchanged:

- *products*: every shop image of the given folders (an LPR4M root gives its ``training_image/`` and the main
  views in ``gallery/``). A packshot on a plain background is cut out along the product's outline; any other image
  is used whole, as a card. The manifest counts each kind.
- *backgrounds*: frames of videos (read in order, never seeking) and images; they also serve as frames with no
  product at all.
- *frames*: the product is held up by a hand (fingers in front of it, an arm from the frame edge), in perspective
  and rotation, small to frame-filling, sometimes cut by the frame border; motion blur, a cast shadow, lighting,
  colour and white-balance shifts, sensor noise and JPEG artefacts. Other products of the same split stand in the
  scene without a hand and carry no box, since LPR4M boxes only the presented product. The box is the extent of
  the product's visible pixels (after the hand, blur and the frame edge), as in ``lpr4m synth``.
- *splits*: a seeded ``--test-products`` fraction of the products goes to the test split (``query/``, boxes in
  ``test_frameid2gtbox``, its shop images in ``gallery/``), drawn on ``--test-backgrounds`` when given, so the
  test split holds products and footage that training never saw.

The same seed and inputs give the same dataset, whatever ``--workers``. Bad images and videos are skipped and
counted (``--strict`` stops at the first). The root is built aside and renamed into place.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import uuid
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from lpr4m import render as R
from lpr4m.annotations import TrainingClip, write_id_map, write_id_text, write_training_videoinfo
from lpr4m.cli import (Parser, emit_json, fraction, nonnegative_int, output_file, output_folder, positive_int,
                       progress, setup_logging)
from lpr4m.errors import BadInput, Problems
from lpr4m.ids import GALLERY_NAME_RE, IMAGE_ID_RE, IMAGE_SUFFIXES
from lpr4m.io import new_folder, write_json
from lpr4m.synth import VIDEO_SUFFIXES, frame_size_arg, make_uuid, rng_for

logger = logging.getLogger(__name__)

PLAIN_TOL = 18  # max channel difference from the border colour that still counts as background (0..255)
MIN_FILL, MAX_FILL = 0.05, 0.97  # a cut-out covering less or more of its image than this is not trusted
MIN_SIDE = 24  # smaller shop images carry too little to place in a frame
MAX_BACKGROUNDS = 2000  # background frames held in memory (~1 MB each at 640x360)
MIN_VISIBLE = 0.3  # less of the product showing than this: drawn again elsewhere, else the frame has no product
SKIN = ((255, 224, 196), (241, 194, 167), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 56, 36))
ID_NAMESPACE = uuid.UUID("6f1c2a0e-3b7d-4c55-9a61-0d2f4b8e9c17")  # image ids for file names that are not ids


# -- products ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Product:
    """A shop image and what it became; pixels are read where they are needed, so a catalogue of any size fits."""

    image_id: str
    title: str
    source: Path
    kind: str  # "cutout" or "card"


def cut_out(rgb: np.ndarray, tol: int = PLAIN_TOL) -> tuple[R.Sprite, str]:
    """The product as a sprite, cut along its outline when the image border is one plain colour (a packshot),
    else the whole image as a card. Background = pixels near the border colour and connected to the border, so
    white parts inside the product stay."""
    h, w = rgb.shape[:2]
    img = rgb.astype(np.float32)
    ring = np.concatenate([img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3), img[:, :3].reshape(-1, 3),
                           img[:, -3:].reshape(-1, 3)])
    colour = np.median(ring, axis=0)
    card = R.Sprite(img.copy(), np.ones((h, w), np.float32))
    if np.percentile(np.abs(ring - colour).max(axis=1), 90) > tol:
        return card, "card"
    near = (np.abs(cv2.GaussianBlur(img, (3, 3), 0) - colour).max(axis=2) <= tol).astype(np.uint8)
    _, labels = cv2.connectedComponents(near, connectivity=4)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    border_labels = np.unique(edge[np.concatenate([near[0], near[-1], near[:, 0], near[:, -1]]) > 0])
    fg = ~np.isin(labels, border_labels) | (near == 0)
    fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    if not MIN_FILL <= fg.mean() <= MAX_FILL:
        return card, "card"
    ys, xs = np.nonzero(fg)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    alpha = cv2.GaussianBlur(fg.astype(np.float32), (3, 3), 0)[y0:y1, x0:x1]
    return R.Sprite(img[y0:y1, x0:x1] * alpha[..., None], alpha), "cutout"


def _image_id(stem: str) -> tuple[str, str]:
    """(image_id, title) for a shop image file: its id when the name is one, else a stable id made from the name."""
    m = GALLERY_NAME_RE.match(stem)
    if m:
        return m["image"], m["image"]
    if IMAGE_ID_RE.match(stem):
        return stem, stem
    return str(uuid.uuid5(ID_NAMESPACE, stem)), stem


def find_product_files(folders) -> list[tuple[str, str, Path]]:
    """(image_id, title, path) per product: an LPR4M root gives ``training_image/*`` and the main view (``-0``) of
    each ``gallery/<live>/`` product; any other folder every image under it. The first file of an id wins."""
    found: dict[str, tuple[str, str, Path]] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise BadInput(folder, "products folder not found (expected shop images or an LPR4M root)")
        if (folder / "training_image").is_dir() or (folder / "gallery").is_dir():
            files = sorted((folder / "training_image").glob("*")) + \
                sorted(p for p in (folder / "gallery").glob("*/*") if GALLERY_NAME_RE.match(p.stem)
                       and p.stem.endswith("-0"))
        else:
            # a dataset inside the folder (an earlier composite, say) holds frames, not shop images
            nested = sorted(p.parent for p in folder.rglob("annotations") if p.is_dir())
            for root in nested:
                logger.warning("products: skipping %s, a dataset inside %s (give it as its own --products ROOT)",
                               root, folder)
            files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(r in p.parents for r in nested))
        for path in files:
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                image_id, title = _image_id(path.stem)
                found.setdefault(image_id, (image_id, title, path))
    if not found:
        raise BadInput(folders[0] if len(folders) == 1 else None,
                       "no shop images found (expected .jpg/.png/.webp/.bmp files)")
    return list(found.values())


def read_shop_image(path, max_side: int = 400) -> np.ndarray:
    """The shop image as RGB, its long side at most ``max_side``; BadInput when unreadable or too small."""
    from lpr4m.images import load_rgb
    rgb = load_rgb(path)
    if min(rgb.shape[:2]) < MIN_SIDE:
        raise BadInput(path, f"image is {rgb.shape[1]}x{rgb.shape[0]} (expected at least {MIN_SIDE}x{MIN_SIDE})")
    scale = max_side / max(rgb.shape[:2])
    if scale < 1:
        rgb = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return rgb


def _inspect(path: Path) -> tuple[str | None, str | None]:
    """(kind, None) for a usable shop image, (None, error) otherwise; runs in the worker pool."""
    try:
        return cut_out(read_shop_image(path))[1], None
    except BadInput as err:
        return None, str(err)


def load_products(folders, problems: Problems, pool=None) -> list[Product]:
    """Every usable product of ``folders``, each read once to learn whether it cuts out; bad ones counted."""
    files = find_product_files(folders)
    paths = [p for _, _, p in files]
    results = pool.imap(_inspect, paths, chunksize=8) if pool else map(_inspect, paths)
    results = progress(results, total=len(files), desc="products", unit="image")
    products = []
    for (image_id, title, path), (kind, error) in zip(files, results):
        if kind is None:
            problems.add(BadInput(None, error), "bad_product_image")
        else:
            products.append(Product(image_id, title, path, kind))
    return products


@lru_cache(maxsize=256)
def _sprite(path: Path) -> R.Sprite:
    return cut_out(read_shop_image(path))[0]


# -- backgrounds ---------------------------------------------------------------------------------------------
def _background_files(paths) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                            and p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise BadInput(path, "background not found (expected a video, an image or a folder of them)")
    return files


def load_backgrounds(paths, size_wh, per_video: int, problems: Problems, max_frames: int = MAX_BACKGROUNDS
                     ) -> list[np.ndarray]:
    """uint8 frames scaled to cover ``size_wh``: up to ``per_video`` spread evenly over each video (read in order,
    so a file with broken seeking still works) and the images, at most ``max_frames`` in all (memory stays bounded
    whatever the number of recordings: files are spread over, and fewer frames taken from each)."""
    from lpr4m.frames import sample_frames
    from lpr4m.images import load_rgb
    files = _background_files(paths)
    if len(files) > max_frames:
        files = [files[i * len(files) // max_frames] for i in range(max_frames)]
    per_video = max(1, min(per_video, max_frames // len(files))) if files else per_video
    out = []
    for path in progress(files, desc="backgrounds", unit="file"):
        try:
            if path.suffix.lower() in VIDEO_SUFFIXES:
                frames = [f.rgb for f in sample_frames(path, mode="even", n=per_video, seek=False)]
                if not frames:
                    raise BadInput(path, "video has no decodable frames")
            else:
                frames = [load_rgb(path)]
        except BadInput as err:
            problems.add(err, "bad_background")
            continue
        out += [R.fit_background(f, size_wh).astype(np.uint8) for f in frames]
    if not out:
        raise BadInput(paths[0] if len(paths) == 1 else None, "no readable background video or image")
    return out


# -- one frame -----------------------------------------------------------------------------------------------
def _place(canvas: np.ndarray, sprite: R.Sprite, pose: R.Pose, focal: float, rng, blur: int = 0):
    """Warp ``sprite`` to ``pose``; returns (rgb_premult, alpha, x0, y0, H) or None when it falls outside."""
    H, W = canvas.shape[:2]
    Hm = R.homography(sprite.size, pose, focal=focal)
    warped = R.warp_sprite(sprite, Hm, W, H, pad=blur + int(0.15 * pose.height))
    if warped is None:
        return None
    rgb, a, x0, y0 = warped
    if blur:
        k = R.motion_kernel(blur, float(rng.uniform(0, 180)))
        rgb = cv2.filter2D(rgb, -1, k, borderType=cv2.BORDER_CONSTANT)
        a = cv2.filter2D(a, -1, k, borderType=cv2.BORDER_CONSTANT)
    return rgb, a, x0, y0, Hm


def _colour_shift(rng, low: float, high: float) -> np.ndarray:
    return (rng.uniform(low, high) * np.array([rng.uniform(0.9, 1.1), 1.0, rng.uniform(0.9, 1.1)])).astype(
        np.float32)


def _distractor(canvas, sprite: R.Sprite, rng) -> None:
    """A product standing in the scene, not presented: smaller, upright, often out of focus; no box."""
    H, W = canvas.shape[:2]
    pose = R.Pose(rng.uniform(0, W), rng.uniform(0.3, 1.0) * H, rng.uniform(0.08, 0.3) * H,
                  rng.uniform(-30, 30), rng.uniform(-10, 10), rng.uniform(-8, 8))
    placed = _place(canvas, sprite, pose, 4.0, rng)
    if placed is None:
        return
    rgb, a, x0, y0, _ = placed
    if rng.random() < 0.5:
        k = int(rng.integers(1, 4)) * 2 + 1
        rgb, a = cv2.GaussianBlur(rgb, (k, k), 0), cv2.GaussianBlur(a, (k, k), 0)
    R.over(canvas, rgb * _colour_shift(rng, 0.7, 1.1), a, x0, y0)


def compose_frame(rng, background: np.ndarray, sprite: R.Sprite | None, distractors: list[R.Sprite],
                  size_wh) -> tuple[np.ndarray, list[float] | None]:
    """One frame: a crop of ``background``, the ``distractors`` standing in it, ``sprite`` held up by a hand
    (None: no product presented). Returns uint8 RGB and the presented product's normalised xyxy box (None when
    it is not presented or too little of it shows)."""
    W, H = size_wh
    bh, bw = background.shape[:2]
    y, x = int(rng.integers(0, bh - H + 1)), int(rng.integers(0, bw - W + 1))
    canvas = background[y:y + H, x:x + W].astype(np.float32)
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1].copy()
    for d in distractors:
        _distractor(canvas, d, rng)
    box = None
    if sprite is not None:
        box = _present(canvas, sprite, rng)
    canvas *= R.light_map(rng, (W, H)) * _colour_shift(rng, 0.75, 1.2)
    canvas += rng.normal(0, rng.uniform(0, 6), canvas.shape[:2])[..., None].astype(np.float32)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), box


def _present(canvas: np.ndarray, sprite: R.Sprite, rng) -> list[float] | None:
    """Draw ``sprite`` held in a hand; returns its box (None when less than MIN_VISIBLE of it would show)."""
    H, W = canvas.shape[:2]
    sw, sh = sprite.size
    for _ in range(4):
        height = H * math.exp(rng.uniform(math.log(0.2), math.log(1.1)))
        edge = rng.random() < 0.15  # pushed against the frame border, so the border cuts it
        cx = rng.uniform(-0.05, 0.2) if edge else rng.uniform(0.2, 0.8)
        cx = (1 - cx if rng.random() < 0.5 else cx) * W
        pose = R.Pose(cx, rng.uniform(0.3, 0.75) * H, height, rng.uniform(-40, 40), rng.uniform(-30, 30),
                      float(np.clip(rng.normal(0, 15), -45, 45)))
        blur = int(rng.integers(5, 15)) if rng.random() < 0.25 else 0
        placed = _place(canvas, sprite, pose, rng.uniform(2.2, 4.0), rng, blur)
        if placed is None:
            continue
        rgb, a, x0, y0, Hm = placed
        side = -1 if rng.random() < 0.5 else 1
        finger_w = max(3.0, 0.07 * min(height, H))
        held = rng.random() < 0.9
        hand = np.zeros_like(a)
        if held:
            hand, wrist = R.hand_mask(a.shape, Hm, (sw, sh), "side" if rng.random() < 0.6 else "below", side,
                                      finger_w, depth=rng.uniform(0.12, 0.3), x0=x0, y0=y0)
        visible = a * (1 - hand)
        full = R.polygon_area(R.project(Hm, [[0, 0], [sw, 0], [sw, sh], [0, sh]])) * float(sprite.alpha.mean())
        if (visible >= 0.5).sum() < MIN_VISIBLE * max(full, 1.0):
            continue
        skin = np.array(SKIN[int(rng.integers(len(SKIN)))], np.float32) * rng.uniform(0.8, 1.1)
        if held:
            shoulder = (wrist[0] + side * rng.uniform(0.1, 0.5) * W, H * rng.uniform(1.05, 1.4))
            sleeve = tuple(int(c) for c in rng.integers(0, 256, 3))
            R.draw_arm(canvas, shoulder, wrist, tuple(float(c) for c in skin), sleeve, 3.5 * finger_w)
            cv2.circle(canvas, (int(wrist[0]), int(wrist[1])), int(1.6 * finger_w), tuple(float(c) for c in skin), -1,
                       cv2.LINE_AA)
        if rng.random() < 0.5:  # a soft shadow cast on what is behind
            d = (np.array([rng.uniform(-1, 1), rng.uniform(0.2, 1)]) * 0.06 * height).astype(int)
            shadow = cv2.GaussianBlur(a, (0, 0), max(1.0, 0.03 * height)) * rng.uniform(0.2, 0.5)
            R.over(canvas, np.zeros(a.shape + (3,), np.float32), shadow, x0 + d[0], y0 + d[1])
        h_, w_ = a.shape
        roi = canvas[y0:y0 + h_, x0:x0 + w_]
        roi[:] = roi * (1 - a[..., None]) + rgb * _colour_shift(rng, 0.65, 1.3)
        roi[:] = roi * (1 - hand[..., None]) + skin * hand[..., None]
        ys, xs = np.nonzero(visible >= 0.5)
        return [round((x0 + xs.min()) / W, 6), round((y0 + ys.min()) / H, 6),
                round((x0 + xs.max() + 1) / W, 6), round((y0 + ys.max() + 1) / H, 6)]
    return None


# -- clips, in worker processes ------------------------------------------------------------------------------
_STATE: dict = {}  # set before the pool forks: products, backgrounds and the frame settings


@dataclass(frozen=True)
class ClipJob:
    index: int
    split: str  # "train" or "test"
    video_id: str
    product: int  # index into the products
    folder: str  # where the frames go, inside the staging root


def render_clip(job: ClipJob) -> list[list[float] | None]:
    """Write one clip's frames; returns each frame's box. A pure function of the job and the global state."""
    s = _STATE
    rng = rng_for(s["seed"], 7, job.index)
    products, backgrounds = s["products"], s["backgrounds"][job.split]
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    others = [i for i in s["splits"][job.split] if i != job.product]  # a test product never shows in training
    n_distractors = min(int(rng.integers(0, 3)), len(others))
    picked = rng.choice(others, n_distractors, replace=False) if n_distractors else []
    distractors = [_sprite(products[i].source).resized(160) for i in picked]
    sprite = _sprite(products[job.product].source)
    boxes = []
    out = Path(s["root"]) / job.folder / job.video_id
    out.mkdir(parents=True, exist_ok=True)
    for i in range(s["frames_per_clip"]):
        shown = None if rng.random() < s["empty"] else sprite
        rgb, box = compose_frame(rng, background, shown, distractors, s["size_wh"])
        Image.fromarray(rgb).save(out / f"{job.video_id}-{i:04d}.jpg", format="JPEG",
                                  quality=int(rng.integers(40, 96)))
        boxes.append(box)
    return boxes


# -- the dataset ---------------------------------------------------------------------------------------------
def _split_products(n: int, test_fraction: float, seed: int) -> set[int]:
    if test_fraction <= 0 or n < 2:
        return set()
    k = n if test_fraction >= 1 else min(n - 1, max(1, round(test_fraction * n)))
    return set(rng_for(seed, 8).permutation(n)[:k].tolist())


def _plan(items: list[Product], test_products: float, clips: int, frames_per_clip: int, products_per_live: int,
          seed: int) -> tuple[list[ClipJob], dict, dict]:
    """The clips to render, the lives (products per live, by split) and the products of each split."""
    test_set = _split_products(len(items), test_products, seed)
    by_split = {"train": [i for i in range(len(items)) if i not in test_set], "test": sorted(test_set)}
    lives: dict[str, dict[str, list[int]]] = {"train": {}, "test": {}}
    jobs: list[ClipJob] = []
    rng = rng_for(seed, 9)
    for split, members in by_split.items():
        for j in range(0, len(members), products_per_live):
            lives[split][make_uuid(seed, 10, split == "test", j)] = members[j:j + products_per_live]
        start = 1_600_000_000_000 if split == "train" else 1_700_000_000_000
        live_ids = list(lives[split])
        for k in range(round(clips * len(members) / len(items))):
            live_id = live_ids[k % len(live_ids)]
            product = lives[split][live_id][int(rng.integers(len(lives[split][live_id])))]
            video_id = f"{live_id}-{start}-{start + frames_per_clip * 1000}"
            start += (frames_per_clip + 1) * 1000
            jobs.append(ClipJob(len(jobs), split, video_id, product, "training_video" if split == "train" else "query"))
    return jobs, lives, by_split


def composite(out, products, backgrounds, test_backgrounds=None, test_products: float = 0.25, clips: int = 300,
              frames_per_clip: int = 5, frame_size=(640, 360), empty: float = 0.1, per_video: int = 24,
              products_per_live: int = 16, seed: int = 0, workers: int | None = None, strict: bool = False) -> dict:
    """Write the composite dataset to ``out`` (new or empty); returns the summary ``main`` prints."""
    problems = Problems(strict=strict)
    W, H = frame_size
    cover = (round(W * 1.2), round(H * 1.2))  # room for the crop to move
    workers = workers or os.cpu_count() or 1
    fork = os.name == "posix" and workers > 1
    with new_folder(out, "composite") as root:  # a used OUT is refused before any work
        with get_context("fork").Pool(workers) if fork else contextlib.nullcontext() as pool:
            items = load_products(products, problems, pool)
        if len(items) < 2:
            raise BadInput(products[0] if len(products) == 1 else None,
                           f"{len(items)} readable shop image(s): composites need at least 2 products")
        bgs = {"train": load_backgrounds(backgrounds, cover, per_video, problems)}
        bgs["test"] = load_backgrounds(test_backgrounds, cover, per_video, problems) if test_backgrounds \
            else bgs["train"]
        jobs, lives, by_split = _plan(items, test_products, clips, frames_per_clip, products_per_live, seed)
        _STATE.update(root=str(root), seed=seed, products=items, backgrounds=bgs, size_wh=(W, H),
                      frames_per_clip=frames_per_clip, empty=empty, splits=by_split)
        try:  # the pool forks after _STATE is set: workers inherit it
            with get_context("fork").Pool(workers) if fork else contextlib.nullcontext() as pool:
                rendered = pool.imap(render_clip, jobs, chunksize=2) if pool else map(render_clip, jobs)
                results = list(progress(rendered, total=len(jobs), desc="clips", unit="clip"))
        finally:
            _STATE.clear()
        summary = _write_annotations(root, items, jobs, results, lives, frames_per_clip)
        kinds = {"cutout": sum(p.kind == "cutout" for p in items), "card": sum(p.kind == "card" for p in items)}
        summary.update(seed=seed, frame_size=[W, H], products=dict(kinds, total=len(items)),
                       backgrounds={"train_frames": len(bgs["train"]),
                                    "test_frames": len(bgs["test"]) if test_backgrounds else "same as train"},
                       problems=problems.as_dict() if problems.total else None)
        write_json(root / "composite_manifest.json", {
            **summary, "products_by_split": {s: [items[i].image_id for i in m] for s, m in by_split.items()},
            "product_kinds": {p.image_id: p.kind for p in items},
            "sources": {"products": [str(p) for p in products], "backgrounds": [str(p) for p in backgrounds],
                        "test_backgrounds": [str(p) for p in test_backgrounds or []]}})
    return summary


def _write_annotations(root: Path, items: list[Product], jobs: list[ClipJob], results, lives, frames_per_clip) -> dict:
    ann = root / "annotations"
    counts = {s: {"products": sum(len(m) for m in lives[s].values()), "clips": 0, "frames": 0, "boxes": 0}
              for s in ("train", "test")}
    clips, gt_boxes, gt_images = [], {}, {}
    for job, boxes in zip(jobs, results):
        c = counts[job.split]
        c["clips"] += 1
        c["frames"] += len(boxes)
        c["boxes"] += sum(b is not None for b in boxes)
        frame_ids = [f"{job.video_id}-{i:04d}" for i in range(frames_per_clip)]
        p = items[job.product]
        if job.split == "train":
            clips.append(TrainingClip(video_id=job.video_id, frame_ids=frame_ids,
                                      boxes=[[b] if b else [] for b in boxes], image_id=p.image_id,
                                      image_title=p.title))
        else:
            gt_boxes.update((f, [b] if b else []) for f, b in zip(frame_ids, boxes))
            gt_images[job.video_id] = [p.image_id]
    ann.mkdir(parents=True, exist_ok=True)
    for live_id, members in lives["train"].items():
        for i in members:
            _save(root / "training_image" / f"{items[i].image_id}.jpg", read_shop_image(items[i].source))
    for live_id, members in lives["test"].items():
        for i in members:
            _save(root / "gallery" / live_id / f"{items[i].image_id}-0.jpg", read_shop_image(items[i].source))
    if clips:
        write_training_videoinfo(ann / "training_videoinfo.txt", clips)
    if gt_images:
        write_id_map(ann / "test_videoid_to_gtimage.json", gt_images)
        write_id_map(ann / "test_liveid_to_gallery.json", {lv: [items[i].image_id for i in m]
                                                           for lv, m in lives["test"].items()})
        write_id_map(ann / "test_frameid2gtbox.json", gt_boxes)
        write_id_text(ann / "test_image_title.txt", {items[i].image_id: items[i].title
                                                     for m in lives["test"].values() for i in m})
    return counts


def _save(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format="JPEG", quality=95)


# -- CLI -----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m lpr4m composite", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=output_folder, help="new (or empty) folder for the dataset")
    ap.add_argument("--products", nargs="+", required=True,
                    help="folders of shop images, or LPR4M roots (training_image/ and gallery/ main views)")
    ap.add_argument("--backgrounds", nargs="+", required=True, help="videos, images or folders of them")
    ap.add_argument("--test-backgrounds", nargs="+",
                    help="backgrounds for the test split only (default: the same as training)")
    ap.add_argument("--test-products", type=fraction, default=0.25,
                    help="fraction of the products whose clips form the test split (1: all; 0: none)")
    ap.add_argument("--clips", type=positive_int, default=300, help="clips in all, shared by products")
    ap.add_argument("--frames-per-clip", type=positive_int, default=5)
    ap.add_argument("--frame-size", type=frame_size_arg, default=(640, 360), help="WIDTHxHEIGHT")
    ap.add_argument("--empty", type=fraction, default=0.1, help="share of frames with no product presented")
    ap.add_argument("--per-video", type=positive_int, default=24, help="background frames taken from each video")
    ap.add_argument("--seed", type=nonnegative_int, default=0)
    ap.add_argument("--workers", type=positive_int, help="processes (default: all cores)")
    ap.add_argument("--strict", action="store_true", help="stop at the first bad image or video")
    ap.add_argument("--out-json", type=output_file, help="write the JSON summary here instead of stdout")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    summary = composite(args.out, args.products, args.backgrounds, args.test_backgrounds, args.test_products,
                        args.clips, args.frames_per_clip, args.frame_size, args.empty, args.per_video,
                        seed=args.seed, workers=args.workers, strict=args.strict)
    emit_json(summary, args.out_json)
    return 0
