"""``python pipeline/make_demo.py``: regenerate ``demo/`` (the bundled demo gallery and clips) from synthetic data.

Takes ONE test live of a synthesized LPR4M dataset -- test products are never in the training split, so the
bundled weights have not seen them -- and copies its gallery (all views) with titles, ``--clips`` of its test
clips and their answers:

    demo/gallery/<image_id>-<view>.jpg, demo/gallery/titles.txt
    demo/clips/demo-N.mp4, demo/answers.json ({"demo-N.mp4": {"video_id", "image_ids", "titles"}}), README.md

By default the dataset is ``python -m lpr4m synth OUT --preset demo --seed 1`` (the one the bundled detector was
trained on), synthesized into a temporary folder; ``--data ROOT`` uses an existing one. The new ``demo/`` is
written next to the old one and swapped in, so an interrupted run leaves the old demo intact.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: resolve packages from the repo root, not from pipeline/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from typing import Sequence  # noqa: E402

from lpr4m.cli import (Parser, emit_json, nonnegative_int, output_folder, positive_int, run_main,  # noqa: E402
                       setup_logging)
from lpr4m.errors import BadInput  # noqa: E402

logger = logging.getLogger("pipeline.make_demo")
MAX_BYTES = 5 * 1024 * 1024
MARKER = "answers.json"  # every demo folder this script writes has it, as {"live_id", "clips"}
DEMO_ENTRIES = {"gallery", "clips", MARKER, "README.md"}
README = """# Bundled demo

Made by `python pipeline/make_demo.py` (regenerate it with the same command): one test live of the synthetic
LPR4M dataset `{source}`. Test products never appear in the training
split, so the bundled weights (`weights/`) have not seen these products.

- `gallery/`: the live's shop images ({n} products, {views} images; `<image_id>-<view>.jpg`, view 0 = main image)
  and `titles.txt` (`image_id<TAB>title`). `python pipeline/run.py` uses it by default (index built on the fly
  and cached under `~/.cache/lpr/indexes/`, or `$LPR_CACHE_DIR`).
- `clips/`: test clips of that live; `answers.json` lists the product each one presents:
{clips}

{how}

    python pipeline/run.py --clip demo/clips/{first}.mp4 --html report.html
"""


def pick_live(ds, n_clips: int, recognised=None) -> tuple[str, list[str]]:
    """The test live with ``n_clips`` clips of different products that take the fewest bytes (demo/ stays small).

    ``recognised(live, video_id) -> bool``, when given, keeps only clips the bundled system ranks right at top-1
    (checked lazily, smallest clips first); a live with enough of them wins over one without."""
    from lpr4m.ids import parse_video_id
    by_live: dict[str, list[str]] = {}
    for video_id in ds.gt_images:
        if (ds.root / "clips" / f"{video_id}.mp4").is_file():
            by_live.setdefault(parse_video_id(video_id).live_id, []).append(video_id)

    def size(v: str) -> int:
        return (ds.root / "clips" / f"{v}.mp4").stat().st_size

    def choose(live: str, check) -> list[str]:
        chosen, seen = [], set()
        for vid in sorted(by_live[live], key=lambda v: (size(v), v)):
            first = ds.gt_images[vid][0] if ds.gt_images[vid] else None
            if first is None or first in seen or (check is not None and not check(live, vid)):
                continue
            seen.add(first)
            chosen.append(vid)
            if len(chosen) == n_clips:
                break
        return chosen

    lives = sorted(by_live, key=lambda lv: (sum(size(v) for v in choose(lv, None)), lv))
    fallback = None
    for check in ([recognised] if recognised is not None else []) + [None]:
        for live in lives:
            chosen = choose(live, check)
            if len(chosen) == n_clips:
                return live, sorted(chosen)
            if chosen and (fallback is None or len(chosen) > len(fallback[1])):
                fallback = (live, sorted(chosen))
    if fallback is None:
        raise BadInput(ds.root, "no test live with clips (expected clips/<video_id>.mp4 as lpr4m synth writes)")
    return fallback


class Recognition:
    """Runs the bundled pipeline (``pipeline/run.py`` defaults) on candidate clips, in the live's own gallery."""

    def __init__(self, ds, weights=None, detector_weights=None):
        from pipeline import backends
        self.ds = ds
        self.embedder = backends.load_embedder(weights, "torch", "cpu")
        self.detector = backends.load_detector(detector_weights, "torch", "cpu")
        self.galleries: dict = {}
        self.results: dict[str, dict] = {}

    def __call__(self, live: str, video_id: str) -> bool:
        from pipeline.gallery import GalleryIndex, collect_lpr4m
        from pipeline.recognize import recognize_video
        if live not in self.galleries:
            items = collect_lpr4m(self.ds.root, "test", [live])
            self.galleries[live] = GalleryIndex.build(self.embedder, self.ds.root.resolve(), items,
                                                      show_progress=False)
        res, _ = recognize_video(self.ds.root / "clips" / f"{video_id}.mp4", self.embedder, self.galleries[live],
                                 self.detector, k=5)
        ranked = [p["image_id"] for p in res["products"]]
        gt = set(self.ds.gt_images[video_id])
        rank = next((i + 1 for i, x in enumerate(ranked) if x in gt), None)
        self.results[video_id] = {"top1": ranked[0] if ranked else None, "rank": rank,
                                  "embedder": getattr(self.embedder, "fingerprint", None),
                                  "detector_sha256": getattr(getattr(self.detector, "config", None), "sha256", None)}
        logger.info("%s: correct product at rank %s", video_id, rank)
        return rank == 1


def synth_command(root: Path) -> str:
    from lpr4m.io import read_json
    m = read_json(root / "synth_manifest.json", expect=dict) if (root / "synth_manifest.json").is_file() else {}
    return f"python -m lpr4m synth OUT --preset {m.get('preset', '?')} --seed {m.get('seed', '?')}"


def check_replaceable(out: Path) -> None:
    """``--out`` is swapped in whole, so it may only replace an empty folder or an earlier demo (recognised by
    its answers.json and holding nothing else): any other content would be deleted."""
    from lpr4m.io import read_json
    if not out.exists():
        return
    if not out.is_dir():
        raise BadInput(out, "exists and is not a folder; choose a new --out")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    try:
        marker = read_json(out / MARKER, expect=dict) if (out / MARKER).is_file() else {}
    except BadInput:
        marker = {}
    if not {"live_id", "clips"} <= set(marker):
        raise BadInput(out, f"is not empty and not an earlier make_demo output (no {MARKER}); choose a new --out")
    if entries - DEMO_ENTRIES:
        raise BadInput(out, f"holds files make_demo did not write ({', '.join(sorted(entries - DEMO_ENTRIES)[:5])})"
                            "; move them or choose a new --out")


def write_demo(ds, out: Path, n_clips: int = 3, recognition: Recognition | None = None) -> dict:
    from lpr4m.io import write_json
    out = Path(out)
    check_replaceable(out)
    live, videos = pick_live(ds, n_clips, recognition)
    titles = ds.titles
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; the demo is a normal, shared folder
    try:
        (tmp / "gallery").mkdir()
        (tmp / "clips").mkdir()
        gallery = ds.gallery(live)
        for image_id, view, path in gallery:
            shutil.copyfile(path, tmp / "gallery" / f"{image_id}-{view}.jpg")
        ids = sorted({i for i, _, _ in gallery})
        (tmp / "gallery" / "titles.txt").write_text("".join(f"{i}\t{titles.get(i, '')}\n" for i in ids),
                                                     encoding="utf-8")
        answers = {}
        for n, vid in enumerate(videos, 1):
            name = f"demo-{n}.mp4"
            shutil.copyfile(ds.root / "clips" / f"{vid}.mp4", tmp / "clips" / name)
            gt = ds.gt_images[vid]
            answers[name] = {"video_id": vid, "image_ids": gt, "titles": [titles.get(i, "") for i in gt]}
            if recognition is not None and vid in recognition.results:
                answers[name]["bundled_weights"] = recognition.results[vid]
        write_json(tmp / MARKER, {"live_id": live, "clips": answers})
        lines = [f"  - `clips/{name}` ({a['video_id']}): {', '.join(a['titles']) or ', '.join(a['image_ids'])}"
                 for name, a in answers.items()]
        how = ("Clips were chosen, smallest first, among those the bundled weights rank right at top-1 when "
               "the demo was made (`bundled_weights` in answers.json); `python pipeline/evaluate.py` gives the "
               "honest rate on a whole test split." if recognition is not None else
               "Clips were chosen by size only (smallest first).")
        import textwrap
        (tmp / "README.md").write_text(README.format(n=len(ids), views=len(gallery), clips="\n".join(lines),
                                                     first="demo-1", source=synth_command(ds.root),
                                                     how=textwrap.fill(how, 115)),
                                       encoding="utf-8")
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        if size > MAX_BYTES:
            raise BadInput(out, f"demo would be {size / 1e6:.1f} MB (> {MAX_BYTES / 1e6:.0f} MB); use fewer --clips")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"demo": str(out), "live_id": live, "gallery_images": len(gallery), "products": len(ids),
            "clips": list(answers), "bytes": size}


def build_parser() -> argparse.ArgumentParser:
    from pipeline.backends import DEMO_DIR
    p = Parser(
        prog="python pipeline/make_demo.py", description=__doc__.split("\n\n")[0].split(":", 1)[-1].strip())
    p.add_argument("--data", help="a synthesized LPR4M root (default: synthesize --preset demo into a temp folder)")
    p.add_argument("--preset", default="demo")
    p.add_argument("--seed", type=nonnegative_int, default=1)
    p.add_argument("--clips", type=positive_int, default=3, help="demo clips to bundle")
    p.add_argument("--out", default=str(DEMO_DIR), type=output_folder, help="demo folder to (re)write")
    p.add_argument("--any-clips", action="store_true",
                   help="choose clips by size only (default: clips the bundled weights recognise at top-1)")
    p.add_argument("--weights", help="embedder for the check (default weights/retriever.safetensors)")
    p.add_argument("--detector-weights", help="detector for the check (default weights/detector.*)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    check_replaceable(Path(args.out))  # before minutes of synthesis and recognition
    from lpr4m.layout import Dataset

    def recognition(ds):
        return None if args.any_clips else Recognition(ds, args.weights, args.detector_weights)

    if args.data:
        ds = Dataset(args.data)
        summary = write_demo(ds, Path(args.out), args.clips, recognition(ds))
    else:
        from lpr4m.synth import synthesize
        with tempfile.TemporaryDirectory(prefix="lpr-demo-") as tmp:
            root = Path(tmp) / "data"
            logger.info("synthesizing preset %s seed %d (a minute or two)", args.preset, args.seed)
            synthesize(root, seed=args.seed, preset=args.preset)
            ds = Dataset(root)
            summary = write_demo(ds, Path(args.out), args.clips, recognition(ds))
    emit_json(summary)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
