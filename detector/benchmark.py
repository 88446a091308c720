"""``python detector/bench.py``: ms/frame of PyTorch vs ONNX Runtime, per input size and batch (median of runs).

Times the whole ``Detector.detect`` call (letterbox, network, NMS) and the network alone, on fixed 640x360 frames,
with the same thread count for both runtimes, each in its default threading (OpenMP and ONNX Runtime both
busy-wait between ops). The runtimes take turns in short blocks; the ratio column is ONNX Runtime / PyTorch.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from detector.config import BUNDLED_WEIGHTS
from lpr4m.cli import (Parser, device_arg, emit_json, image_size, nonnegative_int, output_file, positive_int,
                       setup_logging)
from lpr4m.errors import BadInput

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python detector/bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", help=f"detector weights to time (default: the bundled {BUNDLED_WEIGHTS.name})")
    p.add_argument("--model-yaml", help="time an untrained network of this model YAML instead (e.g. yolo11n.yaml)")
    p.add_argument("--imgsz", type=image_size, nargs="+", default=[320, 640])
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    p.add_argument("--runs", type=positive_int, default=9, help="timed runs per setting (the median is reported)")
    p.add_argument("--warmup", type=nonnegative_int, default=1)
    p.add_argument("--threads", type=positive_int, default=2, help="intra-op threads for both runtimes")
    p.add_argument("--device", type=device_arg, default="cpu",
                   help="cpu, or 0 / cuda:0 for PyTorch on the GPU and ONNX Runtime's TensorRT/CUDA providers when "
                        "it has them")
    p.add_argument("--out", type=output_file, help="write the JSON rows here instead of stdout")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def bench_frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((360, 640, 3)) * 255).astype(np.uint8) for _ in range(n)]


def interleaved_median_ms(fns: dict, runs: int, warmup: int, block: int = 3) -> dict:
    """Median ms per call of each function. The functions take turns in blocks of ``block`` back-to-back timed
    calls, each block after one untimed call, so that a machine whose speed drifts during the benchmark slows every
    runtime alike while each is timed warm (caches, thread pools), as in a loop over a video."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    while len(times[next(iter(fns))]) < runs:
        for name, fn in fns.items():
            fn()
            for _ in range(min(block, runs - len(times[name]))):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {name: 1000 * statistics.median(ts) for name, ts in times.items()}


def _untrained_weights(yaml: str, folder: Path, imgsz: int) -> Path:
    """A randomly initialised network in our format: speed does not depend on the weights' values."""
    from safetensors.torch import save_file

    from detector import yolo
    from detector.config import DetectorConfig
    desc = yolo.model_yaml(yaml)
    model = yolo.build_model(desc)
    out = folder / "untrained.safetensors"
    save_file(yolo.state_dict_for_saving(model), str(out))
    DetectorConfig(model=yaml, model_yaml=desc, imgsz=imgsz, stride=int(max(model.stride)),
                   made_by="detector/bench.py (untrained, timing only)").save(out.with_suffix(".json"))
    return out


def run(args) -> dict:
    import torch

    from detector.exporting import export_onnx
    from detector.infer import Detector, OnnxBackend, load_detector, preprocess
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_yaml:
            if args.weights:
                raise BadInput(args.weights, "--weights or --model-yaml (an untrained network), not both")
            weights = _untrained_weights(args.model_yaml, Path(tmp), max(args.imgsz))
            note = f"untrained {args.model_yaml}"
        else:
            weights = Path(args.weights or BUNDLED_WEIGHTS)
            note = str(weights)
            if not weights.is_file():
                raise BadInput(weights, "weights file not found (--model-yaml yolo11n.yaml times an untrained one)")
        for imgsz in args.imgsz:
            pt = load_detector(weights, imgsz=imgsz, conf=0.25, device=args.device)
            onnx_path = Path(tmp) / f"d{imgsz}.onnx"
            export_onnx(weights, onnx_path, imgsz=imgsz)
            # on a GPU machine whose ONNX Runtime is the CPU build: PyTorch on the GPU beside ORT on the CPU
            ort_backend = OnnxBackend(onnx_path, args.device, threads=args.threads, cpu_fallback=True)
            providers = ort_backend.providers
            ort = Detector(ort_backend, pt.config, conf=0.25, imgsz=imgsz)
            for bs in args.batch:
                frames = bench_frames(bs)
                batch, _ = preprocess(frames, imgsz)
                row = {"imgsz": imgsz, "batch": bs}
                fns = {}
                for name, det in (("torch", pt), ("onnxruntime", ort)):
                    det.batch_size = bs
                    fns[f"{name}_ms"] = lambda det=det: det.detect(frames)
                    fns[f"{name}_net_ms"] = lambda det=det: det.raw(batch)
                row.update({k: ms / bs for k, ms in interleaved_median_ms(fns, args.runs, args.warmup).items()})
                row["ratio"] = row["onnxruntime_ms"] / row["torch_ms"]
                row["net_ratio"] = row["onnxruntime_net_ms"] / row["torch_net_ms"]
                rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
                logger.info("imgsz %d batch %d: torch %.1f ms/frame, onnxruntime %.1f ms/frame", imgsz, bs,
                            row["torch_ms"], row["onnxruntime_ms"])
    return {"weights": note, "threads": args.threads, "runs": args.runs, "device": args.device,
            "onnxruntime_providers": providers, "torch": torch.__version__,
            "onnxruntime": _ort_version(), "rows": rows}


def _ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


def table(result: dict) -> str:
    head = (f"{'imgsz':>5} {'batch':>5} | {'torch ms/frame':>14} {'ORT ms/frame':>12} {'ORT/torch':>9} | "
            f"{'torch net':>9} {'ORT net':>8} {'net ratio':>9}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['imgsz']:>5} {r['batch']:>5} | {r['torch_ms']:>14.1f} {r['onnxruntime_ms']:>12.1f} "
                     f"{r['ratio']:>9.2f} | {r['torch_net_ms']:>9.1f} {r['onnxruntime_net_ms']:>8.1f} "
                     f"{r['net_ratio']:>9.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the speed table (stderr) and the JSON rows (stdout or --out)."""
    import sys
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    result = run(args)
    print(f"weights: {result['weights']}  device: {args.device}  ORT: {result['onnxruntime_providers'][0]}  "
          f"threads: {args.threads}  median of {args.runs} runs  "
          f"(torch {result['torch']}, onnxruntime {result['onnxruntime']})", file=sys.stderr)
    print(table(result), file=sys.stderr)
    emit_json(result, args.out)
    return 0
