"""``python pipeline/bench.py``: end-to-end speed, memory and agreement of the pipeline, printed as tables.

1. Speed (faiss benchs style: warm-up, median of ``--runs``, a baseline measured in the same run): whole
   processes on a 60 s 1280x720 H.264 clip of real camera footage (``../shared/data/videos/vtest.avi`` looped and
   upscaled, a keyframe every 2 s as livestream encoders write; the bundled demo clips when that is absent) at
   1 frame/s on ``--cores`` CPU cores. A small launcher times each process from spawn to exit and reads its peak
   RSS. Rows: the plain PyAV seek loop (the baseline), our sampler, ``pipeline/run.py`` with and without the
   detector, and its start-up (``--max-frames 1``). Targets: run.py <= 2x the seek loop, without the detector
   <= 1.3x, start-up <= 1 s, peak memory < 1 GB.
2. Frame sampling (``--sampling``): the same three decoders on each video of ``../shared/data/videos`` and on
   its 720p transcodes with a keyframe every 2 s and every 10 s. ``--long-minutes N``: peak RSS on an N-minute
   clip next to a 1-minute one (flat memory).
3. Catalogue scale (``--catalogue N [N ...]``, alone): flat, IVF-SQ8, IVF-PQ and HNSW indexes over N clustered
   256-d embeddings: build time, index size, ms/query at batch 1 and 1000, recall@10 against exact search
   (``pipeline/catalogue.py``). Targets at N = 1,000,000: <= 2 ms/query at recall@10 >= 0.95, build <= 10 min,
   index <= 1 GB.
4. Agreement (``--grocery ROOT``, default ../shared/data/grocery-lpr when present): the pipeline on the split's
   ``clips/*.mp4`` (decoded at 1 fps, full frames) against ``retriever/evaluate.py``'s protocol on the query
   frames, same weights: per-query top-1 agreement and rank-1 of both (target |dR1| <= 0.05).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: resolve packages from the repo root, not from pipeline/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
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
SHARED_VIDEOS = REPO.parent / "shared" / "data" / "videos"


# -- the bench clip ------------------------------------------------------------------------------------------
def make_bench_clip(out: Path, sources: Sequence[Path], seconds: float = 60.0, size=(1280, 720), fps: int = 25,
                    gop_s: float = 2.0, max_source_frames: int = 400) -> Path:
    """Loop the frames of ``sources`` (sampled at 5 fps, resized to ``size``, slowly panned) into an H.264 clip of
    ``seconds`` with a keyframe every ``gop_s`` (atomic write)."""
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


DECODERS = ("decode", "seekloop", "sequential")  # our sampler, the plain seek loop, every frame in order


# -- decoding baselines and measured processes -----------------------------------------------------------
def plain_seek_loop(path, fps: float) -> int:
    """The simplest PyAV sampler (the decode baseline): seek to each target time, decode to it, convert one
    frame. Returns the frames converted."""
    import av
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        tb = s.time_base
        duration = float(s.duration * tb) if s.duration else c.duration / 1_000_000
        start = float(s.start_time * tb) if s.start_time is not None else 0.0
        n = 0
        for i in range(int(duration * fps)):
            t = start + i / fps
            c.seek(int(t / tb), stream=s, backward=True)
            for f in c.decode(s):
                if f.time is not None and f.time >= t - 1e-3:
                    f.to_ndarray(format="rgb24")
                    n += 1
                    break
    return n


def sequential_decode(path, fps: float) -> int:
    """Every frame decoded in order, one per 1/fps converted: the other bound a sampler chooses between."""
    import av
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        n, nxt = 0, None
        for f in c.decode(s):
            if f.time is None:
                continue
            nxt = f.time if nxt is None else nxt
            if f.time >= nxt - 1e-3:
                f.to_ndarray(format="rgb24")
                n += 1
                nxt += 1 / fps
    return n


def _child(args) -> int:
    """Runs inside a measured process: one way of sampling the clip, the frame count on stdout."""
    from lpr4m.frames import sample_frames
    if args.child == "decode":
        n = sum(1 for _ in sample_frames(args.clip, mode="fps", fps=args.fps))
    else:
        n = (plain_seek_loop if args.child == "seekloop" else sequential_decode)(args.clip, args.fps)
    print(json.dumps({"frames": n}))
    return 0


# The measured command is started by a small launcher process, which times it (spawn to exit) and reads its peak
# RSS from wait4: Linux carries the parent's peak into an exec'd child's ru_maxrss, so the child must not be
# spawned by this (bigger) process directly.
_LAUNCHER = """import json, os, sys, time
out = os.open(os.devnull, os.O_WRONLY)
t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, out, 1)])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall_s": time.perf_counter() - t0, "rc": os.waitstatus_to_exitcode(status),
                  "peak_rss_mb": usage.ru_maxrss / 1024.0}))
"""


def measure_process(cmd: Sequence[str], cores: int) -> dict:
    """Whole-process wall time (s) and peak RSS (MB) of ``cmd``, pinned to the first ``cores`` CPU cores."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cores), MKL_NUM_THREADS=str(cores), OPENBLAS_NUM_THREADS=str(cores))
    pinned = sorted(os.sched_getaffinity(0))[:cores]
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *map(str, cmd)], env=env, capture_output=True,
                          text=True, preexec_fn=lambda: os.sched_setaffinity(0, pinned))
    if proc.returncode != 0:
        raise BadInput(None, f"bench launcher failed: {proc.stderr.strip().splitlines()[-1:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        raise BadInput(cmd[-1], f"benchmarked command failed (exit {r['rc']}): {' '.join(map(str, cmd))}")
    return r


def median_process(cmd: Sequence[str], cores: int, runs: int) -> dict:
    measure_process(cmd, cores)  # warm-up: page cache, model files, the ONNX Runtime graph cache
    rs = [measure_process(cmd, cores) for _ in range(runs)]
    return {"wall_s": statistics.median(r["wall_s"] for r in rs), "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "walls": [r["wall_s"] for r in rs]}


def _decoder_cmd(kind: str, clip: Path, fps: float) -> list:
    return [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--clip", str(clip), "--fps", str(fps)]


def speed_table(rows: list[dict], seconds: float, base: float) -> str:
    out = [f"{'whole process':<34}{'wall s':>8}{'x realtime':>12}{'vs seek loop':>14}{'peak MB':>9}"]
    for r in rows:
        out.append(f"{r['label']:<34}{r['wall_s']:8.2f}{seconds / r['wall_s']:12.1f}{r['wall_s'] / base:13.2f}x"
                   f"{r['peak_rss_mb']:9.0f}")
    return "\n".join(out)


def sampling_table(rows: list[dict]) -> str:
    out = [f"{'clip':<40}{'frames':>7}{'seek loop s':>12}{'in order s':>11}{'sampler s':>10}{'vs seek loop':>14}"
           f"{'vs in order':>12}"]
    for r in rows:
        out.append(f"{r['clip']:<40}{r['frames']:7d}{r['seekloop']:12.3f}{r['sequential']:11.3f}{r['decode']:10.3f}"
                   f"{r['decode'] / r['seekloop']:13.2f}x{r['decode'] / r['sequential']:11.2f}x")
    return "\n".join(out)


def real_footage(cache: Path, seconds: float = 60.0, gop_s: float = 2.0, source: Path | None = None) -> Path | None:
    """A ``seconds`` 1280x720 H.264 clip made from real camera footage (``../shared/data/videos/vtest.avi`` by
    default), a keyframe every ``gop_s``; None when the footage is absent."""
    source = source or SHARED_VIDEOS / "vtest.avi"
    if not source.is_file():
        return None
    path = cache / f"real-{source.stem}-{int(seconds)}s-1280x720-gop{gop_s:g}.mp4"
    if not path.is_file():
        logger.info("writing the %g s 720p bench clip %s from %s", seconds, path, source)
        make_bench_clip(path, [source], seconds, gop_s=gop_s)
    return path


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


def _speed(args, cache: Path) -> dict:
    """Whole processes on one clip: the plain seek loop (baseline), our sampler, ``pipeline/run.py`` with and
    without the detector, and its start-up (``--max-frames 1``: process start to the first frame embedded)."""
    from lpr4m.frames import probe_video
    from pipeline import backends
    from pipeline.gallery import cached_index
    demo_clips = sorted((backends.DEMO_DIR / "clips").glob("*.mp4"))
    clip = Path(args.clip) if args.clip else (real_footage(cache, args.seconds)
                                              or bench_clip(cache, args.seconds, demo_clips))
    info = probe_video(clip)
    seconds = info.duration_s or args.seconds
    emb = backends.load_embedder(args.weights, args.backend, "cpu")
    index = cached_index(Path(args.gallery) if args.gallery else backends.DEMO_DIR / "gallery", emb).path
    run = [sys.executable, str(REPO / "pipeline" / "run.py"), "--clip", str(clip), "--index", str(index),
           "--backend", args.backend, "--fps", str(args.fps), "--json", str(cache / "bench-run.json")]
    for flag, value in (("--weights", args.weights), ("--detector-weights", args.detector_weights)):
        if value:
            run += [flag, value]
    rows = []
    for label, cmd in (("plain PyAV seek loop (baseline)", _decoder_cmd("seekloop", clip, args.fps)),
                       ("our frame sampler", _decoder_cmd("decode", clip, args.fps)),
                       (f"run.py {args.backend}", run),
                       (f"run.py {args.backend} --no-detector", run + ["--no-detector"]),
                       ("run.py start-up (--max-frames 1)", run + ["--max-frames", "1"])):
        rows.append({"label": label, **median_process(cmd, args.cores, args.runs)})
    base, full, nodet, start = rows[0]["wall_s"], rows[2], rows[3], rows[4]
    table = speed_table(rows, seconds, base)
    verdict = {"vs_seek_loop": full["wall_s"] / base, "target_2x": full["wall_s"] <= 2 * base,
               "no_detector_vs_seek_loop": nodet["wall_s"] / base, "target_1.3x": nodet["wall_s"] <= 1.3 * base,
               "startup_s": start["wall_s"], "target_startup_1s": start["wall_s"] <= 1.0,
               "peak_rss_mb": full["peak_rss_mb"], "target_1gb": full["peak_rss_mb"] < 1024}
    print(f"\n{clip.name}: {seconds:.0f} s, {info.width}x{info.height} {info.codec}, {args.fps:g} frame/s, "
          f"{args.cores} cores, median of {args.runs}\n{table}\n{json.dumps(verdict)}", flush=True)
    out = {"clip": str(clip), "seconds": seconds, "rows": rows, "verdict": verdict, "table": table}
    if args.long_minutes > 0:
        # long clip at 640x360, 5 fps: an hour encodes in about a minute; memory is what is measured here
        long_clip = bench_clip(cache, 60 * args.long_minutes, demo_clips, size=(640, 360), fps=5)
        short_clip = bench_clip(cache, 60, demo_clips, size=(640, 360), fps=5)
        r1, r = (measure_process([*run[:3], str(c), *run[4:]], args.cores) for c in (short_clip, long_clip))
        print(f"flat memory (640x360): peak RSS {r1['peak_rss_mb']:.0f} MB on 1 min, {r['peak_rss_mb']:.0f} MB on "
              f"{args.long_minutes:g} min ({r['wall_s']:.1f} s)")
        out["long"] = {"minutes": args.long_minutes, "one_minute": r1, "long": r}
    return out


def _sampling(args, cache: Path) -> list[dict]:
    """Our sampler against the plain seek loop and against decoding every frame, per clip: the videos of
    ../shared/data/videos as they are, and each made into a 60 s 720p H.264 clip with a keyframe every 2 s and
    every 10 s."""
    videos = sorted(p for p in SHARED_VIDEOS.glob("*") if p.is_file()) if SHARED_VIDEOS.is_dir() else []
    if args.clip:
        videos = [Path(args.clip)]
    if not videos:
        raise BadInput(SHARED_VIDEOS, "--sampling: no videos (give --clip FILE)")
    clips = list(videos) + [real_footage(cache, 60.0, gop, v) for v in videos for gop in (2.0, 10.0)]
    rows = []
    for clip in clips:
        r = {"clip": clip.name}
        for kind in DECODERS:
            r[kind] = median_process(_decoder_cmd(kind, clip, args.fps), args.cores, args.runs)["wall_s"]
        r["frames"] = json.loads(subprocess.run(_decoder_cmd("decode", clip, args.fps), capture_output=True,
                                                text=True, check=True).stdout.strip().splitlines()[-1])["frames"]
        rows.append(r)
        logger.info("%s: seek loop %.3f s, in order %.3f s, sampler %.3f s", clip.name, r["seekloop"],
                    r["sequential"], r["decode"])
    print(f"\nframe sampling at {args.fps:g} frame/s, whole processes, {args.cores} cores, median of {args.runs}\n"
          f"{sampling_table(rows)}", flush=True)
    return rows


# -- live streams ---------------------------------------------------------------------------------------------
def hls_segments(clip: Path, folder: Path, segment_s: float = 2.0) -> list[float]:
    """Cut ``clip`` into MPEG-TS segments of about ``segment_s`` (copying the packets, at its keyframes) in
    ``folder``; returns each segment's duration."""
    import av
    folder.mkdir(parents=True, exist_ok=True)
    with av.open(str(clip)) as src:
        vin = src.streams.video[0]
        with av.open(str(folder / "all.m3u8"), "w", format="hls",
                     options={"hls_time": f"{segment_s:g}", "hls_list_size": "0", "hls_segment_type": "mpegts",
                              "hls_segment_filename": str(folder / "seg%05d.ts")}) as out:
            vout = out.add_stream_from_template(vin)
            for packet in src.demux(vin):
                if packet.dts is None:
                    continue
                packet.stream = vout
                out.mux(packet)
    return [float(line.split(":", 1)[1].rstrip(",")) for line in (folder / "all.m3u8").read_text().splitlines()
            if line.startswith("#EXTINF:")]


class LivePlaylists:
    """Serves pre-cut HLS segments as live streams on 127.0.0.1: ``/live<n>.m3u8`` lists only the segments whose
    time has come since stream ``n`` started (no end tag until the last), as a live encoder's playlist does."""

    def __init__(self, folder: Path, durations: list[float]):
        import functools
        import http.server
        import threading
        self.folder, self.durations, self.starts = folder, durations, {}
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.lstrip("/").split("?")[0]
                if name.startswith("live") and name.endswith(".m3u8"):
                    body = outer.playlist(name[4:-5]).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/vnd.apple.mpegurl")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    super().do_GET()

        handler = functools.partial(Handler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, n: int) -> str:
        return f"http://127.0.0.1:{self.port}/live{n}.m3u8"

    def playlist(self, n: str) -> str:
        start = self.starts.setdefault(n, time.monotonic())
        elapsed, t, lines = time.monotonic() - start, 0.0, []
        for i, d in enumerate(self.durations):
            if t + d > elapsed:  # a segment is published once it has been "recorded"
                break
            lines += [f"#EXTINF:{d:.3f},", f"seg{i:05d}.ts"]
            t += d
        done = len(lines) // 2 == len(self.durations)
        head = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{math.ceil(max(self.durations))}",
                "#EXT-X-MEDIA-SEQUENCE:0"]
        return "\n".join(head + lines + (["#EXT-X-ENDLIST"] if done else [])) + "\n"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _live(args, cache: Path) -> list[dict]:
    """k live streams of the 720p real-footage clip at once, each read by its own ``pipeline/live.py`` at
    ``--fps``: per k, the median and p95 event latency and the frames dropped (a stream keeps up in real time
    when none are)."""
    from pipeline import backends
    from pipeline.gallery import cached_index
    clip = Path(args.clip) if args.clip else real_footage(cache, args.seconds)
    if clip is None:
        raise BadInput(SHARED_VIDEOS, "--live-streams: no real footage here (give --clip FILE)")
    folder = cache / f"hls-{clip.stem}"
    durations = hls_segments(clip, folder)
    emb = backends.load_embedder(args.weights, args.backend, "cpu")
    index = cached_index(Path(args.gallery) if args.gallery else backends.DEMO_DIR / "gallery", emb).path
    rows = []
    for k in args.live_streams:
        server = LivePlaylists(folder, durations)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.cores))
        procs = [subprocess.Popen([sys.executable, str(REPO / "pipeline" / "live.py"), "--source", server.url(i),
                                   "--index", str(index), "--backend", args.backend, "--fps", str(args.fps)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
                 for i in range(k)]
        outs = [p.communicate(timeout=sum(durations) + 300)[0] for p in procs]
        server.close()
        lat, dropped, read = [], 0, 0
        for out in outs:
            events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            lat += [e["latency_s"] for e in events if e["event"] == "products"]
            stop = events[-1] if events and events[-1]["event"] == "stopped" else {}
            dropped += stop.get("frames_dropped", 0)
            read += stop.get("frames_read", 0)
        lat.sort()
        rows.append({"streams": k, "frames_read": read, "frames_dropped": dropped,
                     "latency_median_s": lat[len(lat) // 2] if lat else None,
                     "latency_p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
                     "real_time": dropped == 0 and bool(lat)})
        logger.info("%d live streams: %s", k, rows[-1])
    print(f"\nlive streams of {clip.name} ({sum(durations):.0f} s each, {args.fps:g} frame/s, "
          f"{args.backend}, {args.cores} cores)\n{'streams':>8}{'read':>7}{'dropped':>9}{'latency p50 s':>15}"
          f"{'p95 s':>8}  real time")
    for r in rows:
        print(f"{r['streams']:>8}{r['frames_read']:>7}{r['frames_dropped']:>9}{r['latency_median_s'] or 0:15.2f}"
              f"{r['latency_p95_s'] or 0:8.2f}  {'yes' if r['real_time'] else 'no'}")
    return rows


def _post_clip(url: str, clip: Path, key: str | None = None) -> tuple[int, float]:
    """One multipart POST of ``clip``; (status, seconds)."""
    import urllib.error
    import urllib.request
    import uuid
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{clip.name}\"\r\n"
            f"Content-Type: video/mp4\r\n\r\n").encode() + clip.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if key:
        headers["X-API-Key"] = key
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=600) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    return status, time.perf_counter() - t0


def _service(args, cache: Path) -> list[dict]:
    """``pipeline/serve.py`` as a real process; for each client count c, c clients each POST the 15 s demo clip
    ``--runs`` times back to back: p50 / p95 latency, throughput, and every status code."""
    import concurrent.futures
    import socket
    from pipeline import backends
    clip = backends.DEMO_DIR / "clips" / "demo-2.mp4"
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    index = cache / "service-index"
    cmd = [sys.executable, str(REPO / "pipeline" / "serve.py"), "--index", str(index), "--port", str(port),
           "--backend", args.backend, "--workers", str(args.cores), "--queue", str(max(args.service) * 2)]
    if not index.exists():
        cmd += ["--gallery", str(backends.DEMO_DIR / "gallery")]
    env = {k: v for k, v in os.environ.items() if k != "LPR_API_KEY"}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1/recognize"
    try:
        for _ in range(600):
            try:
                if _post_clip(url, clip)[0] == 200:  # also the warm-up request
                    break
            except OSError:
                time.sleep(0.2)
        rows = []
        for c in args.service:
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(c) as pool:
                results = list(pool.map(lambda _: _post_clip(url, clip), range(c * args.runs)))
            wall = time.perf_counter() - t0
            lat = sorted(t for _, t in results)
            codes = collections.Counter(code for code, _ in results)
            rows.append({"clients": c, "requests": len(results), "p50_s": lat[len(lat) // 2],
                         "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))], "clips_per_s": len(results) / wall,
                         "status": dict(codes)})
    finally:
        server.terminate()
        server.wait(30)
    print(f"\nservice ({args.backend}, {args.cores} workers, {clip.name}: 15 s clip) - {args.runs} requests per "
          f"client\n{'clients':>8}{'requests':>9}{'p50 s':>8}{'p95 s':>8}{'clips/s':>9}  status codes")
    for r in rows:
        print(f"{r['clients']:>8}{r['requests']:>9}{r['p50_s']:8.2f}{r['p95_s']:8.2f}{r['clips_per_s']:9.2f}  "
              f"{r['status']}")
    return rows


def _catalogue(args, result: dict) -> int:
    from pipeline.catalogue import CATALOGUE_TYPES, catalogue_table, measure_catalogue
    kinds = args.catalogue_types or CATALOGUE_TYPES
    bad = [k for k in kinds if k not in CATALOGUE_TYPES]
    if bad:
        raise BadInput(None, f"--catalogue-types: unknown {', '.join(bad)} "
                             f"(expected some of {' '.join(CATALOGUE_TYPES)})")
    _faiss_threads(args.cores)
    rows = []
    for n in args.catalogue:
        rows += measure_catalogue(n, kinds)
        print(f"\n{catalogue_table([r for r in rows if r['n'] == n])}", flush=True)
    result["catalogue"] = rows
    if args.out:
        emit_json(result, args.out)
    return 0


def _faiss_threads(cores: int) -> None:
    import faiss
    faiss.omp_set_num_threads(cores)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])


def build_parser() -> argparse.ArgumentParser:
    from pipeline.backends import BACKENDS
    p = Parser(
        prog="python pipeline/bench.py", description=__doc__.split("\n\n")[0].split(":", 1)[-1].strip())
    p.add_argument("--clip", help="bench clip (default: a 60 s 1280x720 H.264 clip of real footage, made once)")
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
    p.add_argument("--catalogue", type=positive_int, nargs="+", metavar="N",
                   help="only the catalogue-scale table, for each N (e.g. 10000 100000 1000000)")
    p.add_argument("--catalogue-types", nargs="+", default=None, metavar="TYPE",
                   help="index types for --catalogue (default: flat ivfsq ivfpq hnsw)")
    p.add_argument("--out", type=output_file, help="write the JSON result here too")
    p.add_argument("--sampling", action="store_true",
                   help="also the frame-sampling table (our sampler, the plain seek loop, decoding in order) "
                        "on the real videos of ../shared/data/videos and their 720p transcodes")
    p.add_argument("--live-streams", type=positive_int, nargs="+", metavar="K",
                   help="also run K live streams of the real-footage clip at once (e.g. 1 2 4): event latency and "
                        "dropped frames")
    p.add_argument("--service", type=positive_int, nargs="+", metavar="C",
                   help="also time pipeline/serve.py with C concurrent clients (e.g. 1 4 8)")
    p.add_argument("--child", choices=DECODERS, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return _child(args)
    setup_logging(args.verbose)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from pipeline import backends
    from pipeline.gallery import cache_dir
    grocery = grocery_root(args.grocery)
    if args.cores > len(os.sched_getaffinity(0)):
        raise BadInput(None, f"--cores {args.cores}: only {len(os.sched_getaffinity(0))} CPU cores are available here")
    result: dict = {"cores": args.cores, "backend": args.backend, "runs": args.runs}
    if args.catalogue:
        return _catalogue(args, result)
    cache = Path(args.cache) if args.cache else cache_dir().parent / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    if args.sampling:
        result["sampling"] = _sampling(args, cache)
    if args.live_streams:
        result["live"] = _live(args, cache)
    if args.service:
        result["service"] = _service(args, cache)
    if not args.skip_speed:
        result["speed"] = _speed(args, cache)
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
