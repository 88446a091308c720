"""Which weights files a backend uses, and loading them with a useful message when one is missing.

``--backend torch|onnx|tensorrt`` maps to a suffix (as ultralytics' AutoBackend does); the detector and the
retriever loaders then pick the runtime from that suffix. A missing export names the command that makes it.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from lpr4m.errors import BadInput

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
WEIGHTS_DIR = REPO / "weights"
DEMO_DIR = REPO / "demo"
BACKENDS = ("torch", "onnx", "tensorrt")
SUFFIXES = {
    "detector": {"torch": (".safetensors", ".pt"), "onnx": (".onnx",), "tensorrt": (".engine",)},
    "retriever": {"torch": (".safetensors",), "onnx": (".onnx",), "tensorrt": (".engine",)},
}
EXPORT_FORMAT = {"onnx": "onnx", "tensorrt": "engine"}


def default_weights(stage: str, backend: str = "torch", weights_dir: Path = WEIGHTS_DIR) -> Path:
    """``weights/<stage>.<suffix>`` for the backend; a missing export is a BadInput naming the export command."""
    if backend not in BACKENDS:
        raise BadInput(None, f"unknown --backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    candidates = [weights_dir / f"{stage}{s}" for s in SUFFIXES[stage][backend]]
    for c in candidates:
        if c.is_file():
            return c
    if backend == "torch":
        hint = f"train it with: python {stage}/train.py --data ROOT (see weights/README.md)"
    else:
        src = next((weights_dir / f"{stage}{s}" for s in SUFFIXES[stage]["torch"]
                    if (weights_dir / f"{stage}{s}").is_file()), weights_dir / f"{stage}{SUFFIXES[stage]['torch'][0]}")
        hint = (f"export it with: python {stage}/export.py --weights {_rel(src)} --format {EXPORT_FORMAT[backend]}")
    raise BadInput(candidates[0], f"{backend} weights for the {stage} not found; {hint}")


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _fresh_onnx_exports(weights_dir: Path) -> bool:
    """Both bundled ONNX exports exist and were exported from the bundled torch weights (sha256 recorded)."""
    try:
        from detector.config import DetectorConfig
        from detector.infer import read_onnx_config
        from retriever.embedder import read_config
        det_onnx, ret_onnx = weights_dir / "detector.onnx", weights_dir / "retriever.onnx"
        det_src, ret_src = weights_dir / "detector.json", weights_dir / "retriever.safetensors"
        if not all(p.is_file() for p in (det_onnx, ret_onnx, det_src, ret_src)):
            return False
        det_ok = read_onnx_config(det_onnx).sha256 == DetectorConfig.load(det_src).sha256
        ret_ok = read_config(ret_onnx, verify=False).extra.get("source_sha256") == \
            read_config(ret_src, verify=False).sha256
        return bool(det_ok and ret_ok)
    except BadInput:
        return False


def resolve_backend(backend: str, *explicit, weights_dir: Path = WEIGHTS_DIR) -> str:
    """``auto``: the runtime of explicitly given weights (by suffix), else ONNX Runtime when the bundled exports
    are up to date (faster on CPU, no torch import), else torch."""
    if backend != "auto":
        return backend
    for w in explicit:
        if w:
            return {".onnx": "onnx", ".engine": "tensorrt"}.get(Path(w).suffix.lower(), "torch")
    return "onnx" if _fresh_onnx_exports(weights_dir) else "torch"


def resolve_device(device: str, backend: str) -> str:
    """The device a backend runs on. ``auto`` takes a GPU when the runtime can use one here, else the CPU; an
    explicit GPU the runtime cannot use is refused in one line, never silently swapped for the CPU."""
    device = str(device).strip().lower()
    if backend == "torch":
        from lpr4m.cli import torch_device
        return torch_device(device)
    if backend == "tensorrt":
        if device in ("cpu", "mps"):
            raise BadInput(None, f"--device {device}: TensorRT engines run on a CUDA GPU (use --device cuda)")
        from lpr4m.cli import torch_device
        return "cuda" if device == "auto" else torch_device(device)
    import onnxruntime as ort  # the ONNX path never imports torch

    from lpr4m.cli import GPU_PROVIDERS
    providers = ort.get_available_providers()
    gpu = any(p in providers for p in GPU_PROVIDERS)
    if device in ("auto", "cpu"):
        return "cuda" if device == "auto" and gpu else "cpu"
    if not re.match(r"^(cuda(:\d+)?|\d+)$", device):
        raise BadInput(None, f"--device {device}: the onnx backend runs on cpu, cuda, cuda:N or a GPU id")
    if not gpu:
        raise BadInput(None, f"--device {device}: ONNX Runtime has no CUDA provider here (has "
                             f"{', '.join(providers)}); use --device cpu, or ./setup.sh --gpu")
    return f"cuda:{device}" if device.isdigit() else device


def load_embedder(weights=None, backend: str = "torch", device: str = "cpu"):
    """The retriever's embedder (its ``load_embedder``) for explicit weights or the bundled default."""
    from retriever.embedder import load_embedder as _load
    path = Path(weights) if weights else default_weights("retriever", backend)
    if not path.is_file():
        raise BadInput(path, "embedder weights not found")
    emb = _load(path, device=device)
    logger.info("embedder %s (%s)", path.name, getattr(emb, "fingerprint", "?"))
    return emb


def load_detector(weights=None, backend: str = "torch", device: str = "cpu", conf: float = 0.25,
                  imgsz: int | None = None):
    """The detector package's ``load_detector`` for explicit weights or the bundled default."""
    from detector import load_detector as _load
    path = Path(weights) if weights else default_weights("detector", backend)
    if not path.is_file():
        raise BadInput(path, "detector weights not found")
    det = _load(path, device=device, conf=conf, imgsz=imgsz, spin_wait=False)  # the video decoder runs beside it
    logger.info("detector %s", path.name)
    return det
