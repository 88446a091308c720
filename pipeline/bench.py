"""``python pipeline/bench.py``: end-to-end speed, memory and agreement of the pipeline, printed as tables.

1. Speed (faiss benchs style: warm-up, median of ``--runs``, a baseline measured in the same run): a 60 s 1280x720
   H.264 clip (generated once from the bundled demo clips, keyframe every 2 s as livestream encoders write) at
   1 frame/s on ``--cores`` CPU cores with the ``--backend`` runtime. Each measurement runs in a fresh subprocess
   pinned to the cores, which reports its wall time and peak RSS (VmHWM of /proc/self/status). Rows: decode only
   (the baseline), the full pipeline, the pipeline without the detector. Targets: >= 20x real time, within 2x
   of decode-only, peak memory < 2 GB.
2. Flat memory (``--long-minutes N``): peak RSS on an N-minute clip next to the 60 s clip.
3. Agreement (``--grocery ROOT``, default ../shared/data/grocery-lpr when present): the pipeline on the split's
   ``clips/*.mp4`` (decoded at 1 fps, full frames) against ``retriever/evaluate.py``'s protocol on the query
   frames, same weights: per-query top-1 agreement and rank-1 of both (target |dR1| <= 0.05).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: resolve packages from the repo root, not from pipeline/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Sequence  # noqa: E402

import numpy as np  # noqa: E402

from lpr4m.cli import (Parser, emit_json, nonnegative_float, output_file, positive_float, positive_int,  # noqa: E402
                       run_main, setup_logging)
from lpr4m.errors import BadInput  # noqa: E402

logger = logging.getLogger("pipeline.bench")

REPO = Path(__file__).resolve().parents[1]
SHARED_GROCERY = REPO.parent / "shared" / "data" / "grocery-lpr"


# -- the bench clip ------------------------------------------------------------------------------------------
def make_bench_clip(out: Path, sources: Sequence[Path], seconds: float = 60.0, size=(1280, 720), fps: int = 25,
                    gop_s: float = 2.0, max_source_frames: int = 400) -> Path:
    """Loop the frames of ``sources`` (resized to ``size``) into an H.264 clip of ``seconds`` (atomic write)."""
    import av
    from PIL import Image
    from lpr4m.frames import sample_frames
    from lpr4m.io import atomic_path
    frames = []
    for src in sources:
        for f in sample_frames(src, mode="fps", fps=5.0):
            frames.append(np.asarray(Image.fromarray(f.rgb).resize(size, Image.BILINEAR)))
            if len(frames) >= max_source_frames:
                break
    if not frames:
        raise BadInput(sources[0] if sources else None, "no frames to build the bench clip from")
    n = int(round(seconds * fps))
    with atomic_path(out) as tmp:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = size
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "23", "preset": "veryfast", "g": str(int(gop_s * fps)),
                              "keyint_min": str(int(gop_s * fps))}
            for i in range(n):
                # 5 fps sources held for fps/5 output frames each, with a slow pan so frames are not identical
                rgb = frames[(i * 5 // fps) % len(frames)]
                shift = (i * 2) % 16
                rgb = np.ascontiguousarray(np.roll(rgb, shift, axis=1))
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return out


def bench_clip(cache: Path, seconds: float, sources: Sequence[Path], size=(1280, 720), fps: int = 25) -> Path:
    path = cache / f"bench-{int(seconds)}s-{size[0]}x{size[1]}-{fps}fps.mp4"
    if not path.is_file():
        logger.info("writing the %g s %dx%d bench clip %s", seconds, size[0], size[1], path)
        make_bench_clip(path, sources, seconds, size=size, fps=fps)
    return path


# -- one measurement in a child process ----------------------------------------------------------------------
def _peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: Linux carries that across fork + exec,
    so a child would report the (bigger) parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _child(args) -> int:
    """Runs inside the pinned subprocess: one measurement, JSON on stdout."""
    import resource
    from lpr4m.frames import sample_frames
    t_load = time.perf_counter()
    if args.child == "decode":
        t0 = time.perf_counter()
        n = sum(1 for _ in sample_frames(args.clip, mode="fps", fps=args.fps))
        wall = time.perf_counter() - t0
        stages = {}
        load = 0.0
    else:
        from pipeline import backends
        from pipeline.gallery import GalleryIndex
        from pipeline.recognize import recognize_video
        emb = backends.load_embedder(args.weights, args.backend, "cpu")
        det = None if args.child == "nodet" else backends.load_detector(args.detector_weights, args.backend, "cpu")
        gallery = GalleryIndex.load(args.index, emb)
        # warm-up on the first frames (session initialisation, lazy imports such as the detector's NMS kernel):
        # one-time costs, reported as load time, not per-frame time
        recognize_video(args.clip, emb, gallery, det, fps=args.fps, k=5, max_frames=8)
        load = time.perf_counter() - t_load
        t0 = time.perf_counter()
        result, _ = recognize_video(args.clip, emb, gallery, det, fps=args.fps, k=5)
        wall = time.perf_counter() - t0
        n = result["n_frames"]
        stages = result["timings_ms_per_frame"]
    peak_mb = _peak_rss_mb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    json.dump({"wall_s": wall, "frames": n, "peak_rss_mb": peak_mb, "load_s": load, "stages": stages}, sys.stdout)
    return 0


def _measure(kind: str, clip: Path, args, index: Path | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--clip", str(clip),
           "--fps", str(args.fps), "--backend", args.backend]
    if index is not None:
        cmd += ["--index", str(index)]
    if args.weights:
        cmd += ["--weights", args.weights]
    if args.detector_weights:
        cmd += ["--detector-weights", args.detector_weights]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.cores), MKL_NUM_THREADS=str(args.cores),
               OPENBLAS_NUM_THREADS=str(args.cores))
    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))
    if proc.returncode != 0:
        raise BadInput(clip, f"bench child '{kind}' failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_runs(kind: str, clip: Path, args, index: Path | None) -> dict:
    _measure(kind, clip, args, index)  # warm-up (page cache, model files)
    runs = [_measure(kind, clip, args, index) for _ in range(args.runs)]
    med = statistics.median(r["wall_s"] for r in runs)
    return {"kind": kind, "runs": runs, "wall_s": med, "frames": runs[0]["frames"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "load_s": statistics.median(r["load_s"] for r in runs),
            "stages": min(runs, key=lambda r: abs(r["wall_s"] - med))["stages"]}


def speed_table(rows: list[dict], seconds: float, base: float) -> str:
    head = (f"{'setting':<22}{'wall s':>8}{'x realtime':>12}{'ms/frame':>10}{'vs decode':>11}{'peak MB':>9}"
            f"{'load s':>8}  stages (ms/frame; decode runs in its own thread)")
    out = [head]
    for r in rows:
        st = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
        out.append(f"{r['label']:<22}{r['wall_s']:8.2f}{seconds / r['wall_s']:12.1f}"
                   f"{1000 * r['wall_s'] / max(1, r['frames']):10.1f}{r['wall_s'] / base:10.2f}x"
                   f"{r['peak_rss_mb']:9.0f}{r['load_s']:8.2f}  {st}")
    return "\n".join(out)


# -- agreement with the retriever's evaluation ------------------------------------------------------------------
def agreement(root: Path, weights: Path, backend: str = "torch") -> dict:
    """Top-1 of the pipeline (clips/*.mp4 at 1 fps, full frames) vs the retriever protocol (query frames)."""
    from lpr4m.layout import Dataset
    from pipeline import backends
    from pipeline.evaluation import evaluate_system
    from retriever.evaluation import evaluate as retriever_evaluate
    ds = Dataset(root)
    emb = backends.load_embedder(weights, backend, "cpu")
    t0 = time.perf_counter()
    ref = retriever_evaluate(ds, emb, "none", ("mean",) if emb.config.aggregation == "max" else
                             (emb.config.aggregation,), ("live",), 10, True, (1, 5, 10), rankings_k=10)
    t1 = time.perf_counter()
    mine = evaluate_system(ds, emb, None, None, source="clips", fps=1.0, ks=(1, 5, 10), rankings_k=10,
                           method=emb.config.aggregation if emb.config.aggregation != "max" else "mean")
    t2 = time.perf_counter()
    ref_key = next(iter(ref["rankings"]))
    ref_top1 = [None if r is None or not r[0] else r[0][0] for r in ref["rankings"][ref_key]]
    my_top1 = [None if r is None or not r[0] else r[0][0] for r in mine["_rankings"]["full_frames"]]
    same = sum(a == b and a is not None for a, b in zip(ref_top1, my_top1))
    r1_ref = ref["results"][ref_key]["R1"]
    r1_mine = mine["results"]["full_frames"]["R1"]
    return {"data": str(root), "weights": str(weights), "queries": len(ref_top1), "top1_agreement": same /
            max(1, len(ref_top1)), "R1_retriever_frames": r1_ref, "R1_pipeline_clips": r1_mine,
            "R5_retriever_frames": ref["results"][ref_key]["R5"],
            "R5_pipeline_clips": mine["results"]["full_frames"]["R5"],
            "dR1": abs(r1_ref - r1_mine), "within_0.05": abs(r1_ref - r1_mine) <= 0.05,
            "retriever_s": round(t1 - t0, 2), "pipeline_s": round(t2 - t1, 2)}


def grocery_root(arg: str | None) -> Path | None:
    """The agreement check's LPR4M root: the shared one when present by default, none for '', and an explicit
    folder that is missing is an error (not a silently skipped check)."""
    if arg is None:
        return SHARED_GROCERY if SHARED_GROCERY.is_dir() else None
    if not arg:
        return None
    if not Path(arg).is_dir():
        raise BadInput(arg, "--grocery: LPR4M root not found (expected a folder; '' skips the agreement check)")
    return Path(arg)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.backends import BACKENDS
    p = Parser(
        prog="python pipeline/bench.py", description=__doc__.split("\n\n")[0].split(":", 1)[-1].strip())
    p.add_argument("--clip", help="bench clip (default: a generated 60 s 1280x720 H.264 clip)")
    p.add_argument("--seconds", type=positive_float, default=60.0, help="length of the generated clip")
    p.add_argument("--fps", type=positive_float, default=1.0)
    p.add_argument("--runs", type=positive_int, default=5, help="timed runs per setting (median reported)")
    p.add_argument("--cores", type=positive_int, default=2, help="CPU cores each measurement is pinned to")
    p.add_argument("--backend", choices=BACKENDS, default="onnx")
    p.add_argument("--weights", help="embedder weights (default weights/retriever.<backend suffix>)")
    p.add_argument("--detector-weights", help="detector weights (default weights/detector.<backend suffix>)")
    p.add_argument("--gallery", help="gallery folder for the speed runs (default: the bundled demo gallery)")
    p.add_argument("--long-minutes", type=nonnegative_float, default=0.0,
                   help="also measure peak memory on an N-minute clip")
    p.add_argument("--grocery", default=None, help="LPR4M root for the agreement check ('' = skip; default: "
                                                   f"{SHARED_GROCERY} when present)")
    p.add_argument("--grocery-weights", help="embedder for the agreement check (default weights/retriever.*)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--cache", default=None, help="where generated clips and the index go (default LPR cache)")
    p.add_argument("--out", type=output_file, help="write the JSON result here too")
    p.add_argument("--child", choices=("decode", "full", "nodet"), help=argparse.SUPPRESS)
    p.add_argument("--index", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return _child(args)
    setup_logging(args.verbose)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from pipeline import backends
    from pipeline.gallery import cache_dir, cached_index
    grocery = grocery_root(args.grocery)
    if args.cores > len(os.sched_getaffinity(0)):
        raise BadInput(None, f"--cores {args.cores}: only {len(os.sched_getaffinity(0))} CPU cores are available here")
    result: dict = {"cores": args.cores, "backend": args.backend, "runs": args.runs}
    cache = Path(args.cache) if args.cache else cache_dir().parent / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    if not args.skip_speed:
        sources = sorted((backends.DEMO_DIR / "clips").glob("*.mp4"))
        clip = Path(args.clip) if args.clip else bench_clip(cache, args.seconds, sources)
        from lpr4m.frames import probe_video
        info = probe_video(clip)
        seconds = info.duration_s or args.seconds
        emb = backends.load_embedder(args.weights, args.backend, "cpu")
        gallery = cached_index(Path(args.gallery) if args.gallery else backends.DEMO_DIR / "gallery", emb)
        index = gallery.path
        rows = []
        for kind, label in (("decode", "decode only"), ("full", f"pipeline {args.backend}"),
                            ("nodet", f"pipeline {args.backend} no-det")):
            r = _median_runs(kind, clip, args, None if kind == "decode" else index)
            r["label"] = label
            rows.append(r)
        base = rows[0]["wall_s"]
        table = speed_table(rows, seconds, base)
        full = rows[1]
        verdict = {"x_realtime": seconds / full["wall_s"], "target_20x": seconds / full["wall_s"] >= 20,
                   "vs_decode": full["wall_s"] / base, "target_2x_decode": full["wall_s"] <= 2 * base,
                   "peak_rss_mb": full["peak_rss_mb"], "target_2gb": full["peak_rss_mb"] < 2048}
        print(f"\n{clip.name}: {seconds:.0f} s, {info.width}x{info.height} {info.codec}, {args.fps:g} frame/s, "
              f"{args.cores} cores, median of {args.runs}\n{table}\n{json.dumps(verdict)}")
        result["speed"] = {"clip": str(clip), "seconds": seconds, "rows": rows, "verdict": verdict, "table": table}
        if args.long_minutes > 0:
            # long clip at 640x360, 5 fps: an hour encodes in about a minute; memory is what is measured here
            long_clip = bench_clip(cache, 60 * args.long_minutes, sources, size=(640, 360), fps=5)
            short_clip = bench_clip(cache, 60, sources, size=(640, 360), fps=5)
            args_long = argparse.Namespace(**{**vars(args), "runs": 1})
            r1 = _measure("full", short_clip, args_long, index)
            r = _measure("full", long_clip, args_long, index)
            print(f"flat memory (640x360): peak RSS {r1['peak_rss_mb']:.0f} MB on 1 min ({r1['frames']} frames), "
                  f"{r['peak_rss_mb']:.0f} MB on {args.long_minutes:g} min ({r['frames']} frames, "
                  f"{r['wall_s']:.1f} s)")
            result["long"] = {"minutes": args.long_minutes, "one_minute": r1, "long": r}
    if grocery is not None:
        w = Path(args.grocery_weights) if args.grocery_weights else backends.default_weights("retriever", "torch")
        a = agreement(grocery, w)
        print(f"\nagreement on {a['data']} ({a['queries']} queries, {Path(a['weights']).name}):\n"
              f"{'':<28}{'R1':>7}{'R5':>7}\n{'retriever (query frames)':<28}{a['R1_retriever_frames']:7.3f}"
              f"{a['R5_retriever_frames']:7.3f}\n{'pipeline (clips, 1 fps)':<28}{a['R1_pipeline_clips']:7.3f}"
              f"{a['R5_pipeline_clips']:7.3f}\ntop-1 agreement {a['top1_agreement']:.3f}; |dR1| {a['dR1']:.3f} "
              f"({'within' if a['within_0.05'] else 'NOT within'} 0.05)")
        result["agreement"] = a
    if args.out:
        emit_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
