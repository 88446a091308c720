"""``python -m lpr4m stats ROOT``: count and validate an LPR4M dataset.

Why it is built this way: LPR4M is 4M training rows and hundreds of millions of frames, so rows are streamed,
each folder is listed once with ``os.scandir`` (one stat per listed file, for its size) and only id sets that
are needed for cross-checks are kept. Every problem is one line naming the file (and line), counted by kind;
``--strict`` makes the first one fatal (exit 2). ``--verify`` also decodes every image and probes every clip
video (slow; finds corrupt files, not just missing or empty ones).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Sequence

from lpr4m.errors import BadInput, Problems
from lpr4m.ids import IMAGE_SUFFIXES, parse_frame_id, parse_gallery_name, parse_image_id, parse_live_id, \
    parse_video_id, frame_id_from
from lpr4m.io import read_json
from lpr4m.layout import Dataset

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".mpg", ".flv")


def _list_dir(path: Path) -> dict[str, os.DirEntry] | None:
    """name -> entry for the files of a folder (one directory read), or None when it does not exist."""
    try:
        with os.scandir(path) as it:
            return {e.name: e for e in it if not e.name.startswith(".")}
    except (FileNotFoundError, NotADirectoryError):
        return None


def _check_entry(entry: os.DirEntry, problems: Problems, verify: bool, what: str) -> bool:
    """True when the file is usable: not empty (one stat) and, with ``verify``, decodable."""
    try:
        size = entry.stat().st_size
    except OSError as e:
        problems.add(BadInput(entry.path, f"cannot stat {what} ({e.strerror})"), "missing_file")
        return False
    if size == 0:
        problems.add(BadInput(entry.path, f"empty file (expected {what})"), "empty_file")
        return False
    if verify:
        try:
            if entry.name.lower().endswith(VIDEO_SUFFIXES):
                from lpr4m.frames import probe_video
                probe_video(entry.path)
            else:
                _verify_image(entry.path)
        except BadInput as err:
            problems.add(err, "corrupt_file")
            return False
    return True


def _verify_image(path: str) -> None:
    """Decode an image at reduced scale (JPEG draft mode): all entropy-coded data is read, so truncated or
    corrupt files fail, at a fraction of the cost of a full decode."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadInput(path, f"corrupt or unreadable image ({type(e).__name__}: {str(e)[:80]})") from None


def _annotation(root: Path, pattern: str) -> Path | None:
    hits = sorted((root / "annotations").glob(pattern), key=lambda p: (len(p.name), p.name))
    return hits[0] if hits else None


def _read_json_dict(path: Path | None, problems: Problems) -> dict | None:
    if path is None:
        return None
    try:
        return read_json(path, expect=dict)
    except BadInput as err:
        problems.add(err, "bad_annotation")
        return None


def _id_lists(path: Path, obj: dict, key_parser, problems: Problems, what: str) -> dict[str, list[str]]:
    """Check a ``{id: [image_id, ...]}`` map entry by entry; bad entries are skipped and counted."""
    out = {}
    for key, values in obj.items():
        try:
            key_parser(key, path)
            if not isinstance(values, list):
                raise BadInput(path, f"{what} of {key!r} must be a list of image ids, got {type(values).__name__}")
            ids = []
            for v in values:
                if not isinstance(v, str):
                    raise BadInput(path, f"{what} of {key!r}: expected image id strings, got {v!r}")
                ids.append(parse_image_id(v, path))
        except BadInput as err:
            problems.add(err, "malformed_row")
            continue
        out[key] = ids
    return out


def _check_id_text(path: Path, parser, problems: Problems) -> int:
    """Stream an ``id<TAB>text`` file, checking each id; returns the number of good rows."""
    n = 0
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # a BOM is not part of the first id
            for lineno, text in enumerate(f, 1):
                text = text.rstrip("\r\n")
                if not text.strip():
                    continue
                try:
                    parser(text.partition("\t")[0].strip(), path, lineno)
                    n += 1
                except BadInput as err:
                    problems.add(err, "malformed_row")
    except UnicodeDecodeError:
        problems.add(BadInput(path, "not UTF-8 text (expected id<TAB>text lines)"), "bad_annotation")
    return n


# -- training split ---------------------------------------------------------------------------------------------
def training_stats(root: Path, problems: Problems, verify: bool = False) -> dict | None:
    """Stream ``training_videoinfo``: rows, frames and boxes, and whether each listed file exists."""
    from lpr4m.annotations import read_training_videoinfo
    from lpr4m.cli import progress
    path = _annotation(root, "training_videoinfo*.txt")
    if path is None:
        return None
    s = dict(annotation=path.name, clips=0, frames=0, frames_with_boxes=0, boxes=0, images=0,
             frames_on_disk=0, images_on_disk=0, unlisted_frames=0, missing_frames=0, missing_images=0,
             empty_clips=0, categories=0)
    frame_root, image_dir = root / "training_video", root / "training_image"
    images = _list_dir(image_dir) or {}
    seen_images: set[str] = set()
    categories: set[str] = set()
    for clip in progress(read_training_videoinfo(path, problems), desc="training rows", unit="row"):
        s["clips"] += 1
        categories.add(clip.category_id or clip.category_name)
        if not clip.frame_ids:
            s["empty_clips"] += 1
            problems.add(BadInput(path, f"clip {clip.video_id} lists no frames", clip.line), "empty_clip")
        s["frames"] += len(clip.frame_ids)
        s["frames_with_boxes"] += sum(1 for b in clip.boxes if b)
        s["boxes"] += sum(len(b) for b in clip.boxes)
        if clip.frame_ids:
            listing = _list_dir(frame_root / clip.video_id)
            if listing is None:
                s["missing_frames"] += len(clip.frame_ids)
                problems.add(BadInput(frame_root / clip.video_id, f"folder missing ({len(clip.frame_ids)} frames "
                                                                   f"listed at {path.name}:{clip.line})"),
                             "missing_file")
            else:
                listed = set()
                for fid in clip.frame_ids:
                    listed.add(fid + ".jpg")
                    entry = listing.get(fid + ".jpg")
                    if entry is None:
                        s["missing_frames"] += 1
                        problems.add(BadInput(frame_root / clip.video_id / (fid + ".jpg"),
                                              f"frame missing (listed at {path.name}:{clip.line})"), "missing_file")
                    elif _check_entry(entry, problems, verify, "a JPEG frame"):
                        s["frames_on_disk"] += 1
                s["unlisted_frames"] += sum(1 for name in listing if name not in listed)
        if clip.image_id not in seen_images:
            seen_images.add(clip.image_id)
            entry = images.get(clip.image_id + ".jpg")
            if entry is None:
                s["missing_images"] += 1
                problems.add(BadInput(image_dir / (clip.image_id + ".jpg"),
                                      f"shop image missing (listed at {path.name}:{clip.line})"), "missing_file")
            elif _check_entry(entry, problems, verify, "a shop image"):
                s["images_on_disk"] += 1
    s["images"] = len(seen_images)
    s["categories"] = len(categories - {""})
    return s


# -- test split -------------------------------------------------------------------------------------------------
def test_stats(root: Path, problems: Problems, verify: bool = False) -> dict | None:
    """Test clips, their query frames, boxes, galleries and answers, cross-checked against each other."""
    from lpr4m.cli import progress
    gt_path = _annotation(root, "test_videoid_to_gtimage*.json")
    gal_path = _annotation(root, "test_liveid_to_gallery*.json")
    box_path = _annotation(root, "test_frameid2gtbox*.json")
    if gt_path is None and gal_path is None and box_path is None:
        return None
    s = dict(clips=0, query_frames=0, clips_without_frames=0, gtbox_frames=0, gtbox_boxes=0, gallery_lives=0,
             gallery_images=0, gallery_files=0, missing_gallery_images=0, unlisted_query_clips=0, clip_videos=0)
    for name, p in (("test_videoid_to_gtimage", gt_path), ("test_liveid_to_gallery", gal_path)):
        if p is None:
            problems.add(BadInput(root / "annotations", f"missing {name}*.json"), "bad_annotation")
    gt = _read_json_dict(gt_path, problems)
    gt = _id_lists(gt_path, gt, parse_video_id, problems, "ground-truth images") if gt is not None else {}
    gal = _read_json_dict(gal_path, problems)
    have_gal = gal is not None  # cross-check answers only against a gallery file that could be read
    gal = _id_lists(gal_path, gal, parse_live_id, problems, "gallery") if have_gal else {}
    s["clips"], s["gallery_lives"] = len(gt), len(gal)

    # galleries: every listed image must have at least one view on disk
    gallery_sets = {live: set(ids) for live, ids in gal.items()}
    for live, ids in progress(gal.items(), desc="galleries", unit="live"):
        folder = root / "gallery" / live
        listing = _list_dir(folder) or {}
        views: dict[str, int] = {}
        for name, entry in listing.items():
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                image_id, _ = parse_gallery_name(stem, entry.path)
            except BadInput as err:
                problems.add(err, "bad_name")
                continue
            if image_id in gallery_sets[live] and _check_entry(entry, problems, verify, "a shop image"):
                views[image_id] = views.get(image_id, 0) + 1
        s["gallery_files"] += sum(views.values())
        for image_id in dict.fromkeys(ids):
            if image_id in views:
                s["gallery_images"] += 1
            else:
                s["missing_gallery_images"] += 1
                problems.add(BadInput(folder / f"{image_id}-0.jpg", f"gallery image missing (listed in "
                                                                    f"{gal_path.name} for live {live})"),
                             "missing_file")

    # clips: answers inside the live's gallery, frames on disk
    query_root = root / "query"
    query_frames: set[str] = set()
    for video_id, answers in progress(gt.items(), desc="test clips", unit="clip"):
        live = parse_video_id(video_id).live_id
        if have_gal and live not in gallery_sets:
            problems.add(BadInput(gt_path, f"clip {video_id}: live {live} has no gallery in {gal_path.name}"),
                         "unknown_id")
        elif have_gal:
            for image_id in answers:
                if image_id not in gallery_sets[live]:
                    problems.add(BadInput(gt_path, f"clip {video_id}: answer {image_id} is not in the gallery of "
                                                   f"live {live}"), "unknown_id")
        if not answers:
            problems.add(BadInput(gt_path, f"clip {video_id} has no ground-truth image"), "empty_clip")
        listing = _list_dir(query_root / video_id) or {}
        n = 0
        for name, entry in listing.items():
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                vid, _ = parse_frame_id(stem, entry.path)
                if vid != video_id:
                    raise BadInput(entry.path, f"frame of clip {vid} inside the folder of clip {video_id}")
            except BadInput as err:
                problems.add(err, "bad_name")
                continue
            if _check_entry(entry, problems, verify, "a JPEG frame"):
                query_frames.add(stem)
                n += 1
        s["query_frames"] += n
        if n == 0:
            s["clips_without_frames"] += 1
            problems.add(BadInput(query_root / video_id, "test clip has no frames (listed in "
                                                         f"{gt_path.name})"), "missing_file")
    query_listing = _list_dir(query_root) or {}
    s["unlisted_query_clips"] = sum(1 for name in query_listing if name not in gt)

    # boxes: each annotated frame must be a query frame of a listed clip
    boxes = _read_json_dict(box_path, problems)
    if boxes is not None:
        from lpr4m.annotations import JsonKeyLines, check_boxes
        line_of = JsonKeyLines(box_path)
        for key, value in boxes.items():
            try:
                frame_id = frame_id_from(key, box_path)
                s["gtbox_boxes"] += len(check_boxes(value, box_path))
            except BadInput as err:
                problems.add(BadInput(box_path, f"frame {key!r}: {err.message}", line_of(key)), "malformed_row")
                continue
            s["gtbox_frames"] += 1
            if frame_id not in query_frames:
                problems.add(BadInput(box_path, f"frame {frame_id} has boxes but is not a query frame on disk"),
                             "unknown_id")

    # optional id<TAB>text files: ASR per clip, title per image
    for pattern, parser in (("test_videoid_asr*.txt", parse_video_id), ("test_image_title*.txt", parse_image_id)):
        text_path = _annotation(root, pattern)
        if text_path is not None:
            s[pattern.split("*")[0].replace("test_", "") + "_rows"] = _check_id_text(text_path, parser, problems)

    # optional clip videos (clips/<video_id>.mp4, as written by synth and in grocery-lpr)
    clips = _list_dir(root / "clips") or {}
    for name, entry in clips.items():
        stem, suffix = os.path.splitext(name)
        if suffix.lower() not in VIDEO_SUFFIXES:
            continue
        if stem not in gt:
            problems.add(BadInput(entry.path, "clip video of a video_id not in the test annotations"), "unknown_id")
        elif _check_entry(entry, problems, verify, "a video"):
            s["clip_videos"] += 1
    return s


def dataset_stats(root, problems: Problems | None = None, verify: bool = False) -> dict:
    """The whole summary as a dict (what the CLI prints)."""
    root = Dataset(root).root  # its root check: a missing path or a file is refused the same way everywhere
    if not (root / "annotations").is_dir():
        raise BadInput(root, "no annotations/ folder (expected an LPR4M root)")
    problems = problems if problems is not None else Problems()
    t = time.perf_counter()
    training = training_stats(root, problems, verify)
    test = test_stats(root, problems, verify)
    if training is None and test is None:
        raise BadInput(root / "annotations", "no training_videoinfo*.txt and no test_*.json: not an LPR4M root")
    return {"root": str(root), "training": training, "test": test, "problems": problems.as_dict(),
            "seconds": round(time.perf_counter() - t, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    from lpr4m.cli import Parser, emit_json, nonnegative_int, output_file, setup_logging
    ap = Parser(prog="python -m lpr4m stats", description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="LPR4M dataset root (with annotations/)")
    ap.add_argument("--strict", action="store_true", help="stop at the first problem (exit 2)")
    ap.add_argument("--verify", action="store_true", help="also decode every image and probe every video (slow)")
    ap.add_argument("--out", type=output_file, help="write the JSON summary here instead of stdout")
    ap.add_argument("--max-messages", type=nonnegative_int, default=1000, help="problem messages kept in the summary")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)
    problems = Problems(strict=args.strict, max_messages=args.max_messages)
    result = dataset_stats(args.root, problems, verify=args.verify)
    emit_json(result, args.out)
    logger.info("%s: %d problems %s", args.root, problems.total, dict(problems.counts) or "")
    return 0
