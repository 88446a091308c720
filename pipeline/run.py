"""``python pipeline/run.py --clip x.mp4``: the products a clip presents, ranked, with the frames that show them.

Defaults: bundled weights (``weights/``) and the bundled demo gallery (``demo/gallery``), whose index is built on
the fly and cached. The ranked products go to stdout as text; ``--json OUT`` (``-`` = stdout) and ``--html OUT``
write the same content, atomically, after everything has succeeded (a failure leaves no partial file).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: resolve packages from the repo root, not from pipeline/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import logging  # noqa: E402
from typing import Sequence  # noqa: E402

from lpr4m.cli import (Parser, device_arg, fraction, nonnegative_int, output_file, positive_float,  # noqa: E402
                       positive_int, run_main, setup_logging)
from lpr4m.errors import BadInput  # noqa: E402

logger = logging.getLogger("pipeline.run")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.backends import BACKENDS, DEMO_DIR
    from retriever.crops import CROP_POLICIES
    p = Parser(
        prog="python pipeline/run.py", description=__doc__.split("\n\n")[0].split(":", 1)[-1].strip())
    p.add_argument("--clip", required=True, help="video file (mp4, mov, mkv, avi, ...)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gallery", help=f"folder of shop images (or an LPR4M root); default: {DEMO_DIR / 'gallery'}")
    g.add_argument("--index", help="a gallery index folder made by pipeline/index.py")
    p.add_argument("--live", help="rank only among this live's gallery (LPR4M protocol)")
    p.add_argument("--fps", type=positive_float, default=1.0, help="frames sampled per second")
    p.add_argument("--max-frames", type=positive_int, default=None, help="stop after this many sampled frames")
    p.add_argument("--topk", type=positive_int, default=5, help="products to list")
    p.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto",
                   help="inference runtime; auto = ONNX Runtime when weights/*.onnx are fresh exports, else torch")
    p.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--weights", help="embedder weights (default weights/retriever.<backend suffix>)")
    p.add_argument("--detector-weights", help="detector weights (default weights/detector.<backend suffix>)")
    p.add_argument("--no-detector", action="store_true", help="embed full frames (no detection, no crops)")
    p.add_argument("--conf", type=fraction, default=0.25, help="detector score threshold")
    p.add_argument("--crops-per-frame", type=positive_int, default=1,
                   help="highest-scoring detections embedded per frame")
    p.add_argument("--crop-policy", choices=CROP_POLICIES, default="fuse",
                   help="fuse each crop with its full frame by detector confidence (an unsure detection leans on "
                        "the whole frame), or embed the crop alone")
    p.add_argument("--aggregation", choices=("mean", "attention", "max"), default=None,
                   help="clip aggregation (default: the embedder's config)")
    p.add_argument("--batch", type=positive_int, default=8, help="frames per detect/embed batch")
    p.add_argument("--segment", action="store_true", help="split a long recording into product segments")
    p.add_argument("--seg-window", type=positive_float, default=5.0, help="segmentation window (seconds)")
    p.add_argument("--seg-threshold", type=fraction, default=0.7,
                   help="cosine similarity below which a window starts a new product")
    p.add_argument("--seg-hysteresis", type=positive_int, default=2,
                   help="odd windows in a row that confirm a change")
    p.add_argument("--json", metavar="OUT", type=output_file, help="write the result as JSON ('-' = stdout)")
    p.add_argument("--html", metavar="OUT", type=output_file, help="write a self-contained HTML report")
    p.add_argument("--html-frames", type=nonnegative_int, default=48,
                   help="most frame thumbnails kept for the HTML report")
    p.add_argument("--strict", action="store_true", help="an unreadable shop image is fatal")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def check_outputs(*outs: str | None) -> None:
    """Fail before any work when an output cannot be written (not after a long run)."""
    for out in outs:
        if out and out != "-":
            parent = Path(out).resolve().parent
            if Path(out).is_dir():
                raise BadInput(out, "is a folder (expected a file name)")
            if not parent.exists():
                continue  # created on write
            if not parent.is_dir():
                raise BadInput(out, "parent is not a folder")


def load_gallery(args, embedder):
    from pipeline.backends import DEMO_DIR
    from pipeline.gallery import GalleryIndex, cached_index
    if args.index:
        gallery = GalleryIndex.load(args.index, embedder)
        if not gallery.ntotal:  # every image removed: nothing to rank against
            raise BadInput(args.index, "the index holds no shop images (add some: pipeline/index.py --add DIR)")
        gallery.report_skipped(args.strict)
        return gallery
    gallery = Path(args.gallery) if args.gallery else DEMO_DIR / "gallery"
    if not args.gallery and not gallery.is_dir():
        raise BadInput(gallery, "bundled demo gallery missing; pass --gallery DIR or --index INDEX "
                                "(or regenerate it: python pipeline/make_demo.py)")
    return cached_index(gallery, embedder, strict=args.strict)


def load_pipeline(args):
    """(device, embedder, detector or None, gallery index) from the flags run.py and live.py share."""
    from pipeline import backends
    from pipeline.gallery import check_live_ids
    args.backend = backends.resolve_backend(args.backend, args.weights, args.detector_weights)
    device = backends.resolve_device(args.device, args.backend)
    embedder = backends.load_embedder(args.weights, args.backend, device)
    detector = None if args.no_detector else backends.load_detector(args.detector_weights, args.backend, device,
                                                                      conf=args.conf)
    gallery = load_gallery(args, embedder)
    if args.live is not None:
        check_live_ids([args.live], gallery.live_ids, args.index or args.gallery or backends.DEMO_DIR / "gallery")
    return device, embedder, detector, gallery


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from lpr4m.frames import probe_video
    from lpr4m.io import atomic_write, write_json
    from pipeline.recognize import recognize_video
    from pipeline.report import html_report, text_report

    check_outputs(args.json, args.html)
    probe_video(args.clip)  # a bad clip fails here, before models load
    device, embedder, detector, gallery = load_pipeline(args)
    result, rec = recognize_video(
        args.clip, embedder, gallery, detector, fps=args.fps, max_frames=args.max_frames, k=args.topk,
        method=args.aggregation, crops_per_frame=args.crops_per_frame, crop_policy=args.crop_policy,
        thumbs=args.html_frames if args.html else 0,
        segment=args.segment, seg_window_s=args.seg_window, seg_threshold=args.seg_threshold,
        seg_hysteresis=args.seg_hysteresis, live_id=args.live, batch=args.batch,
        settings={"backend": args.backend, "device": device, "index": str(gallery.path) if gallery.path else None,
                  "gallery_products": len(gallery.image_ids)})
    text = text_report(result)
    page = None
    if args.html:
        shop_paths = {}
        for it in gallery.items.values():
            if it.view == 0 or it.image_id not in shop_paths:
                path = gallery.item_path(it)
                if path is not None:
                    shop_paths[it.image_id] = str(path)
        page = html_report(result, rec.thumbs.kept if rec.thumbs else {}, shop_paths)
    # outputs only now, each atomically: a failure above leaves nothing behind
    if args.json == "-":
        import json
        print(text, file=sys.stderr)
        json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(text)
        if args.json:
            write_json(args.json, result)
    if page is not None:
        with atomic_write(args.html) as f:
            f.write(page)
        logger.info("HTML report: %s", args.html)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
