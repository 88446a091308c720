"""``python pipeline/live.py --source URL_OR_FILE``: product events from a stream while it runs, as JSON lines.

The source is anything FFmpeg opens: rtmp://, srt://, rtsp://, an HLS playlist (http(s)://.../x.m3u8), HTTP-FLV,
a capture device (/dev/video0) or a file (``--follow``: one still being written). Events go to stdout, and also
to ``--events FILE`` (appended) and ``--webhook URL`` (POSTed) when given: a segment starts, its ranked products
after every window, the segment ends (see pipeline/livestream.py). A dropped source is reopened with back-off;
SIGINT / SIGTERM close the open segment and stop cleanly. Gallery options are those of pipeline/run.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: resolve packages from the repo root, not from pipeline/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
from typing import Sequence  # noqa: E402

from lpr4m.cli import (Parser, device_arg, fraction, nonnegative_int, output_file, positive_float,  # noqa: E402
                       positive_int, run_main, setup_logging)

logger = logging.getLogger("pipeline.live")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.backends import BACKENDS, DEMO_DIR
    from retriever.crops import CROP_POLICIES
    p = Parser(prog="python pipeline/live.py", description=__doc__.split("\n\n")[0].split(":", 1)[-1].strip())
    p.add_argument("--source", required=True, help="stream URL, capture device or file")
    p.add_argument("--format", default=None, help="FFmpeg input format when it cannot be guessed (e.g. v4l2, flv)")
    p.add_argument("--follow", action="store_true", help="a file still being written: wait for more at its end")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gallery", help=f"folder of shop images (or an LPR4M root); default: {DEMO_DIR / 'gallery'}")
    g.add_argument("--index", help="a gallery index folder made by pipeline/index.py")
    p.add_argument("--live", help="rank only among this live's gallery (LPR4M protocol)")
    p.add_argument("--fps", type=positive_float, default=1.0, help="frames recognised per second of stream")
    p.add_argument("--window", type=positive_float, default=3.0, help="seconds per segmentation window")
    p.add_argument("--seg-threshold", type=fraction, default=0.7, help="window similarity below which it is odd")
    p.add_argument("--seg-hysteresis", type=positive_int, default=2, help="odd windows that confirm a new segment")
    p.add_argument("--topk", type=positive_int, default=5)
    p.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto")
    p.add_argument("--device", type=device_arg, default="auto")
    p.add_argument("--weights", help="embedder weights (default weights/retriever.<backend suffix>)")
    p.add_argument("--detector-weights", help="detector weights (default weights/detector.<backend suffix>)")
    p.add_argument("--no-detector", action="store_true", help="embed full frames")
    p.add_argument("--conf", type=fraction, default=0.25, help="detector score threshold")
    p.add_argument("--crop-policy", choices=CROP_POLICIES, default="fuse")
    p.add_argument("--events", type=output_file, help="also append the events to this file (JSON lines)")
    p.add_argument("--webhook", help="also POST each event (JSON) to this http(s) URL")
    p.add_argument("--retries", type=nonnegative_int, default=10,
                   help="reconnection attempts in a row before giving up (back-off 1 s doubling to 30 s)")
    p.add_argument("--timeout", type=positive_float, default=10.0, help="seconds to wait on the source")
    p.add_argument("--strict", action="store_true", help="an unreadable shop image is fatal")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from pipeline.livestream import JsonLines, LiveJob, LiveSource, Webhook
    from pipeline.run import load_pipeline

    sinks = [JsonLines(sys.stdout)]
    webhook = Webhook(args.webhook) if args.webhook else None
    source = LiveSource(args.source, fps=args.fps, follow=args.follow, retries=args.retries,
                        timeout_s=args.timeout, input_format=args.format)
    _, embedder, detector, gallery = load_pipeline(args)
    events_file = open(args.events, "a", encoding="utf-8") if args.events else None  # appended: nothing lost
    if events_file is not None:
        sinks.append(JsonLines(events_file))
    if webhook is not None:
        sinks.append(webhook)

    def emit(event: dict) -> None:
        for sink in sinks:
            sink(event)

    job = LiveJob(source, embedder, gallery, detector, emit, window_s=args.window, threshold=args.seg_threshold,
                  hysteresis=args.seg_hysteresis, k=args.topk, live_id=args.live, crop_policy=args.crop_policy)

    def on_signal(signum, _frame):
        logger.info("%s: closing the open segment and stopping", signal.Signals(signum).name)
        job.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        summary = job.run()
    finally:
        if webhook is not None:
            webhook.close()
        if events_file is not None:
            events_file.close()
    logger.info("live: %d frames read, %d recognised, %d dropped, %d segments, median latency %s s",
                summary["frames_read"], summary["frames_processed"], summary["frames_dropped"],
                summary["segments"], summary["latency_s_median"])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
