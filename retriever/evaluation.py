"""Rank-k evaluation of an embedder on an LPR4M test split (``python retriever/evaluate.py``).

Each query clip: up to N frames spread evenly -> crops (gt / detector / none) -> embeddings -> aggregation ->
faiss search in its live's gallery (and optionally one global gallery) -> RICE counting (retriever.metrics).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lpr4m.cli import (Parser, device_arg, emit_json, output_file, parse_ks, positive_int, progress, setup_logging,
                       torch_device)
from lpr4m.errors import BadInput, Problems
from lpr4m.images import load_rgb
from lpr4m.layout import Dataset
from retriever.aggregate import aggregate
from retriever.crops import CROP_MODES, CROP_POLICIES, clip_inputs, combine_views, detector_views, even_indices
from retriever.metrics import DEFAULT_KS, by_product, rank_k_accuracy, recall_table, search_galleries, search_sets

logger = logging.getLogger(__name__)

GLOBAL = "__global__"
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "retriever.safetensors"


@dataclass
class QuerySet:
    """Frame/crop embeddings of every test clip (None = failed query) with its live and answers."""

    video_ids: list[str]
    live_ids: list[str]
    gt_ids: list[list[str]]
    frame_embs: list[np.ndarray | None]
    problems: Problems = field(default_factory=Problems)


def embed_queries(ds: Dataset, embedder, crops: str = "none", n_frames: int = 10, detector=None,
                  problems: Problems | None = None, limit: int | None = None, chunk: int = 32,
                  batch_size: int = 32, crop_policy: str = "fuse") -> QuerySet:
    """Embed the chosen frames (or crops) of each test clip; a clip with no readable frame fails. Detector crops
    are fused with their full frames by ``crop_policy`` (``retriever.crops.crop_weight``), as in the pipeline."""
    problems = problems or Problems()
    clips = ds.test_clips()[:limit] if limit else ds.test_clips()
    qs = QuerySet([c.video_id for c in clips], [c.live_id for c in clips], [c.gt_image_ids for c in clips],
                  [None] * len(clips), problems)
    bar = progress(total=len(clips), desc="queries", unit="clip")
    for start in range(0, len(clips), chunk):
        images, owners, plans = [], [], {}
        for qi in range(start, min(start + chunk, len(clips))):
            clip = clips[qi]
            idx = even_indices(len(clip.frame_paths), n_frames)
            frames, boxes = [], []
            for i in idx:
                try:
                    frames.append(load_rgb(clip.frame_paths[i]))
                    boxes.append(clip.boxes[i] if i < len(clip.boxes) else None)
                except BadInput as err:
                    problems.add(err, "bad_frame")
            if not frames:
                problems.add(BadInput(ds.root / "query" / clip.video_id, "query clip has no readable frame"),
                             "failed_query")
                continue
            if crops == "detector":
                inputs, plan = detector_views(frames, detector, crop_policy)
                plans[qi] = plan
            else:
                inputs = clip_inputs(frames, crops, boxes, detector)
            images += inputs
            owners += [qi] * len(inputs)
        if images:
            embs = embedder.embed(images, batch_size=batch_size)
            owners_arr = np.asarray(owners)
            for qi in np.unique(owners_arr):
                rows = embs[owners_arr == qi]
                qs.frame_embs[qi] = combine_views(rows, plans[qi]) if qi in plans else rows
        bar.update(min(start + chunk, len(clips)) - start)
    bar.close()
    return qs


def embed_galleries(ds: Dataset, embedder, live_ids: Sequence[str], main_only: bool = True,
                    problems: Problems | None = None, batch_size: int = 32) -> dict[str, tuple[list[str], np.ndarray]]:
    """``{live_id: (image ids, (G, D) embeddings)}`` plus a ``GLOBAL`` gallery of all of them.

    With several views per image (``main_only=False``) an id appears once per view; rankings are de-duplicated
    so an image ranks at the place of its best view.
    """
    problems = problems or Problems()
    files: dict[Path, tuple[str, str]] = {}
    per_live: dict[str, list[Path]] = {}
    for live in sorted(set(live_ids) | set(ds.live_galleries)):
        entries = ds.gallery(live, main_only=main_only)
        listed = ds.live_galleries.get(live, [])
        present = {i for i, _, _ in entries}
        for image_id in listed:
            if image_id not in present:
                problems.add(BadInput(ds.root / "gallery" / live, f"gallery image {image_id} listed but missing"),
                             "missing_gallery_image")
        per_live[live] = [p for _, _, p in entries]
        for image_id, _, p in entries:
            files[p] = (live, image_id)
    paths = list(files)
    embs = np.zeros((len(paths), embedder.dim), np.float32)
    ok = np.zeros(len(paths), bool)
    bar = progress(total=len(paths), desc="gallery", unit="img")
    for s in range(0, len(paths), 256):
        imgs, rows = [], []
        for r in range(s, min(s + 256, len(paths))):
            try:
                imgs.append(load_rgb(paths[r]))
                rows.append(r)
            except BadInput as err:
                problems.add(err, "bad_gallery_image")
        if imgs:
            embs[rows] = embedder.embed(imgs, batch_size=batch_size)
            ok[rows] = True
        bar.update(min(s + 256, len(paths)) - s)
    bar.close()
    row_of = {p: r for r, p in enumerate(paths)}
    out = {}
    for live, ps in per_live.items():
        rows = [row_of[p] for p in ps if ok[row_of[p]]]
        out[live] = ([files[paths[r]][1] for r in rows], embs[rows])
    # global gallery: every test shop image once (main view, or each view of it)
    seen, rows = set(), []
    for r, p in enumerate(paths):
        key = (files[p][1], p.name)
        if ok[r] and key not in seen:
            seen.add(key)
            rows.append(r)
    out[GLOBAL] = ([files[paths[r]][1] for r in rows], embs[rows])
    return out


def _dedupe(result, k):
    if result is None:
        return None
    ids, scores = result
    seen, out_ids, out_scores = set(), [], []
    for i, s in zip(ids, scores):
        if i not in seen:
            seen.add(i)
            out_ids.append(i)
            out_scores.append(float(s))
    return out_ids[:k], np.asarray(out_scores[:k], np.float32)


def rank_queries(qs: QuerySet, galleries, method: str = "mean", gallery_mode: str = "live", k: int = 10,
                 embedder=None, multi_view: bool = False):
    """Per query (ranked ids, scores) or None, for one aggregation and gallery mode."""
    names = [None if e is None else (GLOBAL if gallery_mode == "global" else live)
             for e, live in zip(qs.frame_embs, qs.live_ids)]
    search_k = k * 8 if multi_view else k
    if method == "max":
        res = search_sets(qs.frame_embs, names, galleries, search_k)
    else:
        dim = next((e.shape[1] for e in qs.frame_embs if e is not None), 1)
        q = np.zeros((len(names), dim), np.float32)
        for i, e in enumerate(qs.frame_embs):
            if e is not None:
                q[i] = aggregate(e, method, embedder)
        res = search_galleries(q, names, galleries, search_k)
    return [_dedupe(r, k) for r in res] if multi_view else res


def evaluate(ds: Dataset, embedder, crops: str = "none", methods: Sequence[str] = ("mean",),
             gallery_modes: Sequence[str] = ("live",), n_frames: int = 10, main_only: bool = True,
             ks: Sequence[int] = DEFAULT_KS, detector=None, problems: Problems | None = None,
             limit: int | None = None, rankings_k: int = 0, batch_size: int = 32,
             seen_ids: set[str] | None = None, crop_policy: str = "fuse") -> dict:
    """All requested (aggregation x gallery mode) results for one embedder; rankings kept when asked; with
    ``seen_ids`` (the training products) also per group of queries, seen and unseen in training."""
    problems = problems or Problems()
    t0 = time.perf_counter()
    qs = embed_queries(ds, embedder, crops, n_frames, detector, problems, limit, batch_size=batch_size,
                       crop_policy=crop_policy)
    t1 = time.perf_counter()
    galleries = embed_galleries(ds, embedder, qs.live_ids, main_only, problems, batch_size=batch_size)
    count_unreachable_answers(ds, qs, galleries, problems)
    t2 = time.perf_counter()
    k = max(max(ks), rankings_k)
    results, rankings, products = {}, {}, {}
    for mode in gallery_modes:
        for method in methods:
            ranked = rank_queries(qs, galleries, method, mode, k, embedder, multi_view=not main_only)
            key = f"{mode}/{method}"
            ids = [None if r is None else r[0] for r in ranked]
            results[key] = rank_k_accuracy(ids, qs.gt_ids, ks)
            if seen_ids is not None:
                products[key] = by_product(ids, qs.gt_ids, seen_ids, ks)
            if rankings_k:
                rankings[key] = ranked
    t3 = time.perf_counter()
    return {"results": results, "by_product": products, "rankings": rankings, "queries": qs,
            "timing_s": {"embed_queries": round(t1 - t0, 3), "embed_gallery": round(t2 - t1, 3),
                         "search": round(t3 - t2, 3)}}


def count_unreachable_answers(ds: Dataset, qs: QuerySet, galleries, problems: Problems) -> None:
    """A query none of whose answers is in its live's gallery can only miss: RICE counts it as a miss, and so do
    we, but it is a fault of the data, so it is counted and named too."""
    for video_id, live, gt in zip(qs.video_ids, qs.live_ids, qs.gt_ids):
        ids = set(galleries.get(live, ([], None))[0])
        if not ids.intersection(gt):
            problems.add(BadInput(ds.root / "gallery" / live, f"query {video_id}: none of its ground-truth images "
                                  f"({', '.join(gt)}) is in live {live}'s gallery; counted as a miss"),
                         "answer_not_in_gallery")


def write_rankings(path, qs: QuerySet, rankings: dict, k: int) -> None:
    """JSON lines: one per (setting, query) with ranked image ids and scores."""
    from lpr4m.io import atomic_write
    with atomic_write(path) as f:
        for key, ranked in rankings.items():
            for vid, live, gt, r in zip(qs.video_ids, qs.live_ids, qs.gt_ids, ranked):
                rec = {"setting": key, "video_id": vid, "live_id": live, "gt_image_ids": gt,
                       "failed": r is None, "image_ids": [] if r is None else list(r[0][:k]),
                       "scores": [] if r is None else [round(float(s), 6) for s in r[1][:k]]}
                f.write(json.dumps(rec) + "\n")


def seen_products(train_roots: Sequence[str], test_gt_ids: Sequence[Sequence[str]],
                  problems: Problems | None = None) -> set[str]:
    """The products of ``--train-data`` roots; a split sharing no product with the test queries, or sharing all of
    them, is said plainly (a warning), since one of the two groups is then empty."""
    seen: set[str] = set()
    for root in train_roots:
        seen |= Dataset(root, problems).training_image_ids()
    n_seen = sum(1 for gt in test_gt_ids if set(gt) & seen)
    if not test_gt_ids:
        logger.warning("the test split has no queries: nothing to report as seen or unseen")
    elif n_seen == 0:
        logger.warning("--train-data shares no product with the %d test queries: every query is unseen",
                       len(test_gt_ids))
    elif n_seen == len(test_gt_ids):
        logger.warning("every test query's product is in --train-data: no unseen queries to report")
    return seen


def product_table(split: dict, ks: Sequence[int]) -> str:
    """``recall_table`` rows for the seen / unseen groups of each setting."""
    rows = {f"{key} {group}": r for key, groups in split.items() for group, r in groups.items()
            if r.get("n_queries")}
    return recall_table(rows, ks) if rows else ""


def frozen_embedder(backbone: str, input_size: int | None = None, device: str = "cpu"):
    """An Embedder on a pretrained backbone's pooled features, no projection (the "frozen ImageNet" row)."""
    from retriever.config import EmbedderConfig
    from retriever.embedder import Embedder, TorchBackend
    from retriever.models import create_embedder
    model, spec = create_embedder(backbone, pretrained=True, embed_dim=0)
    config = EmbedderConfig(backbone=backbone, embed_dim=model.embed_dim, input_size=input_size or spec.input_size,
                            mean=spec.mean, std=spec.std, sha256="pretrained")
    return Embedder(TorchBackend(model, device), config)


def _default_detector_weights() -> Path | None:
    root = Path(__file__).resolve().parents[1] / "weights"
    for name in ("detector.safetensors", "detector.pt", "detector.onnx"):
        if (root / name).is_file():
            return root / name
    return None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="retriever/evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="LPR4M root with a test split")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help=".safetensors / .onnx / .engine embedder")
    which.add_argument("--frozen-backbone", default=None,
                       help="instead of --weights: the pretrained backbone's own pooled features (a baseline)")
    p.add_argument("--input-size", type=positive_int, default=None, help="with --frozen-backbone (default: its own)")
    p.add_argument("--crops", choices=CROP_MODES + ("auto",), default="auto",
                   help="what is embedded: ground-truth crops, detector crops or full frames "
                        "(auto: gt when the split has boxes)")
    p.add_argument("--detector", default=None, help="detector weights for --crops detector (default weights/detector.*)")
    p.add_argument("--crop-policy", choices=CROP_POLICIES, default="fuse",
                   help="--crops detector: fuse each crop with its full frame by detector confidence, or the crop "
                        "alone")
    p.add_argument("--tta", choices=("none", "flip"), default=None,
                   help="test-time augmentation (default: the weights' config)")
    p.add_argument("--aggregation", default=None,
                   help="mean | attention | max | all, or a comma list (default: the weights' config)")
    p.add_argument("--frames", type=positive_int, default=10, help="up to N frames spread evenly over each clip")
    p.add_argument("--gallery", choices=("live", "global", "both"), default="live",
                   help="rank in each query's live gallery (RICE), in all test shop images, or both")
    p.add_argument("--all-views", action="store_true", help="use every view, not only the main image (-0)")
    p.add_argument("--ks", type=parse_ks, default=DEFAULT_KS, help="comma-separated k values")
    p.add_argument("--train-data", action="append", default=None, metavar="ROOT",
                   help="the training split(s) the weights saw: rank-k is also reported for queries whose product "
                        "is in them (seen) and for the others (unseen); repeatable")
    p.add_argument("--save-rankings", type=output_file, default=None,
                   help="write ranked ids + scores per query as JSON lines")
    p.add_argument("--rankings-k", type=positive_int, default=50, help="how many ranked ids --save-rankings keeps")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N queries")
    p.add_argument("--device", type=device_arg, default="auto",
                   help="cpu, 0 or cuda:N, or auto: a GPU when this machine (and, for .onnx, ONNX Runtime) has one")
    p.add_argument("--batch-size", "--batch", type=positive_int, default=32)
    p.add_argument("--strict", action="store_true", help="the first bad file is fatal")
    p.add_argument("--out", type=output_file, default=None, help="write the JSON result here instead of stdout")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from retriever.embedder import load_embedder
    problems = Problems(strict=args.strict)
    ds = Dataset(args.data, problems)
    # each runtime resolves --device itself: "auto" is a GPU for torch when CUDA is there, and for ONNX Runtime
    # only when it has a CUDA provider (resolving it here for torch would make ONNX Runtime refuse a plain "cuda")
    device = args.device
    if args.frozen_backbone:
        embedder = frozen_embedder(args.frozen_backbone, args.input_size, torch_device(device))
        args.weights = f"frozen:{args.frozen_backbone}"
    else:
        embedder = load_embedder(args.weights, device=device)
    if args.tta:
        embedder.config.tta = args.tta
    crops = args.crops
    if crops == "auto":
        crops = "gt" if ds.gt_boxes else "none"
    detector = None
    if crops == "detector":
        from retriever.crops import load_detector
        weights = args.detector or _default_detector_weights()
        if weights is None:
            raise BadInput("weights/", "--crops detector: no --detector given and no weights/detector.* found")
        detector = load_detector(weights, device=device)
    agg = args.aggregation or embedder.config.aggregation
    methods = ("mean", "attention", "max") if agg == "all" else tuple(agg.split(","))
    for m in methods:
        if m not in ("mean", "attention", "max"):
            raise BadInput(None, f"--aggregation {m!r}: expected mean, attention, max or all")
    modes = ("live", "global") if args.gallery == "both" else (args.gallery,)
    seen = None
    if args.train_data:
        clips = ds.test_clips()[:args.limit] if args.limit else ds.test_clips()
        seen = seen_products(args.train_data, [c.gt_image_ids for c in clips], problems)
    out = evaluate(ds, embedder, crops, methods, modes, args.frames, not args.all_views, args.ks, detector,
                   problems, args.limit, args.rankings_k if args.save_rankings else 0, args.batch_size, seen,
                   args.crop_policy)
    if args.save_rankings:
        write_rankings(args.save_rankings, out["queries"], out["rankings"], args.rankings_k)
    logger.info("\n%s", recall_table({f"{crops}/{k}": v for k, v in out["results"].items()}, args.ks))
    if out["by_product"]:
        logger.info("\n%s", product_table(out["by_product"], args.ks))
    result = {"data": str(ds.root), "weights": str(args.weights), "fingerprint": embedder.fingerprint,
              "crops": crops, "crop_policy": args.crop_policy if crops == "detector" else None,
              "tta": embedder.config.tta, "frames": args.frames, "main_only": not args.all_views,
              "results": out["results"],
              "by_product": out["by_product"], "train_data": args.train_data,
              "timing_s": out["timing_s"], "problems": problems.as_dict()}
    emit_json(result, args.out)
    return 0
