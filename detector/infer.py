"""The neutral detection API: ``load_detector(weights).detect(frames) -> [Detections]``.

Backends are chosen by the weights file's suffix (``.safetensors``/``.pt`` PyTorch, ``.onnx`` ONNX Runtime,
``.engine`` TensorRT). All of them share one preprocessing (square letterbox, pad 114, RGB/255) and one
postprocessing (score filter, class-agnostic NMS, boxes mapped back to the frame), so their outputs agree up to the
network's numerics.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from textwrap import shorten
from typing import Sequence

import numpy as np

from detector.config import DetectorConfig, sidecar
from lpr4m.cli import onnx_providers, onnx_session, torch_device
from lpr4m.errors import BadInput

logger = logging.getLogger(__name__)

PAD_VALUE = 114


@dataclass
class Detections:
    """Boxes of one frame: ``xyxy`` (N, 4) float32 pixel coordinates, ``scores`` (N,) float32, best first."""

    xyxy: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))


@dataclass
class Letterbox:
    gain: float
    pad_x: float
    pad_y: float
    height: int  # original frame size
    width: int


def letterbox(rgb: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize the long side to ``size`` (area filter down, linear up) and pad to a centred square."""
    import cv2
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise BadInput(None, f"expected an HxWx3 uint8 RGB frame, got shape {rgb.shape} dtype {rgb.dtype}")
    h, w = rgb.shape[:2]
    r = size / max(h, w)
    nw, nh = min(size, max(1, math.ceil(w * r - 1e-6))), min(size, max(1, math.ceil(h * r - 1e-6)))
    if (nw, nh) != (w, h):
        rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
    dw, dh = (size - nw) / 2, (size - nh) / 2
    top, left = round(dh - 0.1), round(dw - 0.1)
    bottom, right = size - nh - top, size - nw - left
    out = cv2.copyMakeBorder(rgb, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return out, Letterbox(gain=nw / w, pad_x=left, pad_y=top, height=h, width=w)


def preprocess(frames: Sequence[np.ndarray], size: int) -> tuple[np.ndarray, list[Letterbox]]:
    """Frames -> float32 NCHW batch in [0, 1] and the letterbox parameters of each frame."""
    batch = np.empty((len(frames), 3, size, size), np.float32)
    boxes = []
    for i, f in enumerate(frames):
        im, lb = letterbox(np.asarray(f), size)
        batch[i] = im.transpose(2, 0, 1) / np.float32(255.0)
        boxes.append(lb)
    return batch, boxes


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS, highest score first (torchvision's C++ kernel when torch is already loaded;
    otherwise the same greedy rule in numpy, so the ONNX Runtime path never imports torch: ~1 GB RSS, seconds)."""
    import sys
    if "torchvision" not in sys.modules:
        return _nms_numpy(boxes, scores, iou)
    import torch
    import torchvision
    return torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()


def _nms_numpy(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, np.float32), kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        order = rest[inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12) <= iou]
    return np.asarray(keep, dtype=np.int64)


def postprocess(raw: np.ndarray, lbs: list[Letterbox], conf: float, iou: float, max_det: int) -> list[Detections]:
    """Raw head output ``(B, 4 + nc, A)`` (cx, cy, w, h in input pixels; class scores) -> per-frame detections."""
    raw = np.asarray(raw, dtype=np.float32)
    out = []
    for pred, lb in zip(raw, lbs):
        scores = pred[4:].max(axis=0)
        keep = scores > conf
        if not keep.any():
            out.append(Detections.empty())
            continue
        xywh, scores = pred[:4, keep].T, scores[keep]
        if len(scores) > 30000:  # same cap as ultralytics: bounded NMS time on noisy frames
            top = np.argpartition(-scores, 30000)[:30000]
            xywh, scores = xywh[top], scores[top]
        xyxy = np.empty_like(xywh)
        xyxy[:, :2] = xywh[:, :2] - xywh[:, 2:] / 2
        xyxy[:, 2:] = xywh[:, :2] + xywh[:, 2:] / 2
        idx = nms(np.ascontiguousarray(xyxy), np.ascontiguousarray(scores), iou)[:max_det]
        xyxy, scores = xyxy[idx], scores[idx]
        xyxy[:, [0, 2]] = ((xyxy[:, [0, 2]] - lb.pad_x) / lb.gain).clip(0, lb.width)
        xyxy[:, [1, 3]] = ((xyxy[:, [1, 3]] - lb.pad_y) / lb.gain).clip(0, lb.height)
        out.append(Detections(xyxy.astype(np.float32), scores.astype(np.float32)))
    return out


class Detector:
    """Runs a backend on batches of RGB frames. ``conf``/``iou``/``max_det`` may be changed between calls."""

    def __init__(self, backend, config: DetectorConfig, conf: float | None = None, imgsz: int | None = None,
                 batch_size: int = 16):
        self.backend = backend
        self.config = config
        self.conf = config.conf if conf is None else float(conf)
        self.iou = config.iou
        self.max_det = config.max_det
        self.imgsz = int(imgsz or config.imgsz)
        fixed = getattr(backend, "fixed_imgsz", None)
        if fixed and self.imgsz != fixed:
            logger.warning("%s has a fixed input size %d; ignoring imgsz=%d", backend.name, fixed, self.imgsz)
            self.imgsz = fixed
        if self.imgsz % config.stride:
            raise BadInput(None, f"imgsz {self.imgsz} must be a multiple of the model stride {config.stride}")
        self.batch_size = batch_size

    @property
    def name(self) -> str:
        return self.backend.name

    def raw(self, batch: np.ndarray) -> np.ndarray:
        return self.backend(batch)

    def detect(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        """Detections for each frame (HxWx3 uint8 RGB), in input order."""
        out: list[Detections] = []
        max_bs = getattr(self.backend, "max_batch", None) or self.batch_size
        for i in range(0, len(frames), max_bs):
            chunk = frames[i:i + max_bs]
            batch, lbs = preprocess(chunk, self.imgsz)
            out += postprocess(self.backend(batch), lbs, self.conf, self.iou, self.max_det)
        return out

    __call__ = detect


# -- backends -------------------------------------------------------------------------------------------------
class TorchBackend:
    name = "torch"

    def __init__(self, model, device: str = "cpu"):
        import torch
        self.torch = torch
        self.device = torch.device(torch_device(device))
        # BN-fused weights of a briefly trained net hold denormal floats; on CPU they make convolutions ~5x slower
        torch.set_flush_denormal(True)
        self.model = model.to(self.device).eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            y = self.model(self.torch.from_numpy(batch).to(self.device))
        return y.float().cpu().numpy()


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None, spin_wait: bool = True,
                 cpu_fallback: bool = False):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")  # as the torch backend does
        # ONNX Runtime's default busy-waiting between ops (as OpenMP does for torch): 35 -> 26 ms at 320/batch 1 on
        # 2 cores; off where another thread needs the cores, as the pipeline's video decoder does
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        if threads:
            opts.intra_op_num_threads = threads
        providers = onnx_providers(device, cpu_fallback)  # its refusal is about --device, not the file
        try:
            self.session = onnx_session(path, opts, providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BadInput(path, f"not a loadable ONNX model ({type(e).__name__}: {shorten(str(e), 160)})") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_imgsz = inp.shape[2] if isinstance(inp.shape[2], int) else None
        self.max_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.providers = self.session.get_providers()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


# -- loading --------------------------------------------------------------------------------------------------
def onnx_metadata(path) -> dict[str, str]:
    """An ONNX file's ``metadata_props``, read from the protobuf wire format with the graph skipped, not parsed:
    reading the config this way costs a few reads instead of ``import onnx`` and loading the whole model."""
    import io
    import os

    def varint(f) -> int:
        value = shift = 0
        while shift < 64:
            byte = f.read(1)
            if not byte:
                raise EOFError
            value |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                return value
            shift += 7
        raise ValueError("varint longer than 64 bits")

    def fields(f, end: int, keep: set[int]):
        """(field number, the bytes of a length-delimited field in ``keep``, else None), skipping the rest."""
        while f.tell() < end:
            key = varint(f)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise ValueError("field number 0")
            if wire == 0:
                varint(f)
                yield number, None
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, 1)
                yield number, None
            elif wire == 2:
                n = varint(f)
                if f.tell() + n > end:
                    raise EOFError
                yield number, f.read(n) if number in keep else f.seek(n, 1) and None
            else:
                raise ValueError(f"wire type {wire}")

    meta, seen = {}, set()
    try:
        with open(path, "rb") as f:
            for number, data in fields(f, os.fstat(f.fileno()).st_size, {14}):
                seen.add(number)
                if number == 14:  # ModelProto.metadata_props: StringStringEntryProto {key = 1; value = 2}
                    entry = dict(fields(io.BytesIO(data), len(data), {1, 2}))
                    meta[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
    except (EOFError, ValueError, UnicodeDecodeError) as e:
        raise BadInput(path, f"not an ONNX model ({type(e).__name__})") from None
    if not {1, 7} <= seen:  # ir_version and graph: every ONNX model has both
        raise BadInput(path, "not an ONNX model (no ir_version and graph)")
    return meta


def read_onnx_config(path: Path) -> DetectorConfig:
    """The DetectorConfig stored in the ONNX model's metadata (export writes it), else the JSON beside it."""
    import json
    meta = onnx_metadata(path)
    if "lpr_detector_config" in meta:
        return DetectorConfig.from_dict(json.loads(meta["lpr_detector_config"]), path)
    if sidecar(path).is_file():
        return DetectorConfig.load(sidecar(path))
    raise BadInput(path, "ONNX model without detector metadata (export it with detector/export.py)")


def load_torch_model(weights, trust_pickle: bool = False):
    """(DetectionModel, DetectorConfig) from our safetensors + JSON, or an ultralytics ``.pt`` (restricted load)."""
    from detector import yolo
    weights = Path(weights)
    if not weights.is_file():
        raise BadInput(weights, "weights file not found")
    if weights.suffix == ".safetensors":
        cfg_path = sidecar(weights)
        if not cfg_path.is_file():
            raise BadInput(weights, f"missing its config {cfg_path.name} (written beside the weights by training)")
        cfg = DetectorConfig.load(cfg_path)
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise BadInput(weights, f"not a safetensors file ({type(e).__name__})") from None
        model = yolo.build_model(cfg.model_yaml, cfg.nc, cfg.names, source=cfg_path)
        if cfg.model:  # the description's name, which weights trained on from these keep in their config
            model.yaml.setdefault("yaml_file", yolo.resolve_model_yaml(cfg.model))
        yolo.load_state(model, state, weights)
        return model, cfg
    if weights.suffix == ".pt":
        model = yolo.load_ultralytics_checkpoint(weights, trust_pickle=trust_pickle)
        names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
        train_args = getattr(model, "args", None)
        imgsz = train_args.get("imgsz", 640) if isinstance(train_args, dict) else 640
        cfg = DetectorConfig(model=str(model.yaml.get("yaml_file", "")), nc=len(names),
                             model_yaml=yolo.model_yaml(model.yaml, len(names)),
                             names=[names[i] for i in sorted(names)], imgsz=int(imgsz if isinstance(imgsz, int) else 640),
                             stride=int(max(model.stride)), source=str(weights), sha256=yolo.sha256_file(weights),
                             ultralytics_version=yolo.version())
        return model, cfg
    raise BadInput(weights, "expected detector weights ending in .safetensors or .pt")


def save_torch_model(model, out, *, imgsz: int, made_by: str = "", source: str = "", metrics: dict | None = None):
    """Write a ``DetectionModel`` as our weights: fp16 safetensors (no pickle) + the ``DetectorConfig`` beside it."""
    from safetensors.torch import save_file

    from detector import yolo
    from lpr4m.io import atomic_path
    out = Path(out)
    with atomic_path(out) as tmp:
        save_file(yolo.state_dict_for_saving(model), str(tmp), metadata={"format": "pt", "kind": "lpr-detector"})
    names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
    yaml_file = Path(str(model.yaml.get("yaml_file") or "unnamed.yaml"))
    model_name = yaml_file.name if yaml_file.parent == yolo.PROJECT_MODELS else str(yaml_file)  # ours: no local path
    cfg = DetectorConfig(model=model_name, model_yaml=yolo.model_yaml(model.yaml, len(names)), nc=len(names),
                         names=[names[i] for i in sorted(names)], imgsz=int(imgsz),
                         stride=int(max(model.stride)), sha256=yolo.sha256_file(out), made_by=made_by,
                         source=source, metrics=metrics or {}, ultralytics_version=yolo.version())
    cfg.save(out.with_suffix(".json"))
    return cfg


def load_detector(weights, device: str = "cpu", conf: float = 0.25, imgsz: int | None = None,
                  trust_pickle: bool = False, batch_size: int = 16, spin_wait: bool = True) -> Detector:
    """A ``Detector`` for ``weights``; the backend follows the suffix (.safetensors/.pt, .onnx, .engine).
    ``spin_wait=False`` stops ONNX Runtime's threads busy-waiting between ops, for callers with a busy thread beside.

    >>> det = load_detector("weights/detector.safetensors")
    >>> det.detect([rgb])[0].xyxy  # (N, 4) float32 pixels
    """
    weights = Path(weights)
    if not weights.is_file():
        raise BadInput(weights, "weights file not found")
    suffix = weights.suffix.lower()
    if suffix in (".safetensors", ".pt"):
        from detector import yolo
        model, cfg = load_torch_model(weights, trust_pickle=trust_pickle)
        backend = TorchBackend(yolo.inference_model(model), device)
    elif suffix == ".onnx":
        cfg = read_onnx_config(weights)
        backend = OnnxBackend(weights, device, spin_wait=spin_wait)
    elif suffix == ".engine":
        from lpr4m.tensorrt_engine import EngineRunner
        backend = EngineRunner(weights, device)  # first: where TensorRT cannot run, that is what to say
        cfg_path = sidecar(weights)
        if not cfg_path.is_file():
            raise BadInput(weights, f"missing its config {cfg_path.name} (export writes it beside the engine)")
        cfg = DetectorConfig.load(cfg_path)
    else:
        raise BadInput(weights, "unknown detector weights type (expected .safetensors, .pt, .onnx or .engine)")
    return Detector(backend, cfg, conf=conf, imgsz=imgsz, batch_size=batch_size)
