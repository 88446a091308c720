"""What every command shares: offline environment, logging, and "bad input -> one line, exit 2"."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from lpr4m.errors import BadInput

EXIT_BAD_INPUT = 2
logger = logging.getLogger(__name__)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except a None one (whose help says what happens without it)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``error: what was wrong (see PROG --help)``) instead of its usage block,
    and every option's default in ``--help`` (unless a command picks another formatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call a CLI ``main``; a BadInput, or a file the OS refuses (an output path that is a folder, a missing
    parent, no permission), becomes ``error: FILE[:LINE]: ...`` and exit 2."""
    try:
        return main(argv) or 0
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        if err.filename is None:
            raise
        print(f"error: {err.filename}: {err.strerror or type(err).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def parse_ks(text: str) -> tuple[int, ...]:
    """argparse type for ``--ks 1,5,10``."""
    try:
        ks = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError("k values must be >= 1")
    return ks


def _number(kind, text: str, low: float, low_ok: bool, high: float | None = None):
    import math
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if value < low or (value == low and not low_ok) or (high is not None and value > high):
        bound = f">= {low}" if low_ok else f"> {low}"
        raise argparse.ArgumentTypeError(f"expected a number {bound}" + (f" and <= {high}" if high is not None else "")
                                         + f", got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (batch sizes, epochs, counts)."""
    return _number(int, text, 1, True)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0 (workers, patience, optional limits where 0 has a documented meaning)."""
    return _number(int, text, 0, True)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (rates, temperatures, hours)."""
    return _number(float, text, 0.0, False)


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(float, text, 0.0, True)


def fraction(text: str) -> float:
    """argparse type: a finite number in [0, 1] (score and IoU thresholds)."""
    return _number(float, text, 0.0, True, 1.0)


def image_size(text: str) -> int:
    """argparse type for ``--imgsz``: a positive multiple of 32 (the stride of every YOLO model we build)."""
    value = positive_int(text)
    if value % 32:
        raise argparse.ArgumentTypeError(f"expected a multiple of 32 (the model stride), got {value}")
    return value


DEVICE_SYNTAX = re.compile(r"^(auto|cpu|mps|cuda|cuda:\d+|\d+(,\d+)*)$")


def device_arg(text: str) -> str:
    """argparse type for ``--device``: auto, cpu, mps, cuda, cuda:N, N or N,N,... (GPU ids). Whether a GPU is
    there is checked where the device is used (``torch_device``), so parsing never imports torch."""
    text = text.strip().lower()
    if not DEVICE_SYNTAX.match(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N, N or N,N,... (GPU ids), got {text!r}")
    return text


def torch_device(text: str, several: bool = False) -> str:
    """A torch device string for ``--device`` text, refusing a GPU this machine does not have (one line, not
    torch's "Found no NVIDIA driver" traceback). ``several``: a GPU list ``0,1,...`` (multi-GPU training) is
    allowed and returned as given."""
    import torch
    text = str(text).strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    asked = text
    if text.isdigit():
        text = f"cuda:{text}"
    if text == "cpu":
        return text
    if text == "mps":
        if not torch.backends.mps.is_available():
            raise BadInput(None, "--device mps: this torch has no Apple-silicon (MPS) device here")
        return text
    if re.match(r"^\d+(,\d+)+$", text):
        if not several:
            raise BadInput(None, f"--device {text}: this command runs on one device (e.g. --device 0)")
        ids = [int(i) for i in text.split(",")]
    elif re.match(r"^cuda(:\d+)?$", text):
        ids = [int(text.split(":")[1]) if ":" in text else 0]
    else:
        raise BadInput(None, f"--device {text!r}: expected auto, cpu, cuda, cuda:N or a GPU id")
    if not torch.cuda.is_available():
        raise BadInput(None, f"--device {asked}: torch sees no CUDA GPU on this machine (use --device cpu)")
    if max(ids) >= torch.cuda.device_count():
        raise BadInput(None, f"--device {asked}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return text


def run_name(text: str) -> str:
    """A run folder's name suffix: a plain name, refused before any work (not after the dataset step)."""
    from lpr4m.ids import check_safe_name
    try:
        return check_safe_name(text, "run name")
    except BadInput as err:
        raise argparse.ArgumentTypeError(str(err)) from None


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")  # ONNX Runtime's, in order of preference


def onnx_providers(device: str = "cpu", cpu_fallback: bool = False) -> list:
    """ONNX Runtime's TensorRT / CUDA execution providers on the asked GPU (``cuda:N`` / ``N``: that device), then
    its CPU's. A GPU this ONNX Runtime cannot use is refused in one line (as the torch path refuses a missing GPU),
    unless ``cpu_fallback`` or ``auto``. TensorRT's engines are cached: it would otherwise rebuild them, for
    minutes, at every session."""
    import onnxruntime as ort  # here, not at the top: commands that never touch ONNX need not import it

    from lpr4m.io import cache_root
    available = ort.get_available_providers()
    text = str(device).strip().lower()
    chosen = []
    if text != "cpu":
        index = int(text.rsplit(":", 1)[1]) if re.match(r"^cuda:\d+$", text) else int(text) if text.isdigit() else 0
        tensorrt_cache = {"trt_engine_cache_enable": True,
                          "trt_engine_cache_path": str(cache_root() / "onnxruntime-tensorrt")}
        chosen = [(p, {"device_id": index, **(tensorrt_cache if p == "TensorrtExecutionProvider" else {})})
                  for p in GPU_PROVIDERS if p in available]
        if not chosen and text != "auto":
            why = (f"--device {device}: this ONNX Runtime has no CUDA/TensorRT provider (has {', '.join(available)});"
                   " use --device cpu, or ./setup.sh --gpu")
            if not cpu_fallback:
                raise BadInput(None, why)
            logger.warning("%s; ONNX Runtime runs on the CPU", why)
    return chosen + ["CPUExecutionProvider"]


def output_file(text: str) -> str:
    """argparse type for ``--out FILE``: refused before any work when it names a folder or sits under a file."""

    from lpr4m.io import check_output_file
    try:
        check_output_file(text)
    except BadInput as err:
        raise argparse.ArgumentTypeError(err.message) from None
    return text


def output_dir(text: str) -> str:
    """argparse type for an output folder (``--save-json DIR``): refused before any work when it is a file or sits
    under one."""
    from lpr4m.io import check_output_file
    try:
        check_output_file(Path(text) / "_")  # as the parent of a file written there
    except BadInput as err:
        raise argparse.ArgumentTypeError(err.message.replace("cannot create it: ", "")) from None
    return text


def emit_json(result: Any, out: str | None = None) -> None:
    """The JSON result of a command: to ``--out FILE`` (atomically) or to stdout."""
    if out:
        from lpr4m.io import write_json
        write_json(out, result)
    else:
        json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        sys.stdout.flush()


def progress(iterable=None, **kw):
    """tqdm that stays quiet when stderr is not a terminal (CI logs, pipes) unless LPR_PROGRESS=1."""
    from tqdm.auto import tqdm
    kw.setdefault("disable", not (sys.stderr.isatty() or os.environ.get("LPR_PROGRESS") == "1"))
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)
