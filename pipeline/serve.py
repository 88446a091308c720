"""``python pipeline/serve.py --index INDEX``: the recognition service over HTTP (FastAPI + uvicorn).

Binds 127.0.0.1:8000 by default. ``--gallery DIR`` with a new ``--index`` embeds DIR into it first; the service
then keeps its shop images in that index folder (add and remove them over HTTP). Routes, limits and the API key
are described in pipeline/service.py; the OpenAPI docs are served at /docs.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: resolve packages from the repo root, not from pipeline/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from typing import Sequence  # noqa: E402

from lpr4m.cli import (Parser, device_arg, nonnegative_int, positive_float, positive_int, run_main,  # noqa: E402
                       setup_logging)
from lpr4m.errors import BadInput  # noqa: E402

logger = logging.getLogger("pipeline.serve")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.backends import BACKENDS, DEMO_DIR
    p = Parser(prog="python pipeline/serve.py", description=__doc__.split("\n\n")[0].split(":", 1)[-1].strip())
    p.add_argument("--index", required=True, help="the service's gallery index folder")
    p.add_argument("--gallery", help=f"shop images to start a new --index from (e.g. {DEMO_DIR / 'gallery'})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=nonnegative_int, default=8000)
    p.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto")
    p.add_argument("--device", type=device_arg, default="auto")
    p.add_argument("--weights", help="embedder weights (default weights/retriever.<backend suffix>)")
    p.add_argument("--detector-weights", help="detector weights (default weights/detector.<backend suffix>)")
    p.add_argument("--no-detector", action="store_true", help="embed full frames")
    p.add_argument("--fps", type=positive_float, default=1.0, help="frames recognised per second of clip")
    p.add_argument("--topk", type=positive_int, default=5)
    p.add_argument("--workers", type=positive_int, default=1, help="clips recognised at once")
    p.add_argument("--queue", type=nonnegative_int, default=4, help="clips waiting beyond those; more get 429")
    p.add_argument("--max-upload-mb", type=positive_float, default=200.0)
    p.add_argument("--max-seconds", type=positive_float, default=600.0, help="longest clip accepted")
    p.add_argument("--max-live-jobs", type=positive_int, default=4)
    p.add_argument("--allow-file-sources", action="store_true",
                   help="let live jobs open local files and devices (off: stream URLs only)")
    p.add_argument("--api-key-env", default="LPR_API_KEY",
                   help="environment variable holding the API key (unset: no key needed)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import uvicorn
    from pipeline import backends
    from pipeline.gallery import is_index_folder
    from pipeline.service import ServiceConfig, copy_gallery_into_index, create_app, stop_jobs

    index = Path(args.index)
    args.backend = backends.resolve_backend(args.backend, args.weights, args.detector_weights)
    device = backends.resolve_device(args.device, args.backend)
    embedder = backends.load_embedder(args.weights, args.backend, device)
    if not is_index_folder(index):
        if not args.gallery:
            raise BadInput(index, "no gallery index here; give --gallery DIR to build it")
        copy_gallery_into_index(Path(args.gallery), index, embedder)
    elif args.gallery:
        logger.warning("%s already holds an index: --gallery %s is not used", index, args.gallery)
    detector = None if args.no_detector else backends.load_detector(args.detector_weights, args.backend, device)
    cfg = ServiceConfig(index=index, backend=args.backend, device=device, weights=args.weights,
                        detector_weights=args.detector_weights, detector=not args.no_detector, fps=args.fps,
                        topk=args.topk, workers=args.workers, queue=args.queue, max_upload_mb=args.max_upload_mb,
                        max_seconds=args.max_seconds, max_live_jobs=args.max_live_jobs,
                        api_key=os.environ.get(args.api_key_env) or None,
                        allow_file_sources=args.allow_file_sources)
    app = create_app(cfg, embedder, detector)
    logger.warning("serving %s on http://%s:%d (docs at /docs)%s", index, args.host, args.port,
                   "; API key required" if cfg.api_key else "")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    finally:
        stop_jobs(app)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
