"""``python detector/bench_dataset.py``: time and memory of building the YOLO dataset view as the dataset grows.

LPR4M's detection subset has 1.12M boxed training frames and 501k boxed test frames; a real copy is not at hand, so
this writes annotation files of that shape at several sizes (``--clips`` training clips of ``--frames-per-clip``
frames, plus test frames in LPR4M's 0.45 ratio) over one tiny JPEG copied as every frame (the builder reads each
frame's header and last two bytes),
then times ``build_yolo_dataset`` (fresh, then reused from the cache) and reads the peak memory of the builder and
its worker processes. Baseline, measured in the same run: writing one label file per frame in a single loop, the
least any YOLO view must do. The last column extrapolates linearly to LPR4M's size.
"""
from __future__ import annotations

import argparse
import io
import logging
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Sequence

from PIL import Image

from lpr4m.cli import Parser, emit_json, output_file, positive_int, setup_logging
from lpr4m.errors import BadInput

logger = logging.getLogger(__name__)
LPR4M_TRAIN_FRAMES, LPR4M_TEST_FRAMES = 1_120_000, 501_000  # boxed frames of LPR4M's detection subset
LPR4M_FRAMES = LPR4M_TRAIN_FRAMES + LPR4M_TEST_FRAMES
TEST_RATIO = LPR4M_TEST_FRAMES / LPR4M_TRAIN_FRAMES


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python detector/bench_dataset.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=positive_int, nargs="+", default=[2000, 8000, 32000], help="training clips per size")
    p.add_argument("--frames-per-clip", type=positive_int, default=10)
    p.add_argument("--workers", type=positive_int, default=2,
                   help="builder processes (the training default is min(8, cpus))")
    p.add_argument("--runs", type=positive_int, default=3, help="fresh builds per size (the median is reported)")
    p.add_argument("--tmp", type=Path, help="folder for the generated datasets, made if missing (default: the "
                                           "system temp folder)")
    p.add_argument("--out", type=output_file, help="write the JSON rows here instead of stdout")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _video_id(live: str, i: int) -> str:
    return f"{live}-{1_600_000_000_000 + 20_000 * i}-{1_600_000_000_000 + 20_000 * i + 10_000}"


def make_annotation_dataset(root: Path, clips: int, frames_per_clip: int) -> int:
    """An LPR4M root with ``clips`` boxed training clips and ~0.45x as many boxed test frames; returns all frames."""
    from lpr4m.annotations import TrainingClip, write_id_map, write_training_videoinfo
    from lpr4m.layout import Dataset
    (root / "annotations").mkdir(parents=True)
    ds = Dataset(root)
    live, image = str(uuid.UUID(int=1)), str(uuid.UUID(int=2))
    box = [0.2, 0.25, 0.6, 0.75]
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 18), (128, 96, 64)).save(jpeg, format="JPEG")
    jpeg = jpeg.getvalue()

    def placeholder_clip(split_dir: str, i: int) -> tuple[str, list[str]]:
        """A clip's frame ids, each with the tiny JPEG where the layout puts it."""
        vid = _video_id(live, i)
        frames = [f"{vid}-{j:04d}" for j in range(frames_per_clip)]
        folder = ds.path(split_dir, vid)
        folder.mkdir(parents=True)
        for f in frames:
            (folder / f"{f}.jpg").write_bytes(jpeg)
        return vid, frames

    def clip_rows():
        for i in range(clips):
            vid, frames = placeholder_clip("training_video", i)
            yield TrainingClip(vid, frames, [[box] for _ in frames], image)

    write_training_videoinfo(root / "annotations" / "training_videoinfo.txt", clip_rows())
    gt = {}
    for i in range(max(1, round(clips * TEST_RATIO))):
        gt.update((f, [box]) for f in placeholder_clip("query", clips + i)[1])
    write_id_map(root / "annotations" / "test_frameid2gtbox.json", gt)
    return clips * frames_per_clip + len(gt)


def _baseline_s(folder: Path, n: int) -> float:
    """Seconds to write ``n`` one-line label files in one loop: the floor for any per-frame YOLO label view."""
    folder.mkdir(parents=True)
    t = time.perf_counter()
    for i in range(n):
        with open(folder / f"{i}.txt", "w", encoding="utf-8") as f:
            f.write("0 0.4 0.5 0.4 0.5\n")
    return time.perf_counter() - t


def _build_in_child(root: str, cache: str, workers: int, queue) -> None:
    """One build in a fresh process, so its peak memory (and its workers') is its own; a failure is sent back
    (a child that died without a word would leave the parent waiting for ever)."""
    try:
        queue.put(_timed_builds(root, cache, workers))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def _timed_builds(root: str, cache: str, workers: int) -> dict:
    from detector.dataset import build_yolo_dataset
    from lpr4m.layout import Dataset
    t = time.perf_counter()
    data = build_yolo_dataset(Dataset(root), cache, workers=workers, rebuild=True)
    fresh = time.perf_counter() - t
    t = time.perf_counter()
    build_yolo_dataset(Dataset(root), cache, workers=workers)
    reused = time.perf_counter() - t
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"fresh_s": fresh, "reused_s": reused, "peak_mb": own, "worker_peak_mb": workers_peak,
            "frames": data.manifest["train"]["frames"] + data.manifest["val"]["frames"]}


def run(args) -> dict:
    rows = []
    ctx = multiprocessing.get_context("fork")
    if args.tmp:
        args.tmp.mkdir(parents=True, exist_ok=True)
    for clips in args.clips:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            tmp = Path(tmp)
            t = time.perf_counter()
            frames = make_annotation_dataset(tmp / "lpr4m", clips, args.frames_per_clip)
            made = time.perf_counter() - t
            builds = []
            for i in range(args.runs):
                queue = ctx.Queue()
                child = ctx.Process(target=_build_in_child, args=(str(tmp / "lpr4m"), str(tmp / f"cache{i}"),
                                                                  args.workers, queue))
                child.start()
                builds.append(queue.get())
                child.join()
                if "error" in builds[-1]:
                    raise BadInput(tmp, f"the dataset build failed: {builds[-1]['error']}")
            base = statistics.median(_baseline_s(tmp / f"base{i}", frames) for i in range(args.runs))
            fresh = statistics.median(b["fresh_s"] for b in builds)
            if builds[0]["frames"] != frames:
                raise BadInput(tmp, f"built {builds[0]['frames']} frames, expected {frames}")
            row = {"clips": clips, "frames": frames, "generate_s": round(made, 1), "build_s": round(fresh, 2),
                   "reuse_s": round(statistics.median(b["reused_s"] for b in builds), 3),
                   "baseline_s": round(base, 3), "vs_baseline": round(fresh / base, 2),
                   "frames_per_s": round(frames / fresh), "peak_mb": round(max(b["peak_mb"] for b in builds)),
                   "worker_peak_mb": round(max(b["worker_peak_mb"] for b in builds)),
                   "lpr4m_min": round(fresh / frames * LPR4M_FRAMES / 60, 1)}
            rows.append(row)
            logger.info("%d clips / %d frames: build %.1f s (baseline %.1f s), peak %d MB", clips, frames, fresh,
                        base, row["peak_mb"])
    return {"workers": args.workers, "runs": args.runs, "cpus": os.cpu_count(), "rows": rows}


def table(result: dict) -> str:
    head = (f"{'frames':>8} | {'build s':>8} {'reuse s':>8} {'baseline s':>10} {'vs base':>7} {'frames/s':>9} | "
            f"{'peak MB':>7} {'worker MB':>9} | {'LPR4M (1.62M) min':>17}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['frames']:>8} | {r['build_s']:>8.2f} {r['reuse_s']:>8.3f} {r['baseline_s']:>10.2f} "
                     f"{r['vs_baseline']:>6.2f}x {r['frames_per_s']:>9} | {r['peak_mb']:>7} {r['worker_peak_mb']:>9} | "
                     f"{r['lpr4m_min']:>17.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table (stderr) and the JSON rows (stdout or --out)."""
    import sys
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    result = run(args)
    print(f"YOLO dataset view build, {args.workers} workers, {args.frames_per_clip} frames/clip, median of "
          f"{args.runs} fresh builds", file=sys.stderr)
    print(table(result), file=sys.stderr)
    emit_json(result, args.out)
    return 0
