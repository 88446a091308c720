"""Export the embedder (``python retriever/export.py --weights W --format onnx|engine``).

ONNX: dynamic batch axis, ``onnx.checker`` full check, and a parity check of ONNX Runtime against PyTorch
(min cosine >= 0.9999 on a fixed input, 0.999 for ``--precision fp16``) -- a file that fails parity is not
written. TensorRT: built from an fp16 (default) or fp32 ONNX export on the GPU that will run it (engines are tied
to GPU and TensorRT version; never commit them). Each export writes ``<out>.json`` beside it (e.g.
``retriever.onnx.json``): the embedder config with that file's sha256, so ``load_embedder`` reads preprocessing
from it exactly as for the .safetensors.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lpr4m.cli import Parser, emit_json, output_file, positive_int, setup_logging
from lpr4m.errors import BadInput
from lpr4m.io import atomic_path, sha256_file
from retriever.config import config_path_for
from retriever.embedder import build_model, load_embedder, pool_params_from_model, read_config
from retriever.models.same_pad import constant_same_pads, drop_trailing_empty_inputs

logger = logging.getLogger(__name__)

PARITY_MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999}  # of each exported embedding with PyTorch's (fp32)
# torch's TorchScript exporter (dynamo=False) supports opsets up to 20; below 11 Pad cannot take the trunk's "same"
# pads when they depend on the input size (input_size % 32 != 0). The tests export and parity-check both ends.
OPSETS = range(11, 21)


def _parity_input(config, n: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, config.input_size, config.input_size)).astype(np.float32)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def _write_sidecar(config, model, path: Path, fmt: str, source_sha: str, parity: float) -> None:
    config.format = fmt
    config.sha256 = sha256_file(path)
    config.extra = dict(config.extra, source_sha256=source_sha, parity_min_cosine=parity,
                        pool_head={k: np.round(v, 7).tolist() for k, v in pool_params_from_model(model).items()})
    config.save(config_path_for(path))


def export_onnx(weights, out=None, opset: int = 17, batch: int = 2, precision: str = "fp32") -> dict:
    """ONNX file with a dynamic batch axis, checked and parity-tested against PyTorch. ``precision`` fp16: a
    half-precision graph with float32 input and output (what TensorRT 11 builds an fp16 engine from)."""
    import onnx
    import onnxruntime as ort

    from lpr4m.tensorrt_engine import half_precision
    if precision not in PARITY_MIN_COSINE:
        raise BadInput(None, f"--precision {precision}: expected one of {', '.join(PARITY_MIN_COSINE)}")
    weights = Path(weights)
    config = read_config(weights)
    source_sha = config.sha256
    model = build_model(config, weights).eval()
    out = Path(out) if out else weights.with_suffix(".onnx")
    x = torch.from_numpy(_parity_input(config, batch))
    xp = _parity_input(config, 5, seed=1)  # a batch size other than the traced one: the axis is dynamic
    with torch.inference_mode():
        y_pt = model(torch.from_numpy(xp)).numpy()  # the model as trained, before the export form below
    if config.input_size % 32 == 0:  # the input is fixed, so the trunk's "same" pads are constants
        constant_same_pads(model)
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        exported = half_precision(model) if precision == "fp16" else model
        torch.onnx.export(exported, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["embeddings"],
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})
        proto = onnx.load(str(tmp))
        drop_trailing_empty_inputs(proto.graph)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        y_ort = sess.run(None, {"images": xp})[0]
        parity = min_cosine(y_ort, y_pt)
        _require_parity(parity, precision, out)
    config.extra["precision"] = precision
    _write_sidecar(config, model, out, "onnx", source_sha, parity)
    logger.info("ONNX export %s (%.1f MB) in %.1f s, parity min cosine %.6f", out, out.stat().st_size / 1e6,
                time.perf_counter() - t0, parity)
    return {"format": "onnx", "path": str(out), "precision": precision, "parity_min_cosine": parity,
            "size_mb": out.stat().st_size / 1e6,
            "seconds": round(time.perf_counter() - t0, 2)}


def _require_parity(min_cos: float, precision: str, out) -> None:
    if min_cos < PARITY_MIN_COSINE[precision]:
        raise BadInput(out, f"not written: {precision} export's embeddings differ from PyTorch's (min cosine "
                            f"{min_cos:.6f} < {PARITY_MIN_COSINE[precision]})")


def export_engine(weights, out=None, precision: str | None = None, max_batch: int = 64, opt_batch: int = 32,
                  workspace_gb: float = 2.0) -> dict:
    """TensorRT engine built on this machine's GPU from a fresh ONNX export in ``precision`` (default fp16), or
    from an .onnx file in its own precision; parity-checked against PyTorch (or that file in ONNX Runtime)."""
    import tempfile

    from lpr4m import tensorrt_engine
    tensorrt_engine.require(weights)
    weights = Path(weights)
    config = read_config(weights)
    source_sha = config.sha256
    if weights.suffix == ".onnx":
        own = config.extra.get("precision", "fp32")
        if precision not in (None, own):
            raise BadInput(weights, f"--precision {precision}: this ONNX file is {own} (an engine keeps its file's "
                                    "precision; export the .safetensors instead)")
        precision = own
    precision = precision or "fp16"
    out = Path(out) if out else weights.with_suffix(".engine")
    s, opt_batch = config.input_size, min(opt_batch, max_batch)
    with tempfile.TemporaryDirectory() as tmpdir:
        if weights.suffix == ".onnx":
            onnx_path, model = weights, None
        else:
            onnx_path = Path(export_onnx(weights, Path(tmpdir) / "model.onnx", precision=precision)["path"])
            model = build_model(config, weights).eval()
        if model is None:
            from retriever.embedder import OnnxBackend
            ref_fn = OnnxBackend(weights)
        else:
            def ref_fn(b):
                with torch.inference_mode():
                    return model(torch.from_numpy(b)).numpy()
        xp = _parity_input(config, 5, seed=1)
        with atomic_path(out) as staged:  # checked before it replaces an engine already at ``out``
            built = tensorrt_engine.build_engine(onnx_path, staged, (1, 3, s, s), (opt_batch, 3, s, s),
                                                 (max_batch, 3, s, s), workspace_gb, precision=precision)
            parity = min_cosine(tensorrt_engine.EngineRunner(staged)(xp), ref_fn(xp))
            _require_parity(parity, precision, out)
    config.extra["precision"] = precision
    if model is None:  # built from an .onnx: its sidecar already holds the pooling head
        config.format = "engine"
        config.sha256 = sha256_file(out)
        config.extra.update(source_sha256=source_sha, parity_min_cosine=parity)
        config.save(config_path_for(out))
    else:
        _write_sidecar(config, model, out, "engine", source_sha, parity)
    return {"format": "engine", "path": str(out), "parity_min_cosine": parity, "precision": precision, **built}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="retriever/export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help=".safetensors embedder (with its .json); .onnx for --format engine")
    p.add_argument("--format", choices=("onnx", "engine"), default="onnx")
    p.add_argument("--output", type=output_file, default=None,
                   help="output file (default: the weights path with the new suffix)")
    p.add_argument("--opset", type=int, choices=OPSETS, default=17, metavar=f"{OPSETS[0]}..{OPSETS[-1]}",
                   help="ONNX opset (default 17)")
    p.add_argument("--precision", choices=tuple(PARITY_MIN_COSINE),
                   help="the graph's precision (default: fp32 for onnx, fp16 for engine; an .onnx input is built "
                        "as it is)")
    p.add_argument("--max-batch", type=positive_int, default=64,
                   help="TensorRT: largest batch of the optimisation profile")
    p.add_argument("--out", type=output_file, default=None, help="write the JSON result here instead of stdout")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    weights = Path(args.weights)
    if args.format == "onnx":
        if weights.suffix != ".safetensors":
            raise BadInput(weights, "--format onnx exports a .safetensors embedder")
        result = export_onnx(weights, args.output, args.opset, precision=args.precision or "fp32")
    else:
        result = export_engine(weights, args.output, args.precision, max_batch=args.max_batch)
    result["fingerprint"] = load_embedder(result["path"]).fingerprint if args.format == "onnx" else None
    emit_json(result, args.out)
    return 0
