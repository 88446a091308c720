"""``python detector/export.py --weights W --format onnx|engine``: ONNX (dynamic batch, parity-checked) or a
TensorRT engine (FP16, optionally INT8) built on this machine's GPU."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from detector.config import DetectorConfig, sidecar
from lpr4m.cli import (device_arg, emit_json, image_size, output_file, positive_float, positive_int, setup_logging,
                       torch_device)
from lpr4m.errors import BadInput
from lpr4m.io import atomic_path

logger = logging.getLogger(__name__)

OPSET = 17
SUPPORTED_OPSETS = range(11, 21)  # ultralytics' head needs 11+; 20 is the TorchScript exporter's last


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python detector/export.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default="weights/detector.safetensors", help="our .safetensors (or an ultralytics .pt)")
    p.add_argument("--format", choices=("onnx", "engine"), default="onnx")
    p.add_argument("--out", type=output_file, dest="output",
                   help="output file (default: the weights path with .onnx / .engine)")
    p.add_argument("--imgsz", type=image_size, help="input size (default: the one in the weights' config)")
    p.add_argument("--opset", type=int, default=OPSET, choices=SUPPORTED_OPSETS, metavar="11..20")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime vs PyTorch parity check")
    p.add_argument("--max-batch", type=positive_int, default=16,
                   help="TensorRT: largest batch of the optimisation profile")
    p.add_argument("--int8", action="store_true", help="TensorRT: also INT8 (calibrated on --calib-data frames)")
    p.add_argument("--calib-data", help="TensorRT INT8: LPR4M root whose test frames calibrate the ranges")
    p.add_argument("--workspace-gb", type=positive_float, default=4.0)
    p.add_argument("--device", type=device_arg, default="0", help="TensorRT build GPU")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a .pt the safe loader refuses")
    p.add_argument("--json-out", type=output_file, help="write the JSON result here instead of stdout")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def parity_frames(n: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Fixed frames of different sizes with bright rectangles (so a trained model has boxes to compare)."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        h, w = (240, 320) if i % 2 == 0 else (360, 270)
        im = (rng.random((h, w, 3)) * 40 + 100).astype(np.uint8)
        for _ in range(2):
            bw, bh = int(w * rng.uniform(0.2, 0.4)), int(h * rng.uniform(0.2, 0.4))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            im[y:y + bh, x:x + bw] = rng.integers(0, 255, 3)
        frames.append(im)
    return frames


def export_onnx(weights, output=None, imgsz: int | None = None, opset: int = OPSET, trust_pickle: bool = False) -> dict:
    """Export to ONNX with a dynamic batch axis and our DetectorConfig in the model metadata."""
    import onnx
    import torch

    from detector import yolo
    from detector.infer import load_torch_model
    from retriever.models.same_pad import drop_trailing_empty_inputs
    weights = Path(weights)
    model, cfg = load_torch_model(weights, trust_pickle=trust_pickle)
    imgsz = int(imgsz or cfg.imgsz)
    if imgsz % cfg.stride:
        raise BadInput(None, f"--imgsz {imgsz} must be a multiple of the model stride {cfg.stride}")
    net = yolo.inference_model(model)
    output = Path(output) if output else weights.with_suffix(".onnx")
    t0 = time.perf_counter()
    x = torch.zeros(1, 3, imgsz, imgsz)
    with torch.inference_mode():
        net(x)  # the head caches its anchors for this input size, so they export as constants, not ~60 shape ops
    with atomic_path(output) as tmp:
        torch.onnx.export(net, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["output0"], dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
                          do_constant_folding=True)
        proto = onnx.load(str(tmp))
        drop_trailing_empty_inputs(proto.graph)  # lets ONNX Runtime fuse the trunk's "same" pads into its convs
        onnx_cfg = DetectorConfig(**{**cfg.to_dict(), "weights_format": "onnx", "imgsz": imgsz,
                                     "source": str(weights), "sha256": cfg.sha256 or yolo.sha256_file(weights)})
        meta = {"lpr_detector_config": json.dumps(onnx_cfg.to_dict()), "imgsz": str(imgsz), "stride": str(cfg.stride),
                "names": json.dumps(cfg.names), "licence": "model trained with ultralytics (AGPL-3.0)"}
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    logger.info("export success %.1fs, saved as %s (%.1f MB)", time.perf_counter() - t0, output,
                output.stat().st_size / 1e6)
    return {"output": str(output), "imgsz": imgsz, "opset": opset, "sha256": yolo.sha256_file(output),
            "size_mb": round(output.stat().st_size / 1e6, 2)}


def parity(weights, onnx_path, imgsz: int | None = None, frames=None, conf: float = 0.05) -> dict:
    """PyTorch vs ONNX Runtime on fixed frames: the network outputs of every anchor (boxes in px, scores), and the
    detections after the shared NMS.

    The verdict (``ok``) is on the network outputs. Both backends share the NMS code, but a barely trained network
    gives near-duplicate boxes whose overlap sits at the NMS threshold, and a 1e-4 px difference can keep one more
    of them; such frames are counted in ``count_mismatch`` and left out of the detection differences.
    """
    from detector.infer import load_detector, preprocess
    frames = frames if frames is not None else parity_frames()
    ref = load_detector(weights, conf=conf, imgsz=imgsz)
    test = load_detector(onnx_path, conf=conf, imgsz=imgsz)
    batch, _ = preprocess(frames, ref.imgsz)
    raw_a, raw_b = ref.raw(batch), test.raw(batch)  # (B, 4 + nc, anchors): xywh in input px, then class scores
    raw_box_diff = float(np.abs(raw_a[:, :4] - raw_b[:, :4]).max())
    raw_score_diff = float(np.abs(raw_a[:, 4:] - raw_b[:, 4:]).max())
    a, b = ref.detect(frames), test.detect(frames)
    box_diff, score_diff, count_mismatch = 0.0, 0.0, 0
    for da, db in zip(a, b):
        if len(da) != len(db):
            count_mismatch += 1
        elif len(da):
            box_diff = max(box_diff, float(np.abs(da.xyxy - db.xyxy).max()))
            score_diff = max(score_diff, float(np.abs(da.scores - db.scores).max()))
    return {"frames": len(frames), "boxes": sum(len(d) for d in a), "max_box_diff_px": box_diff,
            "max_score_diff": score_diff, "count_mismatch": count_mismatch, "max_raw_box_diff_px": raw_box_diff,
            "max_raw_score_diff": raw_score_diff, "ok": raw_box_diff <= 1.0 and raw_score_diff <= 1e-3}


def tensorrt_available() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed (pip install .[gpu] on a machine with an NVIDIA GPU)"
    import torch
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    return True, ""


def export_engine(weights, output=None, imgsz: int | None = None, max_batch: int = 16, int8: bool = False,
                  calib_data: str | None = None, workspace_gb: float = 4.0, device: str = "0",
                  trust_pickle: bool = False) -> dict:
    """Build a TensorRT engine (FP16 where the GPU supports it, INT8 optionally) from a fresh ONNX export."""
    ok, why = tensorrt_available()
    if not ok:
        raise BadInput(weights, f"TensorRT engines need an NVIDIA GPU with TensorRT: {why}")
    import tempfile

    import tensorrt as trt
    import torch

    from detector import yolo
    weights = Path(weights)
    output = Path(output) if output else weights.with_suffix(".engine")
    gpu = torch.device(torch_device(device))
    torch.cuda.set_device(0 if gpu.index is None else gpu.index)  # torch 2.11 refuses a bare "cuda" here
    with tempfile.TemporaryDirectory() as tmpdir:
        onnx_info = export_onnx(weights, Path(tmpdir) / "model.onnx", imgsz, trust_pickle=trust_pickle)
        imgsz = onnx_info["imgsz"]
        trt_logger = trt.Logger(trt.Logger.INFO)
        builder = trt.Builder(trt_logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, trt_logger)
        if not parser.parse_from_file(onnx_info["output"]):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BadInput(weights, f"TensorRT could not parse the ONNX export: {errors[:200]}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        profile = builder.create_optimization_profile()
        name = network.get_input(0).name
        shape = (3, imgsz, imgsz)
        profile.set_shape(name, (1, *shape), (max(1, max_batch // 2), *shape), (max_batch, *shape))
        config.add_optimization_profile(profile)
        precision = "fp32"
        if builder.platform_has_fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
            precision = "fp16"
        if int8:
            if not calib_data:
                raise BadInput(None, "--int8 needs --calib-data ROOT (frames to calibrate activation ranges)")
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = _calibrator(trt, calib_data, imgsz, Path(tmpdir) / "calib.cache")
            config.set_calibration_profile(profile)
            precision += "+int8"
        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BadInput(weights, "TensorRT engine build failed (see the TensorRT log above)")
        with atomic_path(output) as tmp:
            tmp.write_bytes(bytes(serialized))
    from detector.infer import load_torch_model
    _, cfg = load_torch_model(weights, trust_pickle=trust_pickle)
    engine_cfg = DetectorConfig(**{**cfg.to_dict(), "weights_format": "engine", "imgsz": imgsz,
                                   "sha256": yolo.sha256_file(output), "source": str(weights),
                                   "made_by": f"TensorRT {trt.__version__} {precision} on "
                                              f"{torch.cuda.get_device_name()}"})
    engine_cfg.save(sidecar(output))
    logger.info("export success %.1fs, saved as %s (%.1f MB)", time.perf_counter() - t0, output,
                output.stat().st_size / 1e6)
    return {"output": str(output), "config": str(sidecar(output)), "imgsz": imgsz, "precision": precision,
            "max_batch": max_batch, "tensorrt": trt.__version__}


def _calibrator(trt, root: str, imgsz: int, cache: Path, n_frames: int = 512, batch: int = 8):
    """An entropy calibrator over up to ``n_frames`` test frames, fed through our letterbox preprocessing."""
    import torch

    from detector.infer import preprocess
    from lpr4m.images import load_rgb
    from lpr4m.layout import Dataset
    ds = Dataset(root)
    paths = [ds.query_frame_path(f) for f in sorted(ds.gt_boxes)][:n_frames]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise BadInput(root, "no test frames to calibrate INT8 with")

    class Calib(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.i = 0
            self.buf = None

        def get_batch_size(self):
            return batch

        def get_batch(self, names):
            if self.i >= len(paths):
                return None
            frames = [load_rgb(p) for p in paths[self.i:self.i + batch]]
            self.i += batch
            x, _ = preprocess(frames, imgsz)
            if len(x) < batch:
                x = np.concatenate([x, np.repeat(x[-1:], batch - len(x), 0)])
            self.buf = torch.from_numpy(x).cuda()
            return [int(self.buf.data_ptr())]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data):
            cache.write_bytes(bytes(data))

    return Calib()


def main(argv: Sequence[str] | None = None) -> int:
    """Export detector weights to ONNX or TensorRT; prints a JSON summary (and the ONNX parity check)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    weights = Path(args.weights)
    if not weights.is_file():
        raise BadInput(weights, "weights file not found")
    if args.format == "onnx":
        result = export_onnx(weights, args.output, args.imgsz, args.opset, trust_pickle=args.trust_pickle)
        if not args.no_check:
            result["parity"] = parity(weights, result["output"], imgsz=result["imgsz"])
            if not result["parity"]["ok"]:
                logger.warning("ONNX parity check outside tolerance: %s", result["parity"])
    else:
        result = export_engine(weights, args.output, args.imgsz, args.max_batch, args.int8, args.calib_data,
                               args.workspace_gb, args.device, trust_pickle=args.trust_pickle)
    emit_json(result, args.json_out)
    return 0
