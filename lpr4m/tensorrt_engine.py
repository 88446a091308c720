"""TensorRT, the project's one module that imports it: engines built from our ONNX exports, and run on a GPU.

TensorRT 11 (the version ``.[gpu]`` pins) builds strongly typed networks only: each layer runs in the type its
ONNX file gives it, and TensorRT 10's FP16/INT8 builder flags, ``platform_has_fast_fp16`` and INT8 calibrators are
gone. So the precision is chosen in the ONNX file: :func:`half_precision` wraps a network so that it exports in
fp16 with float32 input and output, and :func:`quantize_int8` adds symmetric QuantizeLinear/DequantizeLinear pairs
calibrated by ONNX Runtime (TensorRT's explicit quantization). Both kinds of file also run in ONNX Runtime, so they
are checked on the CPU; TensorRT 10 builds the same files with its STRONGLY_TYPED flag.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from textwrap import shorten
from typing import Iterable

import numpy as np

from lpr4m.cli import torch_device
from lpr4m.errors import BadInput
from lpr4m.io import atomic_path

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
MIN_MAJOR = 10  # strongly typed networks; 8.x/9.x would silently build fp32 from our fp16 files


def available() -> tuple[bool, str]:
    """(True, "") where an engine can be built and run here, else (False, why not)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed, which ./setup.sh --gpu does on a machine with one"
    import torch
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    return True, ""


def require(path, hint: str = "") -> None:
    ok, why = available()
    if not ok:
        raise BadInput(path, f"TensorRT engines need an NVIDIA GPU with TensorRT: {why}{hint}")


def cuda_device(device, path=None):
    """The torch CUDA device an engine is built or run on for ``--device`` text (auto: GPU 0); cpu and mps are
    refused before anything is built."""
    import torch
    text = str(device).strip().lower()
    if text in ("cpu", "mps"):
        raise BadInput(path, f"--device {device}: TensorRT engines build and run on a CUDA GPU (--device 0, cuda:N "
                             "or auto); use the .onnx or .safetensors weights on the CPU")
    gpu = torch.device(torch_device("0" if text in ("auto", "cuda") else text))
    return gpu if gpu.index is not None else torch.device("cuda", 0)


def half_precision(net):
    """A copy of ``net`` in fp16 between casts of its input and output: it exports as an fp16 graph whose float32
    interface the runtimes feed unchanged."""
    import torch

    class HalfPrecision(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x.half()).float()

    return HalfPrecision(copy.deepcopy(net).half()).eval()


def quantize_int8(src, dst, batches: Iterable[np.ndarray], input_name: str = "images") -> dict:
    """INT8 Q/DQ copy of the float ONNX file ``src``, calibrated on ``batches`` (float32 network inputs).

    TensorRT's explicit quantization wants symmetric ranges (zero points 0), int8 weights per output channel and
    float biases. Only the inputs of convolutions and matrix products are quantized: everything else stays float,
    the detector's box decoding included. MinMax ranges: on the bundled detector
    they kept more AP than entropy or percentile ranges (weights/README.md). ``src``'s metadata is carried over.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches, self.images = iter(batches), 0

        def get_next(self):
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.images += len(batch)
            return {input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    reader = Batches()
    t0 = time.perf_counter()
    with atomic_path(dst) as tmp:
        quantize_static(str(src), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv", "MatMul"],
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "QuantizeBias": False,
                                       # Q/DQ at the inputs of convolutions only, where TensorRT wants them
                                       "OpTypesToExcludeOutputQuantization": ["Conv", "MatMul"]})
        if not reader.images:
            raise BadInput(None, "INT8 calibration got no images")
        proto, source = onnx.load(str(tmp)), onnx.load(str(src), load_external_data=False)
        del proto.metadata_props[:]
        proto.metadata_props.extend(source.metadata_props)
        onnx.save(proto, str(tmp))
    seconds = time.perf_counter() - t0
    logger.info("INT8 Q/DQ model calibrated on %d images in %.1f s: %s", reader.images, seconds, dst)
    return {"calibration_images": reader.images, "calibration_s": round(seconds, 1)}


def _network_flags(trt) -> int:
    major = int(trt.__version__.split(".")[0])
    if major < MIN_MAJOR:
        raise BadInput(None, f"TensorRT {trt.__version__} is too old: these engines need TensorRT {MIN_MAJOR} or newer")
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    # 10.x needs the flag to keep the file's types; 11 is always strongly typed and deprecates it
    return 1 << int(strongly_typed) if strongly_typed is not None and major < 11 else 0


def build_engine(onnx_path, out, min_shape: tuple, opt_shape: tuple, max_shape: tuple, workspace_gb: float = 4.0,
                 device: str = "0", precision: str = "fp16") -> dict:
    """Serialize a strongly typed engine for ``onnx_path`` on this machine's GPU (atomically, to ``out``).
    ``precision`` is the file's; for fp32, TensorRT's default TF32 (10-bit mantissa) convolutions and matrix
    products are turned off."""
    require(onnx_path)
    import tensorrt as trt
    import torch
    torch.cuda.set_device(cuda_device(device, onnx_path))  # TensorRT builds on the current device
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BadInput(onnx_path, f"TensorRT could not parse the ONNX file: {shorten(errors, 300)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, tuple(min_shape), tuple(opt_shape), tuple(max_shape))
    config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BadInput(onnx_path, "TensorRT engine build failed (see the TensorRT log above)")
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(bytes(serialized))
    seconds = time.perf_counter() - t0
    logger.info("TensorRT %s engine built in %.1f s: %s", trt.__version__, seconds, out)
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(), "build_s": round(seconds, 1)}


class EngineRunner:
    """A serialized engine on one GPU: a float32 numpy batch in, float32 numpy out, in chunks of the engine's
    largest batch."""

    name = "tensorrt"

    def __init__(self, path, device: str = "0"):
        path = Path(path)
        require(path, "; use the .onnx or .safetensors weights here")
        import tensorrt as trt
        import torch
        self.torch = torch
        self.device = cuda_device(device, path)
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # kept: it must outlive the engine
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise BadInput(path, "could not deserialize the TensorRT engine (built for another GPU or "
                                     "TensorRT version?)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        shape = self.engine.get_tensor_shape(self.input_name)
        self.fixed_imgsz = int(shape[2]) if shape[2] > 0 else None
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        io_types = [self.engine.get_tensor_dtype(n) for n in (self.input_name, self.output_name)]
        if any(t not in dtypes for t in io_types):
            raise BadInput(path, f"engine input/output types {io_types}: expected float32 or float16")
        self.input_dtype, self.output_dtype = (dtypes[t] for t in io_types)
        self.profile = [tuple(d) for d in self.engine.get_tensor_profile_shape(self.input_name, 0)] \
            if shape[0] < 0 else [tuple(shape)] * 3
        self.max_batch = int(self.profile[2][0])
        self.stream = torch.cuda.Stream(device=self.device)  # not the legacy default stream (extra syncs)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        outs = []
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for i in range(0, len(batch), self.max_batch):
                chunk = np.ascontiguousarray(batch[i:i + self.max_batch])
                x = torch.from_numpy(chunk).to(self.device, self.input_dtype)
                if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
                    raise BadInput(None, f"input of shape {tuple(x.shape)} is outside the engine's profile "
                                         f"(min {self.profile[0]}, max {self.profile[2]})")
                y = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                                device=self.device)
                self.context.set_tensor_address(self.input_name, x.data_ptr())
                self.context.set_tensor_address(self.output_name, y.data_ptr())
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError("TensorRT execution failed")
                self.stream.synchronize()
                outs.append(y.float().cpu().numpy())
        return np.concatenate(outs)
