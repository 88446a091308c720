"""``python detector/export.py --weights W --format onnx|engine|safetensors``: ONNX (dynamic batch, parity-checked)
or a TensorRT engine built on this machine's GPU, fp32, fp16 or INT8 (Q/DQ) graphs (fp16 by default for engines); or
an ultralytics ``.pt`` converted once to our safetensors + JSON, so that later loads never unpickle it."""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from detector.config import BUNDLED_WEIGHTS, DetectorConfig, sidecar
from lpr4m.cli import (Parser, command_line, device_arg, emit_json, image_size, output_file, positive_float,
                       positive_int, setup_logging)
from lpr4m import tensorrt_engine
from lpr4m.errors import BadInput
from lpr4m.io import atomic_path

logger = logging.getLogger(__name__)

OPSET = 17
SUPPORTED_OPSETS = range(11, 21)  # ultralytics' head needs 11+; 20 is the TorchScript exporter's last
CALIBRATION_FRAMES = 512
# (box px, score) of the network outputs, every anchor's. fp16 measured: up to 1.5 px and 5e-3 on low-score
# anchors, 0.09 px where the score passes 0.25 (bundled weights, 160 px)
PARITY_TOLERANCE = {"fp32": (1.0, 1e-3), "fp16": (3.0, 2e-2)}
PARITY_CONF = 0.05  # low, so that the detections compared after NMS include weak boxes


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python detector/export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(BUNDLED_WEIGHTS), help="our .safetensors (or an ultralytics .pt)")
    p.add_argument("--format", choices=("onnx", "engine", "safetensors"), default="onnx",
                   help="safetensors: convert an ultralytics .pt (--trust-pickle where the safe loader refuses it)")
    p.add_argument("--output", type=output_file, help="the exported file, .onnx, .engine or .safetensors (default: "
                                                      "the weights path with that suffix)")
    p.add_argument("--imgsz", type=image_size, help="input size (default: the one in the weights' config)")
    p.add_argument("--opset", type=int, default=OPSET, choices=SUPPORTED_OPSETS, metavar="11..20")
    p.add_argument("--no-check", action="store_true",
                   help="skip the parity check against PyTorch (else an export outside tolerance is not written)")
    p.add_argument("--max-batch", type=positive_int, default=16,
                   help="TensorRT: largest batch of the optimisation profile")
    p.add_argument("--precision", choices=tensorrt_engine.PRECISIONS,
                   help="the graph's precision (default: fp32 for onnx, fp16 for engine); int8 = Q/DQ pairs "
                        "calibrated on --calib-data")
    p.add_argument("--calib-data", help="int8: LPR4M root whose training frames (else test frames) calibrate the "
                                        f"activation ranges (up to {CALIBRATION_FRAMES} frames)")
    p.add_argument("--workspace-gb", type=positive_float, default=4.0)
    p.add_argument("--device", type=device_arg, default="0", help="TensorRT build GPU")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a .pt the safe loader refuses")
    p.add_argument("--out", type=output_file, help="write the JSON result here instead of stdout")
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


def export_onnx(weights, output=None, imgsz: int | None = None, opset: int = OPSET, trust_pickle: bool = False,
                precision: str = "fp32", calib_data=None, check: bool = False) -> dict:
    """Export to ONNX with a dynamic batch axis and our DetectorConfig in the model metadata.

    ``precision`` fp16 exports a half-precision graph (float32 input and output); int8 adds Q/DQ pairs calibrated
    on ``calib_data``'s frames. These are the files TensorRT 11 builds fp16 / int8 engines from. ``check``: run
    :func:`parity` before the file takes ``output``'s place, and refuse an export outside tolerance.
    """
    import tempfile

    import onnx
    import torch

    from detector import yolo
    from detector.infer import load_torch_model
    from retriever.models.same_pad import drop_trailing_empty_inputs
    if precision not in tensorrt_engine.PRECISIONS:
        raise BadInput(None, f"--precision {precision}: expected one of {', '.join(tensorrt_engine.PRECISIONS)}")
    if precision == "int8" and opset < 13:
        raise BadInput(None, f"--precision int8 needs --opset 13 or newer (per-channel Q/DQ), not {opset}")
    if (precision == "int8") != bool(calib_data):
        raise BadInput(calib_data, "--precision int8 needs --calib-data ROOT (frames to calibrate activation "
                                   "ranges), and --calib-data is only for int8")
    if calib_data:
        from lpr4m.layout import Dataset
        Dataset(calib_data)  # a wrong root is refused now, not after the export
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
    if precision == "fp16":
        net = tensorrt_engine.half_precision(net)
        for m in net.modules():  # ultralytics' _apply halved the head's cached anchors: box decoding in float32
            if isinstance(getattr(m, "anchors", None), torch.Tensor):
                m.anchors, m.strides = m.anchors.float(), m.strides.float()
    onnx_cfg = DetectorConfig(**{**cfg.to_dict(), "weights_format": "onnx", "imgsz": imgsz, "precision": precision,
                                 "source": str(weights), "sha256": cfg.sha256 or yolo.sha256_file(weights)})
    meta = {"lpr_detector_config": json.dumps(onnx_cfg.to_dict()), "imgsz": str(imgsz), "stride": str(cfg.stride),
            "names": json.dumps(cfg.names), "licence": "model trained with ultralytics (AGPL-3.0)"}
    result = {}
    with tempfile.TemporaryDirectory() as tmpdir, atomic_path(output) as staged:
        exported = Path(tmpdir) / "model.onnx"
        torch.onnx.export(net, (x,), str(exported), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["output0"], dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
                          do_constant_folding=True)
        proto = onnx.load(str(exported))
        drop_trailing_empty_inputs(proto.graph)  # lets ONNX Runtime fuse the trunk's "same" pads into its convs
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.checker.check_model(proto, full_check=True)
        if precision == "int8":
            onnx.save(proto, str(exported))
            result = tensorrt_engine.quantize_int8(exported, staged, calibration_batches(calib_data, imgsz))
        else:
            onnx.save(proto, str(staged))
        if check:
            result["parity"] = require_parity(parity(weights, staged, imgsz=imgsz, precision=precision), output)
    logger.info("export success %.1fs, saved as %s (%.1f MB)", time.perf_counter() - t0, output,
                output.stat().st_size / 1e6)
    return {"output": str(output), "imgsz": imgsz, "opset": opset, "precision": precision, **result,
            "sha256": yolo.sha256_file(output), "size_mb": round(output.stat().st_size / 1e6, 2)}


def parity(weights, exported, imgsz: int | None = None, frames=None, conf: float = PARITY_CONF,
           precision: str = "fp32", device: str = "cpu") -> dict:
    """PyTorch vs an export (an .onnx or .engine path, or a ``Detector`` on one) on fixed frames: the network
    outputs of every anchor (boxes in px, scores), and the detections after the shared NMS.

    The verdict (``ok``) is on the network outputs, within ``PARITY_TOLERANCE[precision]``; INT8 has none (its
    accuracy is measured by ``detector/evaluate.py``), so ``ok`` is None there. Both backends share the NMS code,
    but a barely trained network gives near-duplicate boxes whose overlap sits at the NMS threshold, and a 1e-4 px
    difference can keep one more of them; such frames are counted in ``count_mismatch`` and left out of the
    detection differences.
    """
    from detector.infer import Detector, load_detector, preprocess
    frames = frames if frames is not None else parity_frames()
    ref = load_detector(weights, conf=conf, imgsz=imgsz)
    test = exported if isinstance(exported, Detector) else load_detector(exported, conf=conf, imgsz=imgsz,
                                                                         device=device)
    batch, _ = preprocess(frames, ref.imgsz)
    raw_a, raw_b = ref.raw(batch), test.raw(batch)  # (B, 4 + nc, anchors): xywh in input px, then class scores
    raw_box_diff = float(np.abs(raw_a[:, :4] - raw_b[:, :4]).max())
    raw_score_diff = float(np.abs(raw_a[:, 4:] - raw_b[:, 4:]).max())
    a, b = ref.detect(frames), test.detect(frames)
    box_diff, score_diff, count_mismatch = 0.0, 0.0, 0
    tolerance = PARITY_TOLERANCE.get(precision)
    for da, db in zip(a, b):
        if len(da) != len(db):
            count_mismatch += 1
        elif len(da):
            box_diff = max(box_diff, float(np.abs(da.xyxy - db.xyxy).max()))
            score_diff = max(score_diff, float(np.abs(da.scores - db.scores).max()))
    return {"frames": len(frames), "boxes": sum(len(d) for d in a), "max_box_diff_px": box_diff,
            "max_score_diff": score_diff, "count_mismatch": count_mismatch, "max_raw_box_diff_px": raw_box_diff,
            "max_raw_score_diff": raw_score_diff, "precision": precision,
            "ok": None if tolerance is None else raw_box_diff <= tolerance[0] and raw_score_diff <= tolerance[1]}


def require_parity(check: dict, output) -> dict:
    """``check`` (from :func:`parity`) unless it is outside tolerance, which refuses the export."""
    if check["ok"] is False:
        raise BadInput(output, f"not written: {check['precision']} export differs from PyTorch beyond tolerance "
                               f"(raw outputs: {check['max_raw_box_diff_px']:.3g} px, score "
                               f"{check['max_raw_score_diff']:.3g}; limits {PARITY_TOLERANCE[check['precision']]}); "
                               "--no-check writes it anyway")
    return check


def _present(paths, give_up: int = 64):
    """The paths that exist, until ``give_up`` in a row do not (training frames that were never downloaded)."""
    misses = 0
    for path in paths:
        misses = 0 if path.is_file() else misses + 1
        if misses == give_up:
            return
        if not misses:
            yield path


def calibration_batches(root, imgsz: int, n_frames: int = CALIBRATION_FRAMES, batch: int = 8):
    """Letterboxed float32 batches of up to ``n_frames`` frames of ``root`` for INT8 calibration: its training
    frames, one per clip before a second one (many scenes first); its test frames only where no training frame is
    on disk (a test-only download still calibrates, but test frames never mix into a training-frame calibration
    that the test split then measures). Missing or unreadable frames are skipped and counted."""
    from detector.infer import preprocess
    from lpr4m.images import load_rgb
    from lpr4m.layout import Dataset
    ds = Dataset(root)
    clips = [c.frame_ids for c in ds.training_clips()] if ds.annotation("training_videoinfo", False) else []
    training = (ds.training_frame_path(ids[depth]) for depth in range(max(map(len, clips), default=0))
                for ids in clips if depth < len(ids))
    test = (ds.query_frame_path(f) for f in sorted(ds.gt_boxes))
    skipped = 0

    def readable(paths):
        nonlocal skipped
        for path in paths:
            try:
                yield load_rgb(path)
            except (BadInput, OSError):
                skipped += 1

    from_training = readable(_present(training))
    first = next(from_training, None)
    frames = itertools.islice(readable(test) if first is None else itertools.chain([first], from_training), n_frames)
    loaded = 0
    while chunk := list(itertools.islice(frames, batch)):
        loaded += len(chunk)
        yield preprocess(chunk, imgsz)[0]
    if skipped:
        logger.warning("INT8 calibration: %d missing or unreadable frames skipped", skipped)
    if not loaded:
        raise BadInput(root, "no readable frames to calibrate INT8 with")


def export_engine(weights, output=None, imgsz: int | None = None, max_batch: int = 16, precision: str = "fp16",
                  calib_data: str | None = None, workspace_gb: float = 4.0, device: str = "0",
                  trust_pickle: bool = False, opset: int = OPSET, check: bool = True) -> dict:
    """A TensorRT engine built on this machine's GPU from a fresh ONNX export in ``precision``; with ``check``,
    parity-checked against PyTorch like the ONNX file before it takes ``output``'s place."""
    import tempfile

    from detector import yolo
    from detector.infer import Detector, read_onnx_config
    tensorrt_engine.require(weights)
    tensorrt_engine.cuda_device(device, weights)
    weights = Path(weights)
    output = Path(output) if output else weights.with_suffix(".engine")
    with tempfile.TemporaryDirectory() as tmpdir:
        onnx_info = export_onnx(weights, Path(tmpdir) / "model.onnx", imgsz, opset, trust_pickle=trust_pickle,
                                precision=precision, calib_data=calib_data)
        imgsz = onnx_info["imgsz"]
        shape = (3, imgsz, imgsz)
        onnx_cfg = read_onnx_config(Path(onnx_info["output"]))  # the export's config: input size and precision
        with atomic_path(output) as staged:
            built = tensorrt_engine.build_engine(onnx_info["output"], staged, (1, *shape),
                                                 (max(1, max_batch // 2), *shape), (max_batch, *shape),
                                                 workspace_gb, device, precision)
            engine_cfg = DetectorConfig(**{**onnx_cfg.to_dict(), "weights_format": "engine",
                                           "sha256": yolo.sha256_file(staged),
                                           "made_by": f"TensorRT {built['tensorrt']} {precision} on {built['gpu']}"})
            engine = Detector(tensorrt_engine.EngineRunner(staged, device), engine_cfg, PARITY_CONF, imgsz)
            checked = require_parity(parity(weights, engine, imgsz, precision=precision), output) if check else None
    engine_cfg.save(sidecar(output))
    calibration = {k: v for k, v in onnx_info.items() if k.startswith("calibration")}
    return {"output": str(output), "config": str(sidecar(output)), "imgsz": imgsz, "precision": precision,
            "max_batch": max_batch, "opset": opset, **built, **calibration, "parity": checked}


def convert_checkpoint(weights, output=None, imgsz: int | None = None, trust_pickle: bool = False,
                       made_by: str = "") -> dict:
    """An ultralytics ``.pt`` as our ``.safetensors`` + ``.json``: unpickled once, on the user's word, then loaded
    safely everywhere (``--weights``, ``--model``)."""
    from detector.infer import load_torch_model, save_torch_model
    weights = Path(weights)
    if weights.suffix != ".pt":
        raise BadInput(weights, "--format safetensors converts an ultralytics .pt checkpoint")
    model, cfg = load_torch_model(weights, trust_pickle=trust_pickle)
    out = Path(output) if output else weights.with_suffix(".safetensors")
    saved = save_torch_model(model, out, imgsz=imgsz or cfg.imgsz, made_by=made_by, source=str(weights))
    return {"format": "safetensors", "weights": str(out), "config": str(out.with_suffix(".json")),
            "source_sha256": cfg.sha256, "sha256": saved.sha256, "imgsz": saved.imgsz, "names": saved.names}


def main(argv: Sequence[str] | None = None) -> int:
    """Export detector weights to ONNX or TensorRT, or convert a .pt; prints a JSON summary."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    weights = Path(args.weights)
    if not weights.is_file():
        raise BadInput(weights, "weights file not found")
    suffix = f".{args.format}"
    if args.output and Path(args.output).suffix != suffix:
        raise BadInput(args.output, f"--output of --format {args.format} must end in {suffix} (the JSON result "
                                    "goes to --out)")
    if args.out and Path(args.out).suffix in (".onnx", ".engine", ".safetensors"):
        raise BadInput(args.out, "--out is the JSON result; the exported model goes to --output")
    precision = args.precision or ("fp32" if args.format == "onnx" else "fp16")
    if args.format == "safetensors":
        result = convert_checkpoint(weights, args.output, args.imgsz, trust_pickle=args.trust_pickle,
                                    made_by=command_line("detector/export.py", argv))
    elif args.format == "onnx":
        result = export_onnx(weights, args.output, args.imgsz, args.opset, trust_pickle=args.trust_pickle,
                             precision=precision, calib_data=args.calib_data, check=not args.no_check)
    else:
        result = export_engine(weights, args.output, args.imgsz, args.max_batch, precision, args.calib_data,
                               args.workspace_gb, args.device, trust_pickle=args.trust_pickle, opset=args.opset,
                               check=not args.no_check)
    emit_json(result, args.out)
    return 0
