"""Pseudo-labels: a teacher detector boxes real training frames that carry no boxes, so a student trains on them.

    python detector/pseudo_label.py --data ROOT --weights TEACHER --out OUT [--min-score 0.5]

OUT is a new LPR4M root that ``detector/train.py --data`` takes beside the others. Its ``training_video/<video_id>``
folders link to ROOT's (no copies). A frame keeps the teacher's best box when that box scores at least
``--min-score`` (LPR4M boxes one presented product a frame); a frame without a confident box is left out, not
written as "no product", since a teacher that is unsure is no evidence of absence. A seeded ``--val-fraction`` of
the labelled clips becomes the test split (``query/`` links and ``test_frameid2gtbox``), which the trainer's
validation reads. ROOT's own boxed clips are not relabelled.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
from pathlib import Path

import numpy as np

from lpr4m.annotations import TrainingClip, write_id_map, write_training_videoinfo
from lpr4m.cli import (Parser, command_line, emit_json, fraction, nonnegative_int, output_file, output_folder, progress,
                       setup_logging)
from lpr4m.errors import BadInput, Problems
from lpr4m.io import new_folder, write_json
from lpr4m.layout import Dataset

logger = logging.getLogger(__name__)


def label_clips(ds: Dataset, detector, min_score: float, problems: Problems, exclude: frozenset = frozenset(),
                batch: int = 16):
    """``(clip, kept frame ids, their boxes, their scores)`` for each unboxed training clip whose product is not in
    ``exclude``."""
    from lpr4m.images import load_rgb
    clips = [c for c in ds.training_clips(problems) if not c.has_boxes and c.image_id not in exclude]
    for clip in progress(clips, desc="pseudo-labels", unit="clip"):
        frames, ids = [], []
        for frame_id in clip.frame_ids:
            try:
                frames.append(load_rgb(ds.training_frame_path(frame_id)))
                ids.append(frame_id)
            except BadInput as err:
                problems.add(err, "bad_frame")
        kept, boxes, scores = [], [], []
        for i in range(0, len(frames), batch):
            for frame_id, rgb, det in zip(ids[i:i + batch], frames[i:i + batch],
                                          detector.detect(frames[i:i + batch])):
                if len(det) and det.scores[0] >= min_score:
                    h, w = rgb.shape[:2]
                    x1, y1, x2, y2 = (det.xyxy[0] / np.array([w, h, w, h], np.float32)).clip(0, 1).tolist()
                    if x2 > x1 and y2 > y1:
                        kept.append(frame_id)
                        boxes.append([round(x1, 6), round(y1, 6), round(x2, 6), round(y2, 6)])
                        scores.append(float(det.scores[0]))
        yield clip, kept, boxes, scores


def read_id_list(path) -> frozenset:
    """Image ids, one a line (``#`` comments and blank lines ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(path, f"unreadable id list ({type(err).__name__}; expected one image id a line)") from None
    return frozenset(t for line in lines if (t := line.split("#")[0].strip()))


def pseudo_label(data, weights, out, min_score: float = 0.5, val_fraction: float = 0.1, seed: int = 0,
                 device: str = "cpu", strict: bool = False, exclude: frozenset = frozenset(),
                 made_by: str = "") -> dict:
    from detector import load_detector
    problems = Problems(strict=strict)
    ds = Dataset(data, problems)
    detector = load_detector(weights, device=device, conf=min(min_score, 0.25))
    with new_folder(out, "pseudo_label") as root:  # refuses a used OUT before any work
        labelled = [item for item in label_clips(ds, detector, min_score, problems, exclude) if item[1]]
        if not labelled:
            raise BadInput(data, f"no training frame got a box scoring >= {min_score} (lower --min-score, or the "
                                 "root has no unboxed training clips)")
        order = list(range(len(labelled)))
        random.Random(seed).shuffle(order)
        n_val = min(len(labelled) - 1, round(val_fraction * len(labelled))) if val_fraction > 0 else 0
        val = set(order[:n_val])
        rows, gt_boxes, scores = [], {}, []
        for i, (clip, kept, boxes, clip_scores) in enumerate(labelled):
            split = "query" if i in val else "training_video"
            (root / split).mkdir(exist_ok=True)
            os.symlink(ds.path("training_video", clip.video_id).resolve(), root / split / clip.video_id,
                       target_is_directory=True)
            scores += clip_scores
            if i in val:
                gt_boxes.update((f, [b]) for f, b in zip(kept, boxes))
            else:
                rows.append(TrainingClip(video_id=clip.video_id, frame_ids=kept, boxes=[[b] for b in boxes],
                                         image_id=clip.image_id, image_title=clip.image_title))
        write_training_videoinfo(root / "annotations" / "training_videoinfo.txt", rows)
        write_id_map(root / "annotations" / "test_frameid2gtbox.json", gt_boxes)
        frames_total = sum(len(c.frame_ids) for c, _, _, _ in labelled)
        summary = {"source": str(Path(data).resolve()), "teacher": str(weights), "min_score": min_score,
                   "excluded_products": len(exclude), "clips_labelled": len(labelled), "train_clips": len(rows),
                   "val_clips": len(val),
                   "frames_labelled": len(scores), "frames_seen_in_labelled_clips": frames_total,
                   "median_score": round(float(np.median(scores)), 4), "made_by": made_by,
                   "problems": problems.as_dict() if problems.total else None}
        write_json(root / "pseudo_labels.json", summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python detector/pseudo_label.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="LPR4M root whose unboxed training clips are labelled")
    p.add_argument("--weights", required=True, help="teacher detector (.safetensors, .onnx, .engine)")
    p.add_argument("--out", required=True, type=output_folder, help="new (or empty) folder for the labelled root")
    p.add_argument("--min-score", type=fraction, default=0.5, help="teacher score a box needs to become a label")
    p.add_argument("--val-fraction", type=fraction, default=0.1, help="labelled clips kept for validation")
    p.add_argument("--exclude-products", metavar="FILE",
                   help="image ids (one a line) whose clips are not labelled, e.g. products a test set holds out")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable frame")
    p.add_argument("--out-json", type=output_file, help="write the JSON summary here instead of stdout")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    summary = pseudo_label(args.data, args.weights, args.out, args.min_score, args.val_fraction, args.seed,
                           args.device, args.strict,
                           read_id_list(args.exclude_products) if args.exclude_products else frozenset(),
                           command_line("detector/pseudo_label.py", argv))
    emit_json(summary, args.out_json)
    return 0
