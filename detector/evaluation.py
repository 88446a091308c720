"""``python detector/evaluate.py --data ROOT --weights W``: box AP/AR (pycocotools) on the test frames' boxes.

Every frame listed in ``test_frameid2gtbox`` and present under ``query/`` is one COCO image (an empty box list is
an image with no objects); missing or corrupt frames are skipped and counted. When the dataset gives a product-scale
type per clip (column 8 of ``training_videoinfo`` for the evaluated clips, ``test_videoid_scale*.json``, or
``synth_manifest.json`` of a synthetic set), AP is
also reported per type.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from detector.config import BUNDLED_WEIGHTS
from detector.metrics import coco_box_map, coco_detections, coco_ground_truth
from lpr4m.cli import (Parser, device_arg, emit_json, fraction, image_size, output_dir, output_file, positive_int,
                       progress, setup_logging)
from lpr4m.errors import BadInput, Problems
from lpr4m.ids import parse_frame_id
from lpr4m.images import load_rgb
from lpr4m.io import read_json, write_json
from lpr4m.layout import Dataset

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python detector/evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="LPR4M dataset root with test_frameid2gtbox and query/ frames")
    p.add_argument("--weights", default=str(BUNDLED_WEIGHTS), help=".safetensors/.pt, .onnx or .engine")
    p.add_argument("--device", type=device_arg, default="auto",
                   help="cpu, 0 or cuda:N, or auto: a GPU when this machine (and, for .onnx, ONNX Runtime) has one")
    p.add_argument("--imgsz", type=image_size, help="input size (default: the one in the weights' config)")
    p.add_argument("--conf", type=fraction, default=0.001, help="score threshold (low, as AP needs the whole curve)")
    p.add_argument("--max-det", type=positive_int, default=100, help="detections kept per frame (COCO AR uses 100)")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N annotated frames (quick checks)")
    p.add_argument("--save-json", metavar="DIR", type=output_dir,
                   help="write COCO-format gt.json and detections.json here")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a .pt the safe loader refuses")
    p.add_argument("--strict", action="store_true", help="stop at the first missing or corrupt frame")
    p.add_argument("--out", type=output_file, help="write the JSON result here instead of stdout")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def scale_types(ds: Dataset, video_ids: set[str]) -> dict[str, str]:
    """video_id -> product-scale type for the evaluated clips, where the dataset records one."""
    out: dict[str, str] = {}
    manifest = ds.root / "synth_manifest.json"  # synthetic LPR4M-mini: test clips' types live here
    if manifest.is_file():
        clips = read_json(manifest, expect=dict).get("test_clips", {})
        if isinstance(clips, dict):
            out.update({k: str(v["scale_type"]) for k, v in clips.items()
                        if k in video_ids and isinstance(v, dict) and v.get("scale_type")})
    for path in sorted((ds.root / "annotations").glob("test_videoid_scale*.json")):
        obj = read_json(path, expect=dict)
        out.update({k: str(v) for k, v in obj.items() if k in video_ids and str(v)})
    if ds.annotation("training_videoinfo", required=False) is not None and len(out) < len(video_ids):
        for clip in ds.training_clips(Problems()):
            if clip.video_id in video_ids and clip.scale_type and clip.video_id not in out:
                out[clip.video_id] = clip.scale_type
    return out


def _frames(ds: Dataset, limit: int | None) -> list[tuple[str, list]]:
    items = sorted(ds.gt_boxes.items())
    if not items:
        raise BadInput(ds.annotation("gtbox", required=False) or ds.root / "annotations",
                       "no annotated test frames (expected test_frameid2gtbox*.json with frame boxes)")
    return items[:limit] if limit else items


def _load(ds: Dataset, items: Sequence[tuple[str, list]], problems: Problems) -> Iterator[tuple[str, list, np.ndarray]]:
    """Decode frames in a small thread pool (I/O and libjpeg release the GIL), in order; bad ones are counted."""
    def one(item):
        frame_id, boxes = item
        try:
            return frame_id, boxes, load_rgb(ds.query_frame_path(frame_id)), None
        except BadInput as err:
            return frame_id, boxes, None, err

    with ThreadPoolExecutor(max_workers=2) as pool:
        for frame_id, boxes, rgb, err in pool.map(one, items):
            if err is not None:
                problems.add(err, "missing_frame" if "not found" in str(err) else "corrupt_frame")
                continue
            yield frame_id, boxes, rgb


def evaluate(ds: Dataset, detector, limit: int | None = None, batch: int = 8, problems: Problems | None = None,
             save_json: str | None = None) -> dict:
    """COCO box metrics of ``detector`` on the dataset's annotated test frames."""
    problems = problems or Problems()
    items = _frames(ds, limit)
    images, gt_boxes, dets, frame_ids = [], [], [], []
    t_detect, n_frames = 0.0, 0
    bar = progress(total=len(items), desc="evaluate", unit="frame")

    def flush(buf):
        nonlocal t_detect, n_frames
        t = time.perf_counter()
        results = detector.detect([rgb for _, _, rgb in buf])
        t_detect += time.perf_counter() - t
        for (frame_id, boxes, rgb), det in zip(buf, results):
            h, w = rgb.shape[:2]
            image_id = len(images) + 1
            images.append((image_id, frame_id + ".jpg", w, h))
            gt_boxes.append([[x1 * w, y1 * h, x2 * w, y2 * h] for x1, y1, x2, y2 in boxes])
            dets.extend(coco_detections(image_id, det.xyxy, det.scores))
            frame_ids.append(frame_id)
        n_frames += len(buf)
        bar.update(len(buf))

    buf = []
    for row in _load(ds, items, problems):
        buf.append(row)
        if len(buf) == batch:
            flush(buf)
            buf = []
    if buf:
        flush(buf)
    bar.close()
    if not images:
        raise BadInput(ds.root / "query", "none of the annotated test frames could be read")
    gt = coco_ground_truth(images, gt_boxes)
    result = {"metrics": coco_box_map(gt, dets)}
    video_of = {i: parse_frame_id(f)[0] for (i, *_), f in zip(images, frame_ids)}
    types = scale_types(ds, set(video_of.values()))
    if types:
        groups = defaultdict(list)
        for image_id, video_id in video_of.items():
            if video_id in types:
                groups[types[video_id]].append(image_id)
        # LPR4M's product-scale types, not COCO's box-area bins (whose ap_small/... would read as the same thing)
        keep = ("ap", "ap50", "ap75", "ar100", "images")
        result["by_scale_type"] = {t: {k: v for k, v in coco_box_map(gt, dets, ids).items() if k in keep}
                                   for t, ids in sorted(groups.items())}
    result.update(frames=n_frames, frames_listed=len(items), detections=len(dets),
                  ms_per_frame_detect=round(1000 * t_detect / max(n_frames, 1), 2), problems=problems.as_dict())
    if save_json:
        out = Path(save_json)
        write_json(out / "gt.json", gt, indent=None)
        write_json(out / "detections.json", dets, indent=None)
        result["saved"] = [str(out / "gt.json"), str(out / "detections.json")]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate detector weights on a dataset's test boxes; prints the JSON metrics."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from detector.infer import load_detector
    problems = Problems(strict=args.strict)
    ds = Dataset(args.data, problems)
    det = load_detector(args.weights, device=args.device, conf=args.conf, imgsz=args.imgsz,
                        trust_pickle=args.trust_pickle, batch_size=args.batch)
    det.max_det = args.max_det
    result = evaluate(ds, det, limit=args.limit, batch=args.batch, problems=problems,
                      save_json=args.save_json)
    result.update(weights=str(args.weights), backend=det.name, imgsz=det.imgsz, conf=det.conf)
    if result["metrics"].get("ap") is None:  # every box skipped: an AP of nothing is not a result
        raise BadInput(ds.root, f"no test box left to score ({problems.total} problem(s), e.g. "
                                f"{problems.messages[0] if problems.messages else 'no test boxes'})")
    emit_json(result, args.out)
    return 0
