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

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        try:
            check_outputs_apart(self, namespace)
        except BadInput as err:
            self.error(str(err))
        return namespace, extras


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
        message = f"error: {err}"
    except OSError as err:
        if err.filename is None:
            raise
        message = f"error: {err.filename}: {err.strerror or type(err).__name__}"
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    # a file name that is not UTF-8 is shown escaped (\udcff), not raised again while printing
    print(message.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)
    return EXIT_BAD_INPUT


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


MAX_IMAGE_SIZE = 4096


def image_size(text: str) -> int:
    """argparse type for ``--imgsz``: a positive multiple of 32 (the stride of every YOLO model we build), at most
    ``MAX_IMAGE_SIZE``."""
    value = _number(int, text, 0, False, MAX_IMAGE_SIZE)
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


def onnx_session(path, options, providers: list):
    """An ONNX Runtime session. On the CPU alone, the optimised graph is cached on disk (keyed by the model
    file, ONNX Runtime's version and this CPU, since the NCHWc layouts it picks are machine-specific), so later
    processes skip graph optimisation: a tenth to a quarter of a second of start-up per model."""
    import hashlib
    import platform

    import onnxruntime as ort

    from lpr4m.io import cache_root
    path = Path(path)
    if any(p != "CPUExecutionProvider" for p in providers) or options.optimized_model_filepath:
        return ort.InferenceSession(str(path), options, providers=providers)
    st = path.stat()
    cpu = ""
    try:
        cpu = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    key = hashlib.sha256("|".join(map(str, (path.resolve(), st.st_size, st.st_mtime_ns, st.st_ino, ort.__version__,
                                                platform.machine(), cpu, int(options.graph_optimization_level))))
                         .encode()).hexdigest()[:24]
    cached = cache_root() / "onnxruntime-graphs" / f"{key}.onnx"
    if cached.is_file():
        level = options.graph_optimization_level
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(cached), options, providers=providers)
        except Exception as e:  # noqa: BLE001 - a damaged cache entry: rebuild it
            logger.warning("ignoring the cached ONNX graph %s (%s)", cached, str(e)[:120])
            cached.unlink(missing_ok=True)
        finally:
            options.graph_optimization_level = level
    if b"DequantizeLinear" in path.read_bytes():  # a saved optimised INT8 (QDQ) graph reloads wrong: no entry
        return ort.InferenceSession(str(path), options, providers=providers)
    tmp = cached.with_name(f".{key}.{os.getpid()}.partial")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        options.optimized_model_filepath = str(tmp)
        severity, options.log_severity_level = options.log_severity_level, 3  # not its "machine-specific" note
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        finally:
            options.log_severity_level = severity
        os.replace(tmp, cached)
        return session
    except OSError as e:  # a read-only cache must not stop inference
        logger.debug("could not cache the ONNX graph of %s (%s)", path, e)
        return ort.InferenceSession(str(path), options, providers=providers)
    finally:
        options.optimized_model_filepath = ""
        tmp.unlink(missing_ok=True)


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


def output_folder(text: str) -> str:
    """argparse type for a folder a command makes as a whole (a dataset, an index): as ``output_dir``, and no other
    output may be written inside it."""
    return output_dir(text)


def _paths(value) -> list[Path]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [Path(v) for v in values if isinstance(v, (str, os.PathLike)) and str(v) not in ("", "-")]


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long, a NUL byte: not a file of ours
        return False


def check_outputs_apart(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any work, an output that would replace an input (the clip, the weights or their config, a
    file of a dataset), a new dataset or index inside an input folder (read back as input next time), two outputs
    on one file, and an output inside a folder another output makes whole."""
    files, folders, inputs = [], [], []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        kind = {output_file: files, output_dir: files, output_folder: folders}.get(action.type, inputs)
        name = action.option_strings[-1] if action.option_strings else action.dest.upper()
        kind += [(name, p.resolve()) for p in _paths(value) if kind is not inputs or _exists(p)]
    for name, p in list(inputs):
        if p.is_file():  # a weights file's config travels beside it
            inputs += [(name, q) for q in (p.with_suffix(".json"), p.with_name(p.name + ".json")) if q.is_file()]
    for name, out in files + folders:
        for in_name, inp in inputs:
            if out == inp:
                raise BadInput(out, f"{name} would overwrite the input of {in_name}; pick another path")
            if inp.is_dir() and inp in out.parents and (_exists(out) or (name, out) in folders):
                raise BadInput(out, f"{name} lies inside the input folder {inp} ({in_name}); pick a path outside it")
    for i, (name, out) in enumerate(files + folders):
        for other_name, other in (files + folders)[i + 1:]:
            if out == other:
                raise BadInput(out, f"{name} and {other_name} name the same path")
    for folder_name, folder in folders:
        for name, out in files + folders:
            if folder in out.parents:
                raise BadInput(out, f"{name} lies inside {folder}, which {folder_name} writes as a whole")


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The command as a user would type it again (``made_by`` of weights and datasets); ``argv`` defaults to this
    process's arguments."""
    import shlex
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


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
