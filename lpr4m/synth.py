"""Synthetic LPR4M-mini: a complete dataset in the LPR4M layout, drawn procedurally, with exact boxes.

    python -m lpr4m synth OUT [--seed 0] [--preset test|demo|bench] [--scale 2] [--backgrounds DIR]

What is in it (see DESIGN.md for the layout):

- *lives*: each has a room (procedural wall/shelves or a frame from ``--backgrounds``), one presenter (head,
  hair, torso, arms) and a set of products. Products come in *families* of look-alikes inside a live: the same
  product with one property changed (body colour, print pattern, container shape or brand label), so the gallery
  a query is ranked in always holds hard negatives. Training lives and test lives never share a product.
- *clips*: the presenter holds ONE product in one hand (fingers in front of the product) and moves it: position,
  distance (scale), yaw/pitch/roll (viewpoint), camera shake, lighting changes, motion blur, the other hand
  passing in front (occlusion), the product put away for part of the clip (visible duration), other products on
  shelves or on a table (product number).
- *boxes*: only the presented product is boxed, as in LPR4M where the box marks the product being introduced;
  products standing on shelves or tables are distractors and never boxed. A box is the extent of the product's
  final visible alpha (after the hand, the occluder, motion blur and the frame edge), as normalised xyxy with
  ``x2 = (last column + 1) / width``. A frame where less than a quarter of the product would show gets no
  product at all (the hand is empty) and an empty box list, so every drawn presented product is boxed.
- training: ``training_video/<video_id>/<frame_id>.jpg`` at 1 frame/s, ``training_image/<image_id>.jpg`` (the
  main shop image), ``training_videoinfo.txt`` (11 README columns, every clip boxed).
- test: ``query/<video_id>/<frame_id>.jpg`` one frame every 3 s (frame index = 0, 1, 2 ... at t = 0, 3, 6 s),
  ``clips/<video_id>.mp4`` (H.264, the same renderer at ``fps``; the query frames are its frames at t = 3k s),
  ``gallery/<live_id>/<image_id>-N.jpg`` (view 0 = clean main image, more views rotated/scaled on other
  backgrounds), the test JSON maps, ASR and titles (which name colour, pattern, container and brand).
- type columns: ``scale_type`` small/medium/large (mean box area < 8 %, < 20 %, else of the frame),
  ``duration_type`` short/medium/long (product boxed in < 1/3, < 2/3, else of the sampled frames),
  ``number_type`` single/multiple (other products in view). Test clips' types are in ``synth_manifest.json``.

The same seed and options give byte-identical annotations, images and mp4 files. The dataset is written to a
sibling staging folder and renamed into place at the end, so an interrupted run leaves nothing half-written.
"""
from __future__ import annotations

import argparse
import logging
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from lpr4m import render as R
from lpr4m.annotations import TrainingClip, write_id_map, write_id_text, write_training_videoinfo
from lpr4m.cli import (Parser, emit_json, nonnegative_int, output_file, output_folder, positive_float, positive_int,
                       progress, setup_logging)
from lpr4m.errors import BadInput, Problems
from lpr4m.ids import IMAGE_SUFFIXES
from lpr4m.io import new_folder, write_json

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mpg", ".mpeg", ".mov", ".mkv", ".webm", ".m4v")
QUERY_EVERY_S = 3
LOOKALIKE_KINDS = ("colour", "pattern", "shape", "label")


@dataclass(frozen=True)
class SynthConfig:
    """Sizes of a synthetic dataset; presets below, any field can be overridden."""

    train_lives: int = 3
    test_lives: int = 2
    products_per_live: int = 4  # training lives
    test_products_per_live: int = 6
    clips_per_product: tuple = (3, 4)  # training clips per product, inclusive range
    test_clips_per_product: int = 1
    train_clip_s: int = 5  # 1 frame/s, so also the number of frames per training clip
    test_clip_s: tuple = (15, 15)  # inclusive range, whole seconds
    video_fps: int = 4
    frame_size: tuple = (320, 240)  # (width, height), both even (H.264 4:2:0)
    image_size: int = 224  # shop images are square
    gallery_views: int = 3  # test products get 1..gallery_views views (view 0 always)
    max_family: int = 3  # look-alike family size inside a live
    background_dir: str | None = None
    real_background_share: float = 0.5  # share of lives on a real frame when background_dir is given
    jpeg_quality: int = 90

    def check(self) -> "SynthConfig":
        w, h = self.frame_size
        if w < 64 or h < 64 or w % 2 or h % 2:
            raise BadInput(None, f"frame size {w}x{h}: expected even width and height >= 64")
        for name in ("train_lives", "test_lives", "products_per_live", "test_products_per_live",
                     "test_clips_per_product", "train_clip_s", "video_fps", "gallery_views", "max_family"):
            if int(getattr(self, name)) < 1:
                raise BadInput(None, f"{name} must be >= 1, got {getattr(self, name)}")
        lo, hi = self.clips_per_product
        if not 1 <= lo <= hi:
            raise BadInput(None, f"clips per product must be a range 1 <= lo <= hi, got {self.clips_per_product}")
        lo, hi = self.test_clip_s
        if not QUERY_EVERY_S <= lo <= hi:
            raise BadInput(None, f"test clip length must be >= {QUERY_EVERY_S} s, got {self.test_clip_s}")
        if self.image_size < 32:
            raise BadInput(None, f"image size must be >= 32, got {self.image_size}")
        return self


PRESETS = {
    # unit tests: a few seconds on one core
    "test": SynthConfig(),
    # bundled demo gallery and CPU training of detector and retriever
    "demo": SynthConfig(train_lives=10, test_lives=4, products_per_live=6, test_products_per_live=8,
                        clips_per_product=(3, 6), test_clips_per_product=2, train_clip_s=10, test_clip_s=(15, 21),
                        video_fps=5, frame_size=(640, 360), image_size=320),
    # benchmarks
    "bench": SynthConfig(train_lives=30, test_lives=10, products_per_live=8, test_products_per_live=16,
                         clips_per_product=(4, 8), test_clips_per_product=2, train_clip_s=10, test_clip_s=(15, 30),
                         video_fps=5, frame_size=(640, 360), image_size=320),
}


# -- determinism helpers -------------------------------------------------------------------------------------
def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """An independent stream per entity, so adding lives or products does not reshuffle the others."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *keys])


def make_uuid(seed: int, *keys: int) -> str:
    return str(uuid.UUID(bytes=rng_for(seed, 0x1D, *keys).bytes(16), version=4))


TRAIN, TEST = 0, 1


@dataclass
class Product:
    image_id: str
    split: str
    live_id: str
    spec: R.ProductSpec
    sprite: R.Sprite
    lookalike_of: str | None = None
    change: str | None = None


@dataclass
class Live:
    live_id: str
    split: str
    index: int
    products: list
    room: np.ndarray  # float32 canvas (H+2m) x (W+2m) x 3
    slots: list
    presenter: R.Presenter
    noise: np.ndarray
    real_background: bool = False


# -- backgrounds ---------------------------------------------------------------------------------------------
def load_backgrounds(folder, size_wh, problems: Problems, per_video: int = 4) -> list[np.ndarray]:
    """Frames from images and videos in ``folder`` (sorted names; videos decoded in order, no seeking)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(folder, "backgrounds folder not found (expected images or videos)")
    from lpr4m.images import load_rgb
    out = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        suffix = path.suffix.lower()
        try:
            if suffix in IMAGE_SUFFIXES:
                out.append(R.fit_background(load_rgb(path), size_wh))
            elif suffix in VIDEO_SUFFIXES:
                out.extend(R.fit_background(f, size_wh) for f in _video_frames(path, per_video))
        except BadInput as err:
            problems.add(err, "bad_background")
    if not out:
        raise BadInput(folder, "no readable background images or videos")
    return out


def _video_frames(path: Path, n: int, max_decode: int = 240) -> list[np.ndarray]:
    import av
    frames = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "NONE"
            decoded = []
            for i, frame in enumerate(container.decode(stream)):
                if i >= max_decode:
                    break
                if i % 30 == 0:
                    decoded.append(frame.to_ndarray(format="rgb24"))
            frames = [decoded[int(j)] for j in np.linspace(0, len(decoded) - 1, min(n, len(decoded))).round()] \
                if decoded else []
    except (av.error.FFmpegError, IndexError, ValueError) as err:
        raise BadInput(path, f"undecodable video ({type(err).__name__})") from None
    if not frames:
        raise BadInput(path, "video has no decodable frames")
    return frames


# -- products and lives --------------------------------------------------------------------------------------
def _make_products(cfg: SynthConfig, seed: int, split: int, live_index: int, live_id: str, n: int,
                   sprite_height: int) -> list[Product]:
    rng = rng_for(seed, 1, split, live_index)
    products: list[Product] = []
    family = 0
    while len(products) < n:
        size = int(min(n - len(products), rng.integers(1, cfg.max_family + 1)))
        base = R.random_spec(rng, family)
        members = [(base, None)]
        hows = list(rng.permutation(LOOKALIKE_KINDS))
        for k in range(size - 1):
            members.append((R.look_alike(base, rng, str(hows[k % len(hows)])), str(hows[k % len(hows)])))
        base_id = None
        for spec, how in members:
            image_id = make_uuid(seed, 2, split, live_index, len(products))
            base_id = base_id or image_id
            products.append(Product(image_id, "train" if split == TRAIN else "test", live_id, spec,
                                    R.draw_product(spec, sprite_height), None if how is None else base_id, how))
        family += 1
    return products


def _make_live(cfg: SynthConfig, seed: int, split: int, index: int, n_products: int, sprite_height: int,
               backgrounds: list[np.ndarray]) -> Live:
    live_id = make_uuid(seed, 1, split, index)
    rng = rng_for(seed, 3, split, index)
    W, H = cfg.frame_size
    m = _margin(cfg)
    real = bool(backgrounds) and rng.random() < cfg.real_background_share
    if real:
        room = R.fit_background(backgrounds[int(rng.integers(len(backgrounds)))].astype(np.uint8),
                                (W + 2 * m, H + 2 * m))
        slots = []
    else:
        room, slots = R.room_background(rng, (W + 2 * m, H + 2 * m))
    noise = rng.normal(0, 1, (H + 16, W + 16, 3)).astype(np.float32)
    products = _make_products(cfg, seed, split, index, live_id, n_products, sprite_height)
    return Live(live_id, "train" if split == TRAIN else "test", index, products, room, slots,
                R.random_presenter(rng), noise, real)


def _margin(cfg: SynthConfig) -> int:
    return max(4, int(0.04 * cfg.frame_size[0]))


def _scene(cfg: SynthConfig, live: Live, product: Product, rng: np.random.Generator, duration: float,
           scene_seed: int) -> tuple[R.ClipScene, bool]:
    """A clip of ``product`` in ``live``; returns the scene and whether other products are in view."""
    W, H = cfg.frame_size
    m = _margin(cfg)
    bg = live.room.copy()
    others = [p for p in live.products if p.image_id != product.image_id]
    distractors = 0
    if others and live.slots:
        for x, y, max_h in live.slots:
            if rng.random() < 0.55:
                d = others[int(rng.integers(len(others)))]
                R.place_on_slot(bg, d.sprite, x, y, min(max_h, rng.uniform(0.1, 0.18) * H))
                distractors += m <= x <= W + m
    R.draw_presenter(bg, live.presenter)
    if rng.random() < 0.5:  # a table in front of the presenter, maybe with products on it
        top = int(rng.uniform(0.8, 0.9) * (H + 2 * m))
        colour = np.asarray(R.COLOURS[R._pick(rng, ("brown", "white", "grey", "cream", "black"))], np.float32)
        bg[top:] = colour * 0.85
        bg[top:top + max(2, H // 80)] = colour
        if others and rng.random() < 0.6:
            for _ in range(int(rng.integers(1, 3))):
                d = others[int(rng.integers(len(others)))]
                x = (W + 2 * m) * (rng.uniform(0.05, 0.3) if rng.random() < 0.5 else rng.uniform(0.7, 0.95))
                R.place_on_slot(bg, d.sprite, x, top + 0.02 * H, rng.uniform(0.2, 0.32) * H)
                distractors += 1
    side = -1 if rng.random() < 0.5 else 1
    scale_kind = rng.choice(3, p=[0.3, 0.45, 0.25])
    base = [rng.uniform(0.18, 0.28), rng.uniform(0.3, 0.45), rng.uniform(0.48, 0.68)][scale_kind]
    pc = live.presenter.cx
    x_lo, x_hi = (pc - 0.32, pc - 0.02) if side < 0 else (pc + 0.02, pc + 0.32)
    x_lo, x_hi = max(0.14, x_lo), min(0.86, x_hi)
    absent = []
    if rng.random() < 0.35:
        a = rng.uniform(0.2, 0.45) * duration
        absent.append((0.0, a) if rng.random() < 0.5 else (duration - a, duration + 1))
    occluder = None
    if rng.random() < 0.3:
        start = rng.uniform(0, max(0.1, duration - 3))
        occluder = (start, start + rng.uniform(1.5, 4.0))
    view = rng.uniform(0.4, 1.0)  # how much this presenter turns the product
    scene = R.ClipScene(
        background=bg, margin=m, size_wh=(W, H), presenter=live.presenter, sprite=product.sprite, hand_side=side,
        grip="side" if rng.random() < 0.7 else "bottom",
        scale=R.Track.random(rng, duration, base * 0.85, base * 1.15),
        cx=R.Track.random(rng, duration, x_lo, x_hi), cy=R.Track.random(rng, duration, 0.4, 0.62),
        yaw=R.Track.random(rng, duration, -50 * view, 50 * view), pitch=R.Track.random(rng, duration, -15, 15),
        roll=R.Track.random(rng, duration, -25 * view, 25 * view),
        cam_x=R.Track.random(rng, duration, -0.8 * m, 0.8 * m), cam_y=R.Track.random(rng, duration, -0.5 * m, 0.5 * m),
        light=R.Track.random(rng, duration, 0.75, 1.2, step=1.5), absent=absent, occluder=occluder,
        blur=float(rng.choice([0.05, 0.15, 0.35])), light_map=R.light_map(rng, (W, H)), noise=live.noise,
        noise_sigma=float(rng.uniform(1.0, 4.0)), seed=scene_seed,
        extras={"occ_y": float(rng.uniform(0.3, 0.7)), "occ_r": float(rng.uniform(0.35, 0.6))})
    return scene, distractors > 0


def _types(results: list[R.FrameResult], multiple: bool) -> dict[str, str]:
    boxed = [r for r in results if r.box]
    share = len(boxed) / max(1, len(results))
    area = float(np.mean([r.box_area for r in boxed])) if boxed else 0.0
    return {"scale_type": "small" if area < 0.08 else "medium" if area < 0.2 else "large",
            "duration_type": "short" if share < 1 / 3 else "medium" if share < 2 / 3 else "long",
            "number_type": "multiple" if multiple else "single"}


ASR_OPENERS = ("hello everyone welcome to the live", "ok friends look here", "next item now", "this one sells out fast",
               "everybody asked for this", "limited stock today", "let me show you")
ASR_CLOSERS = ("add it to your cart", "link is below", "only a few left", "great price today", "order now",
               "free shipping on this")


def asr_text(spec: R.ProductSpec, rng: np.random.Generator) -> str:
    """Spoken text that mentions the product (not always all of it, like real ASR)."""
    noun = R.KINDS[spec.kind][3]
    mentions = [f"this {spec.colour} {noun} from {spec.brand.lower()}", f"the {spec.brand.lower()} {noun}",
                f"our {R.PATTERNS[spec.pattern]} {noun}", f"{spec.variant.lower()} {spec.colour} {noun}",
                f"look at the {spec.label_colour} label"]
    parts = [ASR_OPENERS[int(rng.integers(len(ASR_OPENERS)))]]
    parts += [mentions[int(i)] for i in sorted(rng.choice(len(mentions), int(rng.integers(1, 4)), replace=False))]
    parts.append(ASR_CLOSERS[int(rng.integers(len(ASR_CLOSERS)))])
    return " ".join(parts)


# -- writing -------------------------------------------------------------------------------------------------
def _save_jpeg(path: Path, rgb: np.ndarray, quality: int) -> int:
    """Plain write: the whole dataset is staged and renamed into place at the end (see ``synthesize``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format="JPEG", quality=quality)
    return 1


_BT601 = np.array([[0.257, 0.504, 0.098], [-0.148, -0.291, 0.439], [0.439, -0.368, -0.071]], np.float32)


def rgb_to_i420(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range YUV 4:2:0 planes (Y, U, V) as one flat uint8 array: what decoders assume for SD."""
    h, w = rgb.shape[:2]
    x = rgb.astype(np.float32)
    y = x @ _BT601[0] + 16
    sub = x.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    u = sub @ _BT601[1] + 128
    v = sub @ _BT601[2] + 128
    return np.concatenate([np.clip(np.rint(p), 0, 255).astype(np.uint8).reshape(-1) for p in (y, u, v)])


class Mp4Writer:
    """H.264 (libx264, yuv420p, B-frames) through PyAV; single threaded so bytes repeat for a seed."""

    def __init__(self, path: Path, size_wh, fps: int):
        import av
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.width, self.stream.height = size_wh
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.thread_count = 1
        # mbtree off: with it, this x264 build's output depended on heap contents (same frames, other bytes)
        self.stream.options = {"crf": "20", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        self._av = av
        self.n = 0

    def write(self, rgb: np.ndarray) -> None:
        # convert in numpy rather than in FFmpeg's (threaded) swscale, into a frame that owns its memory
        yuv = rgb_to_i420(rgb)
        w, h = self.stream.width, self.stream.height
        frame = self._av.VideoFrame(w, h, "yuv420p")
        ends = np.cumsum([0, w * h, w * h // 4, w * h // 4])
        for plane, a, b in zip(frame.planes, ends[:-1], ends[1:]):
            if plane.line_size * plane.height != b - a:
                raise RuntimeError(f"unexpected padded {plane.line_size}-byte rows for a {w}x{h} frame")
            plane.update(yuv[a:b].tobytes())
        frame.pts = self.n
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.n += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def _resolve(preset: str, overrides: dict) -> SynthConfig:
    if preset not in PRESETS:
        raise BadInput(None, f"unknown preset {preset!r} (expected one of {', '.join(PRESETS)})")
    cfg = PRESETS[preset]
    scale = overrides.pop("scale", None)
    fields = set(SynthConfig.__dataclass_fields__)
    unknown = set(overrides) - fields
    if unknown:
        raise BadInput(None, f"unknown synth options {sorted(unknown)} (expected some of {sorted(fields)})")
    cfg = replace(cfg, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None})
    if scale is not None:
        if scale <= 0:
            raise BadInput(None, f"--scale must be > 0, got {scale}")
        cfg = replace(cfg, train_lives=max(1, round(cfg.train_lives * scale)),
                      test_lives=max(1, round(cfg.test_lives * scale)))
    return cfg.check()


def synthesize(out, seed: int = 0, preset: str = "test", progress_bar: bool = True, **overrides) -> dict:
    """Write a synthetic LPR4M-mini to ``out`` (a new or empty folder); returns a summary dict.

    ``overrides`` are ``SynthConfig`` fields (e.g. ``test_lives=3``, ``frame_size=(384, 288)``) plus ``scale``
    (multiplies the numbers of lives).

    >>> summary = synthesize("data/lpr4m-mini", seed=0, preset="test")
    """
    t0 = time.perf_counter()
    cfg = _resolve(preset, dict(overrides))
    out = Path(out)
    with new_folder(out, "synth") as staging:
        summary = _synthesize(staging, cfg, int(seed), preset, progress_bar)
    summary["root"] = str(out)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return summary


def _bar(enabled: bool) -> dict:
    return {} if enabled else {"disable": True}


def _synthesize(root: Path, cfg: SynthConfig, seed: int, preset: str, progress_bar: bool) -> dict:
    W, H = cfg.frame_size
    problems = Problems()
    backgrounds = load_backgrounds(cfg.background_dir, (W + 2 * _margin(cfg), H + 2 * _margin(cfg)), problems) \
        if cfg.background_dir else []
    sprite_height = int(max(cfg.image_size, 0.75 * H))
    q = cfg.jpeg_quality
    ann = root / "annotations"
    manifest = {"seed": seed, "preset": preset, "config": asdict(cfg), "lives": {}, "products": [], "test_clips": {}}
    counts = {"train_frames": 0, "train_boxed_frames": 0, "query_frames": 0, "query_boxed_frames": 0,
              "video_frames": 0, "gallery_images": 0}

    def record(p: Product):
        manifest["products"].append({"image_id": p.image_id, "split": p.split, "live_id": p.live_id,
                                     "title": p.spec.title, "family": p.spec.family, "lookalike_of": p.lookalike_of,
                                     "change": p.change, "spec": asdict(p.spec)})

    def record_live(live: Live):
        manifest["lives"][live.live_id] = {"split": live.split, "background": "real" if live.real_background
                                           else "procedural", "products": [p.image_id for p in live.products]}

    # ---- training split
    train_lives = [_make_live(cfg, seed, TRAIN, i, cfg.products_per_live, sprite_height, backgrounds)
                   for i in range(cfg.train_lives)]
    jobs = []
    for live in train_lives:
        record_live(live)
        rng = rng_for(seed, 4, TRAIN, live.index)
        start = 1_600_000_000_000 + live.index * 100_000_000
        for p in live.products:
            record(p)
            _save_jpeg(root / "training_image" / f"{p.image_id}.jpg",
                       R.shop_image(p.sprite, cfg.image_size, rng_for(seed, 5, TRAIN, live.index, len(jobs))), q)
            for _ in range(int(rng.integers(cfg.clips_per_product[0], cfg.clips_per_product[1] + 1))):
                start += int(rng.integers(2, 30)) * 1000
                jobs.append((live, p, start, cfg.train_clip_s))
                start += cfg.train_clip_s * 1000
    clips = []
    for k, (live, p, start, dur) in enumerate(progress(jobs, desc="training clips", **_bar(progress_bar))):
        rng = rng_for(seed, 6, TRAIN, k)
        video_id = f"{live.live_id}-{start}-{start + dur * 1000}"
        scene, multiple = _scene(cfg, live, p, rng, dur, seed * 1_000_003 + k)
        results, frame_ids = [], []
        for i in range(dur):
            res = scene.render(float(i))
            frame_id = f"{video_id}-{i:04d}"
            _save_jpeg(root / "training_video" / video_id / f"{frame_id}.jpg", res.rgb, q)
            results.append(res)
            frame_ids.append(frame_id)
        counts["train_frames"] += len(results)
        counts["train_boxed_frames"] += sum(r.box is not None for r in results)
        cat_id, cat_name = p.spec.category
        clips.append(TrainingClip(video_id=video_id, frame_ids=frame_ids, boxes=[[r.box] if r.box else []
                                                                              for r in results],
                                  image_id=p.image_id, image_title=p.spec.title, category_id=cat_id,
                                  category_name=cat_name, asr=asr_text(p.spec, rng), **_types(results, multiple)))
    write_training_videoinfo(ann / "training_videoinfo.txt", clips)

    # ---- test split
    test_lives = [_make_live(cfg, seed, TEST, i, cfg.test_products_per_live, sprite_height, backgrounds)
                  for i in range(cfg.test_lives)]
    galleries, gt_images, gt_boxes, asr, titles = {}, {}, {}, {}, {}
    jobs = []
    for live in test_lives:
        record_live(live)
        rng = rng_for(seed, 4, TEST, live.index)
        galleries[live.live_id] = [p.image_id for p in live.products]
        start = 1_700_000_000_000 + live.index * 100_000_000
        for j, p in enumerate(live.products):
            record(p)
            titles[p.image_id] = p.spec.title
            for view in range(int(rng.integers(1, cfg.gallery_views + 1))):
                img = R.shop_image(p.sprite, cfg.image_size, rng_for(seed, 5, TEST, live.index, j, view), view)
                counts["gallery_images"] += _save_jpeg(root / "gallery" / live.live_id / f"{p.image_id}-{view}.jpg",
                                                       img, q)
            for _ in range(cfg.test_clips_per_product):
                dur = int(rng.integers(cfg.test_clip_s[0], cfg.test_clip_s[1] + 1))
                start += int(rng.integers(2, 30)) * 1000
                jobs.append((live, p, start, dur))
                start += dur * 1000
    for k, (live, p, start, dur) in enumerate(progress(jobs, desc="test clips", **_bar(progress_bar))):
        rng = rng_for(seed, 6, TEST, k)
        video_id = f"{live.live_id}-{start}-{start + dur * 1000}"
        scene, multiple = _scene(cfg, live, p, rng, dur, seed * 1_000_003 + 500_000 + k)
        writer = Mp4Writer(root / "clips" / f"{video_id}.mp4", (W, H), cfg.video_fps)
        step = QUERY_EVERY_S * cfg.video_fps
        results = []
        try:
            for i in range(dur * cfg.video_fps):
                res = scene.render(i / cfg.video_fps)
                writer.write(res.rgb)
                if i % step == 0:
                    frame_id = f"{video_id}-{i // step:04d}"
                    _save_jpeg(root / "query" / video_id / f"{frame_id}.jpg", res.rgb, q)
                    gt_boxes[frame_id] = [res.box] if res.box else []
                    results.append(res)
        finally:
            writer.close()
        counts["video_frames"] += writer.n
        counts["query_frames"] += len(results)
        counts["query_boxed_frames"] += sum(r.box is not None for r in results)
        gt_images[video_id] = [p.image_id]
        asr[video_id] = asr_text(p.spec, rng)
        manifest["test_clips"][video_id] = {"image_id": p.image_id, "duration_s": dur, "fps": cfg.video_fps,
                                            "video_frames": writer.n, **_types(results, multiple)}
    write_id_map(ann / "test_videoid_to_gtimage.json", gt_images)
    write_id_map(ann / "test_liveid_to_gallery.json", galleries)
    write_id_map(ann / "test_frameid2gtbox.json", gt_boxes)
    write_id_text(ann / "test_videoid_asr.txt", asr)
    write_id_text(ann / "test_image_title.txt", titles)
    write_json(root / "synth_manifest.json", manifest)
    train_products = sum(len(lv.products) for lv in train_lives)
    test_products = sum(len(lv.products) for lv in test_lives)
    return {"seed": seed, "preset": preset, "frame_size": list(cfg.frame_size), "image_size": cfg.image_size,
            "train": {"lives": len(train_lives), "products": train_products, "clips": len(clips),
                      "frames": counts["train_frames"], "boxed_frames": counts["train_boxed_frames"]},
            "test": {"lives": len(test_lives), "products": test_products, "clips": len(gt_images),
                     "query_frames": counts["query_frames"], "boxed_frames": counts["query_boxed_frames"],
                     "video_frames": counts["video_frames"], "gallery_images": counts["gallery_images"]},
            "backgrounds": {"frames": len(backgrounds), "problems": problems.as_dict() if problems.total else None}}


# -- CLI -----------------------------------------------------------------------------------------------------
MAX_FRAME_SIDE = 4096  # 4K; a typo such as 100000x100000 would otherwise try to allocate ~130 GiB


def frame_size_arg(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 640x360, got {text!r}") from None
    if not (16 <= w <= MAX_FRAME_SIDE and 16 <= h <= MAX_FRAME_SIDE):
        raise argparse.ArgumentTypeError(f"frame sides must be 16..{MAX_FRAME_SIDE} pixels, got {text!r}")
    return w, h


def _range(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.split("-")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, got {text!r}") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, got {text!r}")
    return parts[0], parts[-1]


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m lpr4m synth", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="presets: " + "; ".join(
                    f"{k}: {c.train_lives}+{c.test_lives} lives, {c.frame_size[0]}x{c.frame_size[1]}"
                    for k, c in PRESETS.items()))
    ap.add_argument("out", type=output_folder, help="new (or empty) folder for the dataset")
    ap.add_argument("--seed", type=nonnegative_int, default=0)
    ap.add_argument("--preset", default="test", choices=sorted(PRESETS))
    ap.add_argument("--scale", type=positive_float, help="multiply the numbers of training and test lives")
    g = ap.add_argument_group("overrides (default: from the preset)")
    g.add_argument("--lives", type=positive_int, dest="test_lives", help="test lives")
    g.add_argument("--train-lives", type=positive_int)
    g.add_argument("--products", type=positive_int, dest="products_per_live", help="products per training live")
    g.add_argument("--test-products", type=positive_int, dest="test_products_per_live", help="products per test live")
    g.add_argument("--clips-per-product", type=_range, help="training clips per product: N or LO-HI")
    g.add_argument("--test-clips-per-product", type=positive_int)
    g.add_argument("--train-clip-s", type=positive_int, help="training clip length in seconds (= frames, 1 frame/s)")
    g.add_argument("--test-clip-s", type=_range, help="test clip length in seconds: N or LO-HI")
    g.add_argument("--fps", type=positive_int, dest="video_fps", help="frame rate of clips/*.mp4")
    g.add_argument("--frame-size", type=frame_size_arg, help="WIDTHxHEIGHT of frames, e.g. 640x360")
    g.add_argument("--image-size", type=int, help="side of the square shop images")
    g.add_argument("--gallery-views", type=positive_int, help="max shop images per test product (view 0 always)")
    g.add_argument("--backgrounds", dest="background_dir", help="folder of images/videos used as real rooms")
    ap.add_argument("--out-json", type=output_file, dest="out_json",
                    help="write the JSON summary here instead of stdout")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    overrides = {k: getattr(args, k) for k in (
        "test_lives", "train_lives", "products_per_live", "test_products_per_live", "clips_per_product",
        "test_clips_per_product", "train_clip_s", "test_clip_s", "video_fps", "frame_size", "image_size",
        "gallery_views", "background_dir") if getattr(args, k) is not None}
    if args.scale is not None:
        overrides["scale"] = args.scale
    summary = synthesize(args.out, seed=args.seed, preset=args.preset, **overrides)
    logger.info("wrote %s in %.1f s", summary["root"], summary["seconds"])
    emit_json(summary, args.out_json)
    return 0


if __name__ == "__main__":
    import sys

    from lpr4m.cli import run_main
    sys.exit(run_main(main))
