"""``python pipeline/index.py --gallery DIR_OR_ROOT --out INDEX``: shop images -> a faiss index folder + meta.

``--add DIR`` appends shop images to an existing ``--out`` index and ``--remove ID ...`` drops image ids (or
``<image_id>-<view>``) without re-embedding the rest. The index refuses an embedder other than its own.
Prints a JSON summary (or writes it to ``--summary FILE``).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: resolve packages from the repo root, not from pipeline/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import logging  # noqa: E402
from typing import Sequence  # noqa: E402

from lpr4m.cli import (Parser, device_arg, emit_json, output_file, output_folder, positive_int, run_main,  # noqa: E402
                       setup_logging)
from lpr4m.errors import BadInput, Problems  # noqa: E402

logger = logging.getLogger("pipeline.index")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.backends import BACKENDS
    from pipeline.gallery import INDEX_TYPES
    p = Parser(
        prog="python pipeline/index.py", description=__doc__.split("\n\n")[0].split(":", 1)[-1].strip())
    p.add_argument("--gallery", help="folder of shop images, or an LPR4M root (its gallery/ or training images)")
    p.add_argument("--out", required=True, type=output_folder,
                   help="index folder to write (or to update with --add/--remove)")
    p.add_argument("--add", metavar="DIR", help="append the shop images of DIR to the existing --out index")
    p.add_argument("--remove", nargs="+", metavar="ID", help="drop these image ids from the existing --out index")
    p.add_argument("--split", choices=("test", "training", "all"), default="test",
                   help="for an LPR4M root: test galleries, training images, or both")
    p.add_argument("--live", nargs="+", help="only these live ids' galleries")
    p.add_argument("--main-only", action="store_true", help="only each product's main image (view 0)")
    p.add_argument("--index-type", choices=INDEX_TYPES, default="auto",
                   help="auto (default): exact search up to 20,000 images, HNSW above; flat = exact; ivfsq, "
                        "ivfpq, hnsw: approximate (pipeline/bench.py --catalogue N compares them)")
    p.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default ~4 sqrt(N))")
    p.add_argument("--weights", help="embedder weights (default weights/retriever.<backend suffix>)")
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--device", type=device_arg, default="auto")
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--strict", action="store_true", help="an unreadable shop image is fatal")
    p.add_argument("--summary", type=output_file, metavar="FILE", help="write the JSON summary here instead of stdout")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from pipeline.gallery import check_out, index_lock

    modes = [bool(args.gallery), bool(args.add), bool(args.remove)]
    if sum(modes) != 1:
        raise BadInput(None, "give exactly one of --gallery (build), --add DIR or --remove ID ...")
    problems = Problems(strict=args.strict)
    out = check_out(args.out)  # before any work: an --out that is not ours is refused now
    with index_lock(out):  # one writer at a time: a concurrent --add waits instead of losing an update
        return _write(args, out, problems)


def _write(args, out: Path, problems: Problems) -> int:
    from pipeline import backends
    from pipeline.gallery import GalleryIndex, collect, report_skipped
    if args.remove:
        gi = GalleryIndex.load(out)
        n, unknown = gi.remove(args.remove)
        if unknown:
            logger.warning("not in the index: %s", ", ".join(unknown))
        if n == 0:
            raise BadInput(out, f"none of the ids to remove are in the index ({', '.join(unknown[:5])})")
        gi.save(out)
        emit_json({"removed": n, "unknown": unknown, **gi.summary()}, args.summary)
        return 0

    device = backends.resolve_device(args.device, args.backend)
    embedder = backends.load_embedder(args.weights, args.backend, device)
    src = args.gallery or args.add
    root, items = collect(src, args.split, args.live, args.main_only)
    if args.add:
        gi = GalleryIndex.load(out, embedder)  # refuses another embedder
        n = gi.add(embedder, root, items, problems, batch_size=args.batch)
        gi.save(out)
        result = {"added": n, **gi.summary()}
    else:
        gi = GalleryIndex.build(embedder, root, items, args.index_type, problems, batch_size=args.batch,
                                nlist=args.nlist, source={"gallery": str(root), "split": args.split,
                                                          "live": args.live, "main_only": args.main_only})
        gi.save(out)
        result = {"built": gi.ntotal, **gi.summary()}
    report_skipped(problems.messages, problems.total)
    result["problems"] = problems.as_dict()
    emit_json(result, args.summary)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
