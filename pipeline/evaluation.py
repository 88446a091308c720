"""The whole two-stage system on an LPR4M test split: rank-k (RICE counting) with detector crops and with full
frames side by side, the detector's box AP on the same frames, and per-stage timings.

Same protocol as ``retriever/evaluate.py`` (up to N frames spread evenly per clip, each query ranked in its
live's gallery, main shop images only by default) but through the pipeline's own parts: the faiss
``GalleryIndex``, the streaming ``Recognizer`` (detect -> crop -> embed, full-frame fallback) and ``search_clip``.
Each frame is decoded once and fed to both settings; the detector runs once at a low threshold so the same
detections give box AP (all scores) and crops (``conf`` and above).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence


from lpr4m.errors import BadInput, Problems
from lpr4m.images import load_rgb
from lpr4m.layout import Dataset, TestClip
from pipeline.recognize import ImageFrame, Recognizer, StageTimer, search_clip

logger = logging.getLogger(__name__)

AP_CONF = 0.001  # detection threshold for box AP (COCO practice); crops use --conf


def _clip_frames(ds: Dataset, clip: TestClip, source: str, n_frames: int, fps: float, problems: Problems,
                 timer: StageTimer) -> tuple[list, list]:
    """(frames, boxes per frame in normalised xyxy or None) of one query, decoded once (timed as 'decode')."""
    from retriever.crops import even_indices
    t = time.perf_counter()
    frames, boxes = [], []
    if source == "clips":
        from lpr4m.frames import sample_frames
        path = ds.root / "clips" / f"{clip.video_id}.mp4"
        try:
            frames = list(sample_frames(path, mode="fps", fps=fps, max_frames=None))
        except BadInput as err:
            problems.add(err, "bad_clip")
        boxes = [None] * len(frames)
    else:
        for n, i in enumerate(even_indices(len(clip.frame_paths), n_frames)):
            try:
                frames.append(ImageFrame(n, float(i), load_rgb(clip.frame_paths[i])))
                boxes.append(clip.boxes[i] if i < len(clip.boxes) else None)
            except BadInput as err:
                problems.add(err, "bad_frame")
    timer.add("decode", time.perf_counter() - t)
    return frames, boxes


def evaluate_system(ds: Dataset, embedder, detector=None, gallery=None, n_frames: int = 10,
                    source: str = "frames", fps: float = 1.0, main_only: bool = True,
                    ks: Sequence[int] = (1, 5, 10), conf: float = 0.25, method: str | None = None,
                    crops_per_frame: int = 1, full_frames: bool = True, limit: int | None = None,
                    rankings_k: int = 0, problems: Problems | None = None, batch: int = 8,
                    crop_policy: str = "fuse", seen_ids: set[str] | None = None) -> dict:
    """Rank-k per setting ("detector", "full_frames"), box AP, timings; rankings when ``rankings_k``; with
    ``seen_ids`` (the training products) rank-k of queries seen and never seen in training too."""
    from retriever.crops import normalised_to_pixels
    from retriever.metrics import by_product, rank_k_accuracy
    from pipeline.gallery import GalleryIndex, collect_lpr4m
    from lpr4m.cli import progress
    problems = problems or Problems()
    method = method or getattr(getattr(embedder, "config", None), "aggregation", None) or "mean"
    t0 = time.perf_counter()
    if gallery is None:
        items = collect_lpr4m(ds.root, "test", main_only=main_only)
        if not items:
            raise BadInput(ds.root / "gallery", "no test shop images found")
        gallery = GalleryIndex.build(embedder, ds.root.resolve(), items, "flat", problems,
                                     source={"data": str(ds.root), "main_only": main_only})
    else:
        gallery.check_embedder(embedder)
        if not set(ds.live_galleries) & set(gallery.live_ids):
            raise BadInput(gallery.path, "the index holds none of this split's live galleries (build it with "
                                         "python pipeline/index.py --gallery ROOT --out INDEX)")
    t_gallery = time.perf_counter() - t0

    settings = {}
    if detector is not None:
        detector.conf = AP_CONF
        settings["detector"] = Recognizer(embedder, detector, crops_per_frame, batch=batch, min_score=conf,
                                          crop_policy=crop_policy)
    if full_frames or detector is None:
        settings["full_frames"] = Recognizer(embedder, None, batch=batch)
    decode = StageTimer()
    clips = ds.test_clips()[:limit] if limit else ds.test_clips()
    k = max(max(ks), rankings_k, 1)
    ranked: dict[str, list] = {name: [] for name in settings}
    n_frames_total = 0
    ap_images, ap_gt, ap_dets = [], [], []
    for clip in progress(clips, desc="queries", unit="clip"):
        frames, boxes = _clip_frames(ds, clip, source, n_frames, fps, problems, decode)
        if not frames:
            problems.add(BadInput(ds.root / "query" / clip.video_id, "query clip has no readable frame"),
                         "failed_query")
            for name in settings:
                ranked[name].append(None)
            continue
        n_frames_total += len(frames)
        for name, rec in settings.items():
            results = list(rec.stream(frames))
            prods = search_clip(results, gallery, k, method, embedder, live_id=clip.live_id, timer=rec.timer,
                                support=1)
            ranked[name].append(([p["image_id"] for p in prods], [p["score"] for p in prods]))
            if name == "detector":
                from detector.metrics import coco_detections
                for r, fb in zip(results, boxes):
                    if fb is None:
                        continue  # frame not annotated: no AP contribution
                    img_id = len(ap_images) + 1
                    ap_images.append((img_id, f"{clip.video_id}/{r.index}", r.width, r.height))
                    ap_gt.append([normalised_to_pixels(b, r.width, r.height).tolist() for b in fb])
                    ap_dets += coco_detections(img_id, r.boxes, r.scores)
    gt_ids = [c.gt_image_ids for c in clips]
    ids = {name: [None if r is None else r[0] for r in ranked[name]] for name in settings}
    results = {name: rank_k_accuracy(ids[name], gt_ids, ks) for name in settings}
    products = {name: by_product(ids[name], gt_ids, seen_ids, ks) for name in settings} if seen_ids is not None \
        else {}
    box_ap = None
    if ap_images and sum(len(b) for b in ap_gt):
        from detector.metrics import coco_box_map, coco_ground_truth
        box_ap = coco_box_map(coco_ground_truth(ap_images, ap_gt), ap_dets)
    n = max(1, n_frames_total)
    timings = {}
    for name, rec in settings.items():
        ms = {**rec.timer.ms_per(n), "decode": 1000.0 * decode.total["decode"] / n}  # frames decoded once
        ms = {s: ms[s] for s in ("decode", "detect", "crop", "embed", "aggregate", "search") if s in ms}
        timings[name] = {s: round(v, 3) for s, v in ms.items()}
    out = {"data": str(ds.root), "source": source, "n_queries": len(clips), "n_frames": n_frames_total,
           "aggregation": method, "main_only": main_only, "conf": conf,
           "crop_policy": crop_policy if detector is not None else None, "index": gallery.summary(),
           "results": results, "by_product": products, "box_ap": box_ap, "timings_ms_per_frame": timings,
           "gallery_s": round(t_gallery, 3), "problems": problems.as_dict()}
    if rankings_k:
        out["_rankings"] = {name: ranked[name] for name in settings}
        out["_clips"] = clips
    return out


def write_rankings(path, out: dict, method: str, k: int) -> None:
    """JSON lines, the retriever's format: one per (setting, query) with ranked image ids and scores."""
    from lpr4m.io import atomic_write
    with atomic_write(path) as f:
        for name, ranked in out["_rankings"].items():
            for clip, r in zip(out["_clips"], ranked):
                rec = {"setting": f"{name}/{method}", "video_id": clip.video_id, "live_id": clip.live_id,
                       "gt_image_ids": clip.gt_image_ids, "failed": r is None,
                       "image_ids": [] if r is None else list(r[0][:k]),
                       "scores": [] if r is None else [round(float(s), 6) for s in r[1][:k]]}
                f.write(json.dumps(rec) + "\n")


def results_table(out: dict, ks: Sequence[int]) -> str:
    """Fixed-width table, one row per setting (faiss benchs style)."""
    head = f"{'setting':<20}" + "".join(f"{'R' + str(k):>8}" for k in ks) + f"{'ms/frame':>10}"
    rows = [head]
    for name, r in out["results"].items():
        ms = sum(out["timings_ms_per_frame"][name].values())
        rows.append(f"{name:<20}" + "".join(f"{r['R' + str(k)]:8.3f}" for k in ks) + f"{ms:10.1f}")
    for name, groups in (out.get("by_product") or {}).items():
        for group, r in groups.items():
            if r.get("n_queries"):
                rows.append(f"{name + ' ' + group:<20}" + "".join(f"{r['R' + str(k)]:8.3f}" for k in ks)
                            + f"{'(' + str(r['n_queries']) + ' queries)':>18}")
    if out.get("box_ap"):
        ap = out["box_ap"]
        rows.append(f"detector box AP {ap['ap']:.3f}  AP50 {ap['ap50']:.3f}  AP75 {ap['ap75']:.3f}  "
                    f"on {ap['images']} frames / {ap['gt_boxes']} boxes")
    return "\n".join(rows)


def gallery_from(index_path: Path | None, embedder):
    if index_path is None:
        return None
    from pipeline.gallery import GalleryIndex
    return GalleryIndex.load(index_path, embedder)
