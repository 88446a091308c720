"""The two-stage recogniser as a stream: frames -> detect -> crop -> embed, then aggregate -> search.

Like ultralytics' ``stream_inference`` it is a generator over small batches, so a 1-hour recording holds one
batch of decoded frames at a time; what is kept per frame is a handful of floats (its crop embeddings, boxes)
and, for the HTML report only, a bounded set of small thumbnails (stride doubles when the cap is reached).
Every stage is timed (``StageTimer``) and reported in ms per frame.
"""
from __future__ import annotations

import io
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

logger = logging.getLogger(__name__)

STAGES = ("decode", "detect", "crop", "embed", "aggregate", "search")


class ImageFrame(NamedTuple):
    """Same shape as ``lpr4m.frames.Frame``, for frames that come from image files (LPR4M query folders)."""

    index: int
    time_s: float
    rgb: np.ndarray


class StageTimer:
    """Accumulated wall time per stage; ``ms_per(n)`` gives the ultralytics-style per-frame figures."""

    def __init__(self):
        self.total = defaultdict(float)

    def add(self, stage: str, seconds: float) -> None:
        self.total[stage] += seconds

    def time(self, stage: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.add(stage, time.perf_counter() - self.t)
                return False

        return _Ctx()

    def ms_per(self, n: int) -> dict[str, float]:
        n = max(1, n)
        return {s: 1000.0 * self.total[s] / n for s in STAGES if s in self.total}

    def line(self, n: int, what: str = "frame") -> str:
        ms = self.ms_per(n)
        parts = ", ".join(f"{v:.1f} ms {k}" for k, v in ms.items()
                          if k in ("decode", "embed", "search") or v >= 0.05)
        return f"Speed: {parts} per {what}"


def timed_iter(it: Iterable, timer: StageTimer, stage: str = "decode") -> Iterator:
    """Charge the time spent inside ``next(it)`` (decoding) to ``stage``."""
    it = iter(it)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            timer.add(stage, time.perf_counter() - t)
            return
        timer.add(stage, time.perf_counter() - t)
        yield item


def prefetch(it: Iterable, timer: StageTimer, depth: int = 16, stage: str = "decode") -> Iterator:
    """Decode in a background thread (PyAV and the ONNX/torch kernels release the GIL, so decoding overlaps the
    models); a bounded queue keeps memory flat. Errors in the decoder (a BadInput on a corrupt file) are re-raised
    here; closing the generator stops the thread."""
    import queue
    import threading
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in timed_iter(it, timer, stage):
                if not put(("item", item)):
                    return
            put(("end", done))
        except BaseException as e:  # handed to the consumer, raised there
            put(("error", e))
        finally:
            close = getattr(it, "close", None)
            if close is not None and stop.is_set():
                try:
                    close()
                except Exception:  # the generator may be running in this very thread's frame
                    pass

    t = threading.Thread(target=work, name="lpr-decode", daemon=True)
    t.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "item":
                yield item
            elif kind == "error":
                raise item
            else:
                return
    finally:
        stop.set()
        t.join(timeout=5)


@dataclass
class FrameResult:
    """What the recogniser keeps of one sampled frame."""

    index: int
    time_s: float
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 pixel xyxy, all detections
    scores: np.ndarray  # (N,) float32
    used: list[int]  # which boxes were cropped and embedded ([] when the full frame was)
    embs: np.ndarray  # (C, D) float32, one row per embedded crop (C >= 1), fused with the full frame
    thumb: bytes | None = None  # small JPEG with the detections drawn (only when thumbnails are kept)
    crop_weights: list[float] | None = None  # per used box: its share against the full frame (crop_weight)

    @property
    def fallback(self) -> bool:
        return not self.used

    def crop_boxes(self) -> list[list[float] | None]:
        """Per embedding row: the pixel box it came from (None = full frame)."""
        if not self.used:
            return [None]
        return [[round(float(v), 1) for v in self.boxes[i]] for i in self.used]

    def as_dict(self) -> dict:
        return {"index": self.index, "time_s": round(self.time_s, 3), "size": [self.width, self.height],
                "boxes": [[round(float(v), 1) for v in b] for b in self.boxes],
                "scores": [round(float(s), 4) for s in self.scores], "used": list(self.used),
                "crop_weights": [round(w, 3) for w in self.crop_weights or []], "full_frame": self.fallback}


def draw_thumbnail(rgb: np.ndarray, boxes: np.ndarray, used: Sequence[int], width: int = 320,
                   quality: int = 80) -> bytes:
    """A small JPEG of the frame with embedded boxes in green, other detections in orange."""
    from PIL import Image, ImageDraw
    h, w = rgb.shape[:2]
    scale = min(1.0, width / max(1, w))
    im = Image.fromarray(rgb)
    if scale < 1.0:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    lw = max(2, round(3 * im.width / 320))
    for i, b in enumerate(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)):
        x1, y1, x2, y2 = (float(v) * scale for v in b)
        draw.rectangle([x1, y1, x2, y2], outline=(40, 220, 60) if i in used else (255, 150, 0), width=lw)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class ThumbKeeper:
    """Keeps at most ``cap`` thumbnails spread over the stream: when full, drop every other one and double the
    stride (memory bounded on an hour-long file, coverage stays even)."""

    def __init__(self, cap: int = 48):
        self.cap = max(2, cap)
        self.stride = 1
        self.kept: dict[int, bytes] = {}

    def wants(self, n: int) -> bool:
        return n % self.stride == 0

    def add(self, n: int, thumb: bytes) -> None:
        self.kept[n] = thumb
        while len(self.kept) > self.cap:
            self.stride *= 2
            self.kept = {k: v for k, v in self.kept.items() if k % self.stride == 0}


class Recognizer:
    """detect -> crop -> embed over a stream of frames; the detector is optional (None = full frames).

    ``crops_per_frame`` highest-scoring boxes of each frame are embedded; a frame with no detection falls back
    to the full frame, so every frame contributes at least one embedding. Under ``crop_policy="fuse"`` each crop
    embedding is mixed with its full frame's by the detector's confidence (``retriever.crops.crop_weight``).
    """

    def __init__(self, embedder, detector=None, crops_per_frame: int = 1, pad: float = 0.05, batch: int = 8,
                 thumbs: int = 0, thumb_width: int = 320, min_score: float = 0.0, prefetch: int = 0,
                 crop_policy: str = "fuse"):
        from retriever.crops import crop_weight
        crop_weight(1.0, crop_policy)  # an unknown policy fails here, not on the first frame
        self.crop_policy = crop_policy
        self.embedder = embedder
        self.min_score = min_score  # boxes below it are kept (for box AP) but never cropped
        self.detector = detector
        self.crops_per_frame = max(1, crops_per_frame)
        self.pad = pad
        self.batch = max(1, batch)
        self.thumbs = ThumbKeeper(thumbs) if thumbs else None
        self.thumb_width = thumb_width
        self.prefetch = prefetch  # frames decoded ahead in a thread (0 = decode inline)
        self.timer = StageTimer()
        self.wall_s = 0.0
        self.n_frames = 0
        self.size: tuple[int, int] | None = None

    def _process_batch(self, frames: list) -> list[FrameResult]:
        from retriever.crops import crop_boxes, crop_weight, fuse
        rgbs = [f.rgb for f in frames]
        if self.detector is not None:
            with self.timer.time("detect"):
                dets = self.detector.detect(rgbs)
        else:
            dets = [None] * len(frames)
        crops, owner, used_all, weights_all, full_row = [], [], [], [], {}
        with self.timer.time("crop"):
            for j, (f, det) in enumerate(zip(frames, dets)):
                used: list[int] = []
                weights: list[float] = []
                if det is not None and len(det.scores):
                    sc = np.asarray(det.scores, np.float32).reshape(-1)
                    order = np.argsort(-sc, kind="stable")
                    order = order[sc[order] >= self.min_score][: self.crops_per_frame]
                    xyxy = np.asarray(det.xyxy, dtype=np.float32).reshape(-1, 4)
                    for i in order.tolist():
                        pieces = crop_boxes(f.rgb, xyxy[i:i + 1], pad=self.pad)  # one at a time: it drops
                        if pieces:                                                # degenerate boxes
                            crops.append(pieces[0])
                            owner.append(j)
                            used.append(int(i))
                            weights.append(crop_weight(sc[i], self.crop_policy))
                if not used or min(weights) < 1.0:  # the full frame stands in, or is fused with the crops
                    full_row[j] = len(crops)
                    crops.append(f.rgb)
                    owner.append(-1 if used else j)
                used_all.append(used)
                weights_all.append(weights)
        with self.timer.time("embed"):
            embs = np.asarray(self.embedder.embed(crops), dtype=np.float32) if crops else None
        out = []
        owner = np.asarray(owner)
        for j, (f, det, used) in enumerate(zip(frames, dets, used_all)):
            rows = embs[owner == j]
            if used and j in full_row:
                rows = fuse(rows, embs[full_row[j]], weights_all[j])
            h, w = f.rgb.shape[:2]
            boxes = np.asarray(det.xyxy, np.float32).reshape(-1, 4) if det is not None else np.zeros((0, 4), np.float32)
            scores = np.asarray(det.scores, np.float32).reshape(-1) if det is not None else np.zeros(0, np.float32)
            res = FrameResult(int(f.index), float(f.time_s), w, h, boxes, scores, used, rows,
                              crop_weights=weights_all[j])
            if self.thumbs is not None and self.thumbs.wants(self.n_frames):
                self.thumbs.add(self.n_frames, draw_thumbnail(f.rgb, boxes, used, self.thumb_width))
            self.size = (w, h)
            self.n_frames += 1
            out.append(res)
        return out

    def stream(self, frames: Iterable) -> Iterator[FrameResult]:
        """Frame results in order; frames are decoded lazily (decode time charged to 'decode'), in a thread
        ``prefetch`` frames ahead when asked."""
        t0 = time.perf_counter()
        source = prefetch(frames, self.timer, self.prefetch) if self.prefetch else timed_iter(frames, self.timer)
        batch = []
        try:
            for f in source:
                batch.append(f)
                if len(batch) >= self.batch:
                    yield from self._process_batch(batch)
                    batch = []
            if batch:
                yield from self._process_batch(batch)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
            self.wall_s += time.perf_counter() - t0

    def thumbnail(self, n: int) -> bytes | None:
        return None if self.thumbs is None else self.thumbs.kept.get(n)


def frame_embedding(r: FrameResult) -> np.ndarray:
    """One vector per frame (mean of its crop embeddings, re-normalised) for segmentation."""
    v = r.embs.mean(axis=0)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def aggregate(embs: np.ndarray, method: str = "mean", embedder=None) -> np.ndarray:
    """The retriever's clip aggregation (mean / attention); falls back to a normalised mean for one row."""
    from retriever.aggregate import aggregate as agg
    embs = np.asarray(embs, dtype=np.float32)
    return np.asarray(agg(embs, method=method, embedder=embedder), dtype=np.float32).reshape(-1)


def search_clip(results: Sequence[FrameResult], gallery, k: int = 5, method: str = "mean", embedder=None,
                live_id: str | None = None, timer: StageTimer | None = None, support: int = 3) -> list[dict]:
    """Aggregate the frames' crop embeddings, search the gallery, and list supporting crops per product.

    ``method="max"`` ranks by set-to-image similarity (best crop per shop image, the retriever's
    ``set_scores``) over the whole gallery instead of a single clip vector.
    """
    timer = timer or StageTimer()
    if not results:
        return []
    embs = np.concatenate([r.embs for r in results]).astype(np.float32)
    owners = np.concatenate([[n] * len(r.embs) for n, r in enumerate(results)])
    rows = [(n, b) for n, r in enumerate(results) for b in r.crop_boxes()]
    if method == "max":
        from retriever.aggregate import set_scores
        with timer.time("search"):
            ids = gallery.meta["ids"] if live_id is None else gallery._by_live.get(live_id, np.zeros(0)).tolist()
            gvec = gallery.vectors(ids)
            s = np.asarray(set_scores(embs, gvec, "max"), dtype=np.float32).reshape(-1)
            best: dict[str, tuple[float, int]] = {}
            for sc, i in zip(s.tolist(), ids):
                img = gallery.items[int(i)].image_id
                if img not in best or sc > best[img][0]:
                    best[img] = (sc, int(i))
            ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:k]
            from pipeline.gallery import Match
            root = gallery.gallery_root()
            matches = []
            for img, (sc, i) in ranked:
                it = gallery.items[i]
                matches.append(Match(img, float(sc), it.title, it.live_id, it.view,
                                     str(root / it.path) if root else it.path, i))
    else:
        with timer.time("aggregate"):
            q = aggregate(embs, method, embedder)
        with timer.time("search"):
            matches = gallery.search(q[None], k, live_id=live_id)[0]
    out = []
    if matches:
        gv = gallery.vectors([m.id for m in matches])
        sims = embs @ gv.T  # (crops, k)
        for rank, (m, col) in enumerate(zip(matches, sims.T), 1):
            order = np.argsort(-col)
            seen, sup = set(), []
            for c in order.tolist():
                n = int(owners[c])
                if n in seen:
                    continue
                seen.add(n)
                r = results[n]
                sup.append({"frame": r.index, "time_s": round(r.time_s, 3), "box": rows[c][1],
                            "score": round(float(col[c]), 4)})
                if len(sup) >= support:
                    break
            d = m.as_dict()
            d["score"] = round(d["score"], 6)
            out.append({"rank": rank, **d, "support": sup})
    return out


def segment_results(results: Sequence[FrameResult], gallery, fps: float, k: int = 5, method: str = "mean",
                    embedder=None, window_s: float = 5.0, threshold: float = 0.7, hysteresis: int = 2,
                    live_id: str | None = None, timer: StageTimer | None = None) -> list[dict]:
    """Product segments of a long recording: change points between windows, then one search per segment.

    Adjacent segments whose top-1 product is the same are merged (a cut the embedding saw but the
    recognition did not confirm)."""
    from pipeline.segments import change_points, segment_spans, window_embeddings
    timer = timer or StageTimer()
    if not results:
        return []
    window = max(1, round(window_s * fps))
    fe = np.stack([frame_embedding(r) for r in results])
    wembs, _ = window_embeddings(fe, window)
    with timer.time("search"):
        labels = [row[0].image_id if row else None for row in gallery.search(wembs, 1, live_id=live_id)]
    spans = segment_spans(len(results), window, change_points(wembs, labels, threshold, hysteresis))
    segments: list[dict] = []
    step = 1.0 / fps if fps > 0 else 0.0
    for a, b in spans:
        prods = search_clip(results[a:b], gallery, k, method, embedder, live_id, timer)
        if segments and prods and segments[-1]["products"] and \
                segments[-1]["products"][0]["image_id"] == prods[0]["image_id"]:
            a = segments.pop()["frames"][0]
            prods = search_clip(results[a:b], gallery, k, method, embedder, live_id, timer)
        segments.append({"start_s": round(results[a].time_s, 3), "end_s": round(results[b - 1].time_s + step, 3),
                         "frames": [a, b], "n_frames": b - a, "products": prods})
    return segments


def recognize_video(clip, embedder, gallery, detector=None, fps: float = 1.0, max_frames: int | None = None,
                    k: int = 5, method: str | None = None, crops_per_frame: int = 1, thumbs: int = 0,
                    segment: bool = False, seg_window_s: float = 5.0, seg_threshold: float = 0.7,
                    seg_hysteresis: int = 2, live_id: str | None = None, batch: int = 8,
                    prefetch: int = 16, settings: dict | None = None,
                    crop_policy: str = "fuse") -> tuple[dict, Recognizer]:
    """Run the whole pipeline on a video file; returns (result dict, the recogniser with timers/thumbnails)."""
    from lpr4m.errors import BadInput
    from lpr4m.frames import probe_video, sample_frames
    from lpr4m.cli import progress
    info = probe_video(clip)
    method = method or getattr(getattr(embedder, "config", None), "aggregation", None) or "mean"
    rec = Recognizer(embedder, detector, crops_per_frame=crops_per_frame, batch=batch, thumbs=thumbs,
                     prefetch=prefetch, crop_policy=crop_policy)
    frames = sample_frames(clip, mode="fps", fps=fps, max_frames=max_frames)
    total = None
    if info.duration_s:
        total = int(info.duration_s * fps) + 1
        total = min(total, max_frames) if max_frames else total
    results = list(progress(rec.stream(frames), desc="recognise", unit="frame", total=total))
    if not results:
        raise BadInput(clip, "no decodable video frames")
    products = search_clip(results, gallery, k, method, embedder, live_id, rec.timer)
    segments = None
    if segment:
        segments = segment_results(results, gallery, fps, k, method, embedder, seg_window_s, seg_threshold,
                                   seg_hysteresis, live_id, rec.timer)
    n = len(results)
    result = {
        "clip": str(clip),
        "video": {"duration_s": info.duration_s, "fps": info.fps, "width": info.width, "height": info.height,
                  "codec": info.codec},
        "settings": {"fps": fps, "max_frames": max_frames, "topk": k, "aggregation": method,
                     "detector": detector is not None, "crops_per_frame": crops_per_frame,
                     "crop_policy": crop_policy if detector is not None else None,
                     "embedder": getattr(embedder, "fingerprint", None), "live_id": live_id, **(settings or {})},
        "n_frames": n,
        "products": products,
        "segments": segments,
        "frames": [r.as_dict() for r in results],
        "timings_ms_per_frame": {s: round(v, 3) for s, v in rec.timer.ms_per(n).items()},
        "wall_ms_per_frame": round(1000.0 * rec.wall_s / n, 3),
        "speed": rec.timer.line(n) + f" ({1000.0 * rec.wall_s / n:.1f} ms wall per frame, decoding overlapped)"
        if prefetch else rec.timer.line(n),
    }
    return result, rec
