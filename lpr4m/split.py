"""An open-set split of an LPR4M root by product (``python -m lpr4m split ROOT OUT --holdout-products 0.25``).

LPR4M's test lives show products its training lives do not, and so does a shop's catalogue tomorrow: model
selection needs queries of products the model never trained on. The split holds out a seeded fraction of the
training products (shop image ids): their training clips leave ``training_videoinfo`` and become test queries,
ranked in a gallery of their own live's products (the live's training shop images). The root's own test split
is kept as it is, so its queries of held-out products count as unseen too. Files are symbolic links to ROOT,
not copies; the folder is built aside and renamed into place.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np

from lpr4m import annotations as ann
from lpr4m.cli import Parser, emit_json, fraction, nonnegative_int, output_file, output_folder, setup_logging
from lpr4m.errors import BadInput, Problems
from lpr4m.io import new_folder, write_json
from lpr4m.layout import Dataset

logger = logging.getLogger(__name__)


def choose_holdout(products: list[str], holdout: float, seed: int) -> set[str]:
    """A seeded ``holdout`` fraction of ``products`` (at least one, never all)."""
    if len(products) < 2:
        raise BadInput(None, f"a split by product needs at least 2 training products, found {len(products)}")
    n = min(len(products) - 1, max(1, round(holdout * len(products))))
    if n != round(holdout * len(products)):
        logger.warning("--holdout-products %g of %d products rounds to %d; holding out %d (at least one, never all)",
                       holdout, len(products), round(holdout * len(products)), n)
    rng = np.random.default_rng(seed)
    return set(rng.choice(sorted(products), size=n, replace=False).tolist())


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target.resolve(), link)


def split_by_product(root, out, holdout: float = 0.25, seed: int = 0, problems: Problems | None = None) -> dict:
    """Write the split to ``out`` (a new or empty folder); returns its summary (also saved as ``split.json``)."""
    problems = problems or Problems()
    ds = Dataset(root, problems)
    out = Path(out)
    if out.resolve() == ds.root.resolve() or ds.root.resolve() in out.resolve().parents:
        raise BadInput(out, "must not lie inside the dataset it splits")
    rows = list(ds.training_clips(problems))
    title_of = {r.image_id: r.image_title for r in rows}
    held = choose_holdout(sorted(title_of), holdout, seed)
    gt = dict(ds.gt_images) if ds.annotation("gtimage", required=False) else {}
    galleries = dict(ds.live_galleries) if ds.annotation("gallery", required=False) else {}
    titles, asr = dict(ds.titles), dict(ds.asr)

    with new_folder(out, "split") as staging:
        (staging / "annotations").mkdir(parents=True)
        kept = [r for r in rows if r.image_id not in held]
        ann.write_training_videoinfo(staging / "annotations" / "training_videoinfo.txt", kept)
        for r in kept:
            if ds.path("training_video", r.video_id).is_dir():
                _link(ds.path("training_video", r.video_id), staging / "training_video" / r.video_id)
        for image_id in sorted({r.image_id for r in kept}):
            if ds.training_image_path(image_id).is_file():
                _link(ds.training_image_path(image_id), staging / "training_image" / f"{image_id}.jpg")
        # the root's test split, unchanged
        for video_id in gt:
            if ds.path("query", video_id).is_dir():
                _link(ds.path("query", video_id), staging / "query" / video_id)
        for live in galleries:
            for image_id, view, path in ds.gallery_files(live):
                _link(path, staging / "gallery" / live / path.name)
        # held-out training clips become queries, ranked among the products of their own live
        boxes, live_products = {}, {}
        for r in rows:
            live_products.setdefault(r.live_id, set()).add(r.image_id)
        held_rows = [r for r in rows if r.image_id in held]
        for r in held_rows:
            if not ds.path("training_video", r.video_id).is_dir():
                problems.add(BadInput(ds.path("training_video", r.video_id), "held-out clip has no frames"),
                             "missing_clip")
                continue
            if r.video_id in gt:
                raise BadInput(ds.annotation("gtimage"), f"clip {r.video_id} is both a training and a test clip")
            _link(ds.path("training_video", r.video_id), staging / "query" / r.video_id)
            gt[r.video_id] = [r.image_id]
            asr.setdefault(r.video_id, r.asr)
            boxes.update({f: b for f, b in zip(r.frame_ids, r.boxes) if b})
        for live in sorted({r.live_id for r in held_rows}):
            listed = galleries.setdefault(live, [])
            for image_id in sorted(live_products[live]):
                if image_id in listed or not ds.training_image_path(image_id).is_file():
                    continue
                link = staging / "gallery" / live / f"{image_id}-0.jpg"
                if not link.exists():
                    _link(ds.training_image_path(image_id), link)
                listed.append(image_id)
                titles.setdefault(image_id, title_of[image_id])
        if ds.annotation("gtbox", required=False):
            boxes = {**ds.gt_boxes, **boxes}
        a = staging / "annotations"
        ann.write_id_map(a / "test_videoid_to_gtimage.json", gt)
        ann.write_id_map(a / "test_liveid_to_gallery.json", galleries)
        if boxes:
            ann.write_id_map(a / "test_frameid2gtbox.json", boxes)
        ann.write_id_text(a / "test_image_title.txt", titles)
        ann.write_id_text(a / "test_videoid_asr.txt", asr)
        seen_ids = {r.image_id for r in kept}
        n_seen = sum(1 for ids in gt.values() if set(ids) & seen_ids)
        summary = {
            "root": str(ds.root), "out": str(out), "seed": seed, "holdout_products": holdout,
            "products": {"train": len(seen_ids), "held_out": len(held)},
            "held_out": {i: title_of[i] for i in sorted(held)},
            "training_clips": len(kept),
            "test_queries": {"total": len(gt), "seen": n_seen, "unseen": len(gt) - n_seen},
            "problems": problems.as_dict(),
        }
        write_json(staging / "split.json", summary)
    return summary


def holdout_fraction(text: str) -> float:
    """argparse type: a fraction strictly between 0 and 1 (0 would hold nothing out, 1 would train on nothing)."""
    value = fraction(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m lpr4m split", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="an LPR4M root with annotations/training_videoinfo*.txt")
    p.add_argument("out", type=output_folder, help="a new folder for the split (links into ROOT)")
    p.add_argument("--holdout-products", type=holdout_fraction, default=0.25,
                   help="fraction of the training products held out of training (their clips become test queries)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    p.add_argument("--out", dest="json_out", type=output_file, default=None, help="write the JSON summary here")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    summary = split_by_product(args.root, args.out, args.holdout_products, args.seed, Problems(strict=args.strict))
    emit_json(summary, args.json_out)
    return 0
