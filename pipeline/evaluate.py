"""``python pipeline/evaluate.py --data ROOT``: the whole two-stage system on a test split.

Rank-1/5/10 (RICE counting) after crop aggregation with the detector on and off (full frames) side by side, the
detector's box AP on the same frames when the split has boxes, and per-stage timings (ms per frame). JSON on
stdout (or ``--out``); ``--save-rankings FILE`` writes ranked ids per query as JSON lines (retriever format).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: resolve packages from the repo root, not from pipeline/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import logging  # noqa: E402
from typing import Sequence  # noqa: E402

from lpr4m.cli import (Parser, device_arg, emit_json, fraction, output_file, parse_ks, positive_float,  # noqa: E402
                       positive_int, run_main, setup_logging)
from lpr4m.errors import BadInput, Problems  # noqa: E402

logger = logging.getLogger("pipeline.evaluate")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.backends import BACKENDS
    from retriever.crops import CROP_POLICIES
    p = Parser(
        prog="python pipeline/evaluate.py", description=__doc__.split("\n\n")[0].split(":", 1)[-1].strip())
    p.add_argument("--data", required=True, help="LPR4M root with a test split")
    p.add_argument("--weights", help="embedder weights (default weights/retriever.<backend suffix>)")
    p.add_argument("--detector-weights", help="detector weights (default weights/detector.<backend suffix>)")
    p.add_argument("--no-detector", action="store_true", help="full frames only")
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--device", type=device_arg, default="auto")
    p.add_argument("--index", help="use this gallery index (default: build one of the split's test galleries)")
    p.add_argument("--source", choices=("frames", "clips"), default="frames",
                   help="query frames (query/<video_id>/, as the retriever) or the clips/<video_id>.mp4 videos")
    p.add_argument("--frames", type=positive_int, default=10, help="up to N query frames spread evenly per clip")
    p.add_argument("--fps", type=positive_float, default=1.0, help="sampling rate for --source clips")
    p.add_argument("--all-views", action="store_true", help="index every view, not only the main image")
    p.add_argument("--aggregation", choices=("mean", "attention", "max"), default=None)
    p.add_argument("--conf", type=fraction, default=0.25, help="detector score a box needs to be cropped")
    p.add_argument("--crops-per-frame", type=positive_int, default=1)
    p.add_argument("--crop-policy", choices=CROP_POLICIES, default="fuse",
                   help="fuse each crop with its full frame by detector confidence (an unsure detection leans on "
                        "the whole frame), or embed the crop alone")
    p.add_argument("--train-data", action="append", default=None, metavar="ROOT",
                   help="the training split(s) the weights saw: rank-k also for queries of products seen there "
                        "and of products never seen; repeatable")
    p.add_argument("--ks", type=parse_ks, default=(1, 5, 10), help="comma-separated k values")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N queries")
    p.add_argument("--save-rankings", type=output_file, metavar="FILE",
                   help="ranked ids + scores per query as JSON lines")
    p.add_argument("--rankings-k", type=positive_int, default=50)
    p.add_argument("--strict", action="store_true", help="the first bad file is fatal")
    p.add_argument("--out", type=output_file, help="write the JSON result here instead of stdout")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from lpr4m.layout import Dataset
    from pipeline import backends
    from pipeline.evaluation import evaluate_system, gallery_from, results_table, write_rankings

    problems = Problems(strict=args.strict)
    ds = Dataset(args.data, problems)
    if not ds.gt_images:
        raise BadInput(ds.annotation("gtimage"), "no test queries in this split")
    device = backends.resolve_device(args.device, args.backend)
    embedder = backends.load_embedder(args.weights, args.backend, device)
    detector = None
    if not args.no_detector:
        detector = backends.load_detector(args.detector_weights, args.backend, device, conf=args.conf)
    seen = None
    if args.train_data:
        from retriever.evaluation import seen_products
        clips = ds.test_clips()[:args.limit] if args.limit else ds.test_clips()
        seen = seen_products(args.train_data, [c.gt_image_ids for c in clips], problems)
    out = evaluate_system(ds, embedder, detector, gallery_from(args.index, embedder), args.frames, args.source,
                          args.fps, not args.all_views, args.ks, args.conf, args.aggregation, args.crops_per_frame,
                          limit=args.limit, rankings_k=args.rankings_k if args.save_rankings else 0,
                          problems=problems, crop_policy=args.crop_policy, seen_ids=seen)
    if args.save_rankings:
        write_rankings(args.save_rankings, out, out["aggregation"], args.rankings_k)
    out.pop("_rankings", None)
    out.pop("_clips", None)
    out.update(weights=str(getattr(embedder, "weights_path", "")), fingerprint=embedder.fingerprint,
               detector=None if detector is None else str(args.detector_weights or "default"), backend=args.backend,
               train_data=args.train_data)
    print(results_table(out, args.ks), file=sys.stderr)
    emit_json(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
