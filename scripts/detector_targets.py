"""Where a detector stands against the targets of issue 15, in one table (and JSON with --out).

    python scripts/detector_targets.py --detector weights/detector.onnx \\
        --boxes /data/composite-real /data/lpr4m-mini --clips ../shared/data/grocery-lpr

- box AP / AP50 (pycocotools, ``detector/evaluate.py``) on the test split of each ``--boxes`` root (real
  composites made by ``python -m lpr4m composite`` with held-out products and videos; the synthetic mini);
- rank-1 of the whole system (``pipeline/evaluate.py``) on each ``--clips`` root with full frames, with
  detector crops fused with their frames (the default) and with crops alone, for the bundled retriever.

Each figure comes from the project's own commands, run as a user runs them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        subprocess.run([sys.executable, str(REPO / script), *args, "--out", str(out)], check=True, cwd=REPO)
        return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--detector", default=str(REPO / "weights" / "detector.onnx"))
    ap.add_argument("--boxes", nargs="*", default=[], help="LPR4M roots with test boxes")
    ap.add_argument("--clips", nargs="*", default=[], help="LPR4M roots with test clips (boxes not needed)")
    ap.add_argument("--retriever", help="embedder weights (default: the bundled one)")
    ap.add_argument("--out", help="write the figures here as JSON")
    args = ap.parse_args()
    rows, result = [], {"detector": args.detector, "boxes": {}, "clips": {}}
    for root in args.boxes:
        m = _run("detector/evaluate.py", ["--data", root, "--weights", args.detector])["metrics"]
        result["boxes"][root] = {"ap": m["ap"], "ap50": m["ap50"], "gt_boxes": m["gt_boxes"]}
        rows.append(f"| {root} | box AP / AP50 | {m['ap']:.3f} / {m['ap50']:.3f} ({m['gt_boxes']} boxes) |")
    retriever = ["--weights", args.retriever] if args.retriever else []
    backend = ["--backend", "onnx"] if args.detector.endswith(".onnx") else []
    for root in args.clips:
        r1 = {}
        for policy in ("fuse", "crop"):  # each run also reports full frames, from the same decoded frames
            res = _run("pipeline/evaluate.py", ["--data", root, "--detector-weights", args.detector, *backend,
                                                *retriever, "--crop-policy", policy])["results"]
            r1["full frames"] = res["full_frames"]["R1"]
            r1[f"detector, {policy}"] = res["detector"]["R1"]
        rows += [f"| {root} | R1, {name} | {v:.3f} |" for name, v in r1.items()]
        result["clips"][root] = r1
    print("| data | figure | value |\n|---|---|---|\n" + "\n".join(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
