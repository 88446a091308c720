"""The YOLO view of an LPR4M dataset, built once and cached (no image copies).

Layout of a cache entry ``<cache>/<key>/``::

    images/train/<video_id> -> ROOT/training_video/<video_id>   (one directory symlink per clip)
    images/val/<video_id>   -> ROOT/query/<video_id>
    labels/{train,val}/<video_id>/<frame_id>.txt                 (YOLO: "0 cx cy w h", normalised; empty = no product)
    train.txt, val.txt                                           (./images/... one frame per line)
    data.yaml, manifest.json                                     (manifest is written last: the "done" marker)

Ultralytics finds a label by replacing ``/images/`` with ``/labels/`` in the image path, which is why images are
reached through the symlinked ``images/`` tree. The key hashes the dataset root and the size and mtime of the
annotation files, so a changed annotation rebuilds and an unchanged one is reused, unless a listed frame's size or
mtime changed (``frames_fingerprint``). Rows are streamed and written by a process pool in chunks; memory holds one
chunk, never the whole list (the test boxes JSON is read whole).
Missing, empty and corrupt frames (``lpr4m.images.frame_problem``: header and end marker, no decode) are left out
and counted, so ultralytics' label scan never meets a JPEG with bytes after its end marker, which it re-encodes in
place: in the user's dataset, through the links.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from itertools import groupby, islice
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator

from lpr4m.cli import progress
from lpr4m.errors import BadInput, Problems
from lpr4m.io import atomic_write, cache_root, read_json, write_json
from lpr4m.ids import parse_frame_id
from lpr4m.images import frame_problem
from lpr4m.layout import Dataset

logger = logging.getLogger(__name__)

BUILD_VERSION = 3  # 2: corrupt frames (and JPEGs without their end marker) left out and counted; 3: frame fingerprint
CHUNK = 256  # clips per worker task
MIN_SIDE = 1e-6  # boxes thinner than this (normalised) carry no signal and break YOLO's xywh


@dataclass
class YoloData:
    root: Path
    yaml: Path
    manifest: dict

    @property
    def train_list(self) -> Path:
        return self.root / "train.txt"

    @property
    def val_list(self) -> Path:
        return self.root / "val.txt"


def cache_key(ds: Dataset, frames_per_clip: int | None = None) -> str:
    h = hashlib.sha256(f"v{BUILD_VERSION}|{ds.root.resolve()}|{frames_per_clip}".encode())
    for key in ("training_videoinfo", "gtbox"):
        p = ds.annotation(key, required=False)
        if p is not None:
            st = p.stat()
            h.update(f"|{p.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def frames_fingerprint(view: Path) -> str | None:
    """A hash of the size and mtime of every frame the view lists. The cache key covers the annotation files only;
    this lets a reuse see frames replaced, cut short or deleted since the build (which checked them), for one stat
    a frame instead of the build's reads. None for a view whose lists are gone."""
    h = hashlib.blake2b(digest_size=16)
    root = str(view)
    for split in ("train", "val"):
        try:
            f = open(os.path.join(root, f"{split}.txt"), encoding="utf-8")
        except OSError:
            return None
        with f:
            for line in f:
                try:
                    st = os.stat(os.path.join(root, line.rstrip("\n")))
                    h.update(b"%d,%d;" % (st.st_size, st.st_mtime_ns))
                except FileNotFoundError:
                    h.update(b"missing;")
    return h.hexdigest()


def default_cache_dir() -> Path:
    return cache_root() / "detector-data"


def yolo_label(boxes: Iterable) -> tuple[str, int]:
    """YOLO label text for normalised xyxy boxes, and how many degenerate boxes were dropped."""
    lines, dropped = [], 0
    for x1, y1, x2, y2 in boxes:
        w, h = x2 - x1, y2 - y1
        if w < MIN_SIDE or h < MIN_SIDE:
            dropped += 1
            continue
        lines.append(f"0 {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {w:.6f} {h:.6f}")
    return "".join(line + "\n" for line in lines), dropped


def _write_chunk(task) -> tuple[list[str], dict, dict]:
    """Worker: link each clip's frame folder, write its labels; returns the list lines, counts and the first
    ``(frame, reason)`` of each kind of problem (what --strict names)."""
    split, out_root, items = task
    counts: Counter = Counter()
    first: dict[str, tuple[str, str]] = {}
    lines: list[str] = []
    out_root = Path(out_root)
    for video_id, frame_dir, frames in items:
        link = out_root / "images" / split / video_id
        if not os.path.islink(link):
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(frame_dir, link, target_is_directory=True)
        label_dir = out_root / "labels" / split / video_id
        label_dir.mkdir(parents=True, exist_ok=True)
        for frame_id, boxes in frames:
            frame = os.path.join(frame_dir, frame_id + ".jpg")
            if problem := frame_problem(frame):
                kind, reason = problem
                counts[kind] += 1
                first.setdefault(kind, (frame, reason))
                continue
            text, dropped = yolo_label(boxes)
            counts["degenerate_box"] += dropped
            if dropped:
                first.setdefault("degenerate_box", (frame, "box thinner than the minimum side"))
            with open(label_dir / (frame_id + ".txt"), "w", encoding="utf-8") as f:
                f.write(text)
            lines.append(f"./images/{split}/{video_id}/{frame_id}.jpg\n")
            counts["frames"] += 1
            counts["boxes"] += text.count("\n")
            counts["background_frames"] += text == ""
    return lines, dict(counts), first


def spread(items: list, n: int | None) -> list:
    """``n`` evenly spaced items (first and last included); all of them when ``n`` is None or large enough."""
    if not n or len(items) <= n:
        return items
    if n == 1:
        return [items[len(items) // 2]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def _train_items(ds: Dataset, problems: Problems, frames_per_clip: int | None) -> Iterator[tuple[str, str, list]]:
    for clip in ds.training_clips(problems):
        if not clip.has_boxes:  # not in the detection subset
            continue
        frame_dir = str(ds.path("training_video", clip.video_id).resolve())
        yield clip.video_id, frame_dir, spread(list(zip(clip.frame_ids, clip.boxes)), frames_per_clip)


def _val_items(ds: Dataset) -> Iterator[tuple[str, str, list]]:
    items = sorted(ds.gt_boxes.items())
    for video_id, group in groupby(items, key=lambda kv: parse_frame_id(kv[0])[0]):
        frame_dir = str(ds.path("query", video_id).resolve())
        yield video_id, frame_dir, list(group)


def _chunks(it: Iterator, n: int) -> Iterator[list]:
    while chunk := list(islice(it, n)):
        yield chunk


def _run_split(split: str, items: Iterator, out: Path, workers: int, problems: Problems) -> dict:
    counts: Counter = Counter()
    first: dict[str, tuple[str, str]] = {}
    tasks = ((split, str(out), chunk) for chunk in _chunks(items, CHUNK))
    bar = progress(desc=f"labels {split}", unit="frame")
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(atomic_write(out / f"{split}.txt"))
        if workers > 1:
            pool = stack.enter_context(get_context("fork" if os.name == "posix" else "spawn").Pool(workers))
            results = pool.imap(_write_chunk, tasks)
        else:
            results = map(_write_chunk, tasks)
        for lines, c, bad in results:
            f.writelines(lines)
            counts.update(c)
            first = {**bad, **first}
            bar.update(c.get("frames", 0))
    bar.close()
    for kind in ("missing_frame", "empty_frame", "corrupt_frame", "degenerate_box"):
        if counts.get(kind):
            frame, reason = first[kind]
            problems.counts[kind] += counts[kind]
            problems.messages.append(f"{split}: {counts[kind]} {kind.replace('_', ' ')}(s) skipped, first {frame}: "
                                     f"{reason}")
            # ultralytics never sees these frames, so its own "0 corrupt" count does not include them
            logger.warning("%s", problems.messages[-1])
            if problems.strict:
                raise BadInput(frame, f"{kind.replace('_', ' ')}: {reason} ({counts[kind]} in the {split} split)")
    return dict(counts)


def build_yolo_dataset(ds: Dataset, cache_dir=None, workers: int | None = None, problems: Problems | None = None,
                       rebuild: bool = False, frames_per_clip: int | None = None) -> YoloData:
    """The cached YOLO dataset for ``ds`` (built now if absent); ``train`` = boxed training clips, ``val`` = test
    frames listed in ``test_frameid2gtbox``. ``frames_per_clip`` keeps that many evenly spaced training frames per
    clip (consecutive frames of a clip are near duplicates; fewer of them make short CPU runs see more clips)."""
    problems = problems or Problems()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    out = cache_dir / cache_key(ds, frames_per_clip)
    manifest_path = out / "manifest.json"
    manifest = read_json(manifest_path, expect=dict) if manifest_path.is_file() and not rebuild else None
    if manifest is not None and manifest.get("frames_fingerprint") != frames_fingerprint(out):
        logger.warning("frames of %s changed since its YOLO view %s was built: rebuilding it", ds.root, out)
        manifest = None
    if manifest is not None:
        logger.info("reusing YOLO dataset cache %s (%d train / %d val frames)", out,
                    manifest["train"].get("frames", 0), manifest["val"].get("frames", 0))
        manifest["reused"] = True
        for message in manifest.get("problems", {}).get("messages", []):
            if problems.strict:
                raise BadInput(None, f"--strict: {message} (found when the cache {out} was built)")
            logger.warning("(cached build) %s", message)
        return YoloData(out, out / "data.yaml", manifest)
    # built beside the cache entry and renamed into place: a failed or interrupted build leaves no half entry, and
    # a failed --rebuild-cache keeps the entry it was to replace
    staging = out.with_name(out.name + ".partial")
    if staging.exists():  # an interrupted build
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        manifest = _build(ds, out, staging, workers, problems, frames_per_clip)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    manifest["reused"] = False
    return YoloData(out, out / "data.yaml", manifest)


def merged_yaml(views: list[YoloData], path: Path) -> Path:
    """A data.yaml training on every view's frames and validating on every view's test frames (ultralytics reads
    lists of list files, each line relative to its own file)."""
    path.write_text(json.dumps({"train": [str(v.train_list) for v in views], "val": [str(v.val_list) for v in views],
                                "names": ["product"], "nc": 1}) + "\n", encoding="utf-8")
    return path


def _build(ds: Dataset, out: Path, staging: Path, workers: int | None, problems: Problems,
           frames_per_clip: int | None) -> dict:
    """Write the YOLO view into ``staging``; its data.yaml names ``out``, where it is moved once complete."""
    workers = max(1, workers if workers is not None else min(8, os.cpu_count() or 1))
    logger.info("building YOLO dataset cache %s from %s (%d workers)", out, ds.root, workers)
    train = _run_split("train", _train_items(ds, problems, frames_per_clip), staging, workers, problems)
    if ds.annotation("gtbox", required=False) is None:
        raise BadInput(ds.root / "annotations", "missing test_frameid2gtbox*.json (needed for validation boxes)")
    val = _run_split("val", _val_items(ds), staging, workers, problems)
    if not train.get("frames"):
        raise BadInput(ds.annotation("training_videoinfo"), "no training frame with boxes found on disk "
                                                            "(the detection subset needs box lists and frames)")
    if not val.get("frames"):
        raise BadInput(ds.annotation("gtbox"), "no test frame listed in test_frameid2gtbox found under query/")
    (staging / "data.yaml").write_text(json.dumps({"path": str(out.resolve()), "train": "train.txt",
                                                   "val": "val.txt", "names": ["product"], "nc": 1}) + "\n",
                                       encoding="utf-8")
    manifest = {"dataset": str(ds.root.resolve()), "key": out.name, "train": train, "val": val,
                "problems": problems.as_dict(), "build_version": BUILD_VERSION,
                "frames_per_clip": frames_per_clip, "frames_fingerprint": frames_fingerprint(staging)}
    write_json(staging / "manifest.json", manifest)
    return manifest
