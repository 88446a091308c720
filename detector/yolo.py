"""The one adapter to ultralytics (AGPL-3.0): nothing else in the project imports it.

Why an adapter: ultralytics reads environment variables and a per-user settings file at import time, pip-installs
missing packages, downloads fonts and ``yolo26n.pt`` (AMP check) and unpickles ``.pt`` files. Here it runs fully
offline from a project-owned config dir, never auto-installs, and loads checkpoints only through its restricted
``weights_only=True`` path (``ULTRALYTICS_SAFE_LOAD``). The rest of the project sees plain ``nn.Module``s, our
safetensors format and the neutral ``detector.Detector`` API, so a permissively licensed detector stays swappable.
Licence note: distributing or serving a system that includes ultralytics brings AGPL-3.0 obligations (or needs an
Ultralytics Enterprise licence).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from textwrap import shorten
from typing import Any, Callable

from lpr4m.errors import BadInput
from lpr4m.io import cache_root, sha256_file  # noqa: F401 (sha256_file re-exported: detector code calls it here)

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
_READY = False


def _find_font() -> Path | None:
    try:
        import matplotlib
        ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return ttf if ttf.is_file() else None
    except ImportError:  # pragma: no cover - matplotlib is an ultralytics dependency
        return None


def _prepare_environment() -> Path:
    """Set the variables ultralytics reads at import time and stock its config dir with fonts (no downloads)."""
    config_dir = cache_root() / "ultralytics-config"
    user_dir = config_dir / "Ultralytics"  # ultralytics appends this sub dir to YOLO_CONFIG_DIR
    user_dir.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ["YOLO_OFFLINE"] = "1"  # is_online() -> False without a DNS probe
    os.environ["YOLO_AUTOINSTALL"] = "false"  # env_bool: never pip/apt install at runtime
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "1"  # checkpoints load with weights_only=True + known-class allow-list
    os.environ["ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS"] = "1"
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations' own update check phones home
    os.environ.setdefault("YOLO_VERBOSE", "True")
    font = _find_font()
    if font is not None:
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):  # check_font() looks here first, then downloads
            target = user_dir / name
            if not target.exists():
                with contextlib.suppress(OSError):
                    shutil.copyfile(font, target)
    return config_dir


def ul():
    """Import ultralytics after making it offline and project-local; returns the ``ultralytics`` module."""
    global _READY
    if not _READY:
        _prepare_environment()
        with contextlib.redirect_stdout(sys.stderr):  # its first-run "Creating new Ultralytics Settings" banner
            import ultralytics
        from ultralytics.utils import SETTINGS, patches
        # ultralytics replaces PIL's Image.open process-wide with one that, on an unreadable image, tries to
        # install and import pi-heif; mark that done so corrupt frames stay a plain UnidentifiedImageError
        patches._pil_plugins_registered = True
        _never_rewrite_frames()
        # our commands print their JSON result on stdout: ultralytics' log lines go to stderr instead
        for handler in logging.getLogger("ultralytics").handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stdout:
                handler.setStream(sys.stderr)
        wanted = {"datasets_dir": str(cache_root() / "detector-data"), "runs_dir": str(REPO_ROOT / "runs"),
                  "weights_dir": str(cache_root() / "ultralytics-weights"), "sync": False, "clearml": False,
                  "comet": False, "dvc": False, "mlflow": False, "raytune": False, "tensorboard": False,
                  "wandb": False, "vscode_msg": False, "openvino_msg": False}
        if any(SETTINGS.get(k) != v for k, v in wanted.items()):
            SETTINGS.update(wanted)
        _register_backbones()
        _READY = True
        return ultralytics
    import ultralytics
    return ultralytics


def _never_rewrite_frames() -> None:
    """ultralytics' label scan re-encodes a JPEG without its end marker in place: through the dataset cache's links,
    that is the user's own frame. Such a frame (changed since the cache was built, which checked it) is skipped as
    corrupt instead; the scan's log names it."""
    from ultralytics.data import utils

    from lpr4m.images import frame_problem
    check_image = utils.check_image

    def check_image_read_only(im_file):
        problem = frame_problem(im_file)
        if problem:
            raise AssertionError(f"{problem[1]} (left unchanged: a dataset frame)")
        return check_image(im_file)

    utils.check_image = check_image_read_only


def _register_backbones() -> None:
    """Make our pretrained backbones nameable in model YAMLs (importing them also allow-lists them for the safe
    weights_only loader)."""
    from ultralytics.nn import tasks

    from detector import backbones
    tasks.EfficientNetLite = backbones.EfficientNetLite  # parse_model looks layer names up in tasks' globals


def version() -> str:
    return ul().__version__


_TRAINER = None


def detection_trainer():
    """ultralytics' detection trainer as ``detector.yolo.DetectionTrainer``.

    ultralytics' multi-GPU launch pickles the trainer's class into a file that fresh worker processes load. With
    this subclass named there, every worker imports this module and calls ``ul()`` first, which registers our
    layers: the workers can then parse a model YAML that names them and read a checkpoint holding them with the
    safe loader (a resumed run). Built on first use, so importing this module does not import ultralytics.
    """
    global _TRAINER
    if _TRAINER is None:
        ul()
        from ultralytics.models.yolo.detect import DetectionTrainer
        _TRAINER = type("DetectionTrainer", (DetectionTrainer,), {"__module__": __name__,
                                                                  "__qualname__": "DetectionTrainer",
                                                                  "save_model": _save_model_atomically,
                                                                  "_setup_train": _setup_train_on_all_cores})
    return _TRAINER


def _setup_train_on_all_cores(trainer) -> None:
    """ultralytics sets torch's CPU threads to its data-loading pool size, cores - 1 (one thread on a 2-core
    machine, where CPU training loads data in the training process anyway): train on every core we may use."""
    detection_trainer().__bases__[0]._setup_train(trainer)
    if trainer.device.type == "cpu":
        import torch
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def _save_model_atomically(trainer) -> None:
    """ultralytics rewrites ``last.pt`` / ``best.pt`` in place, so a kill during the write leaves a truncated file
    and no run to resume: write both to temp files beside them and rename each into place."""
    final = trainer.last, trainer.best
    temps = [p.with_name(f".{p.name}.partial") for p in final]
    trainer.last, trainer.best = temps
    try:
        detection_trainer().__bases__[0].save_model(trainer)  # ultralytics' own
    finally:
        trainer.last, trainer.best = final
    for tmp, path in zip(temps, final):
        if tmp.exists():
            os.replace(tmp, path)


def __getattr__(name: str):
    if name == "DetectionTrainer":  # the name a worker unpickles
        return detection_trainer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- models -----------------------------------------------------------------------------------------------------
PROJECT_MODELS = Path(__file__).resolve().parent / "models"  # our model YAMLs (yolo11-lite0.yaml)


def resolve_model_yaml(name: str) -> str:
    """A model YAML name as ultralytics can open it: our own YAMLs by bare name, anything else unchanged."""
    ours = PROJECT_MODELS / str(name)
    return str(ours) if not Path(name).exists() and ours.is_file() else str(name)


def _project_backbone_layers(desc: dict):
    for i, (_, _, module, args) in enumerate(desc.get("backbone", []) + desc.get("head", [])):
        if module == "EfficientNetLite":
            yield i, args


def frozen_layers(desc: dict) -> list[str]:
    """ultralytics ``freeze`` names for the frozen prefix of our pretrained backbones: the trainer then leaves
    them frozen (instead of warning and unfreezing them) and keeps their BatchNorm layers in eval mode."""
    from detector.backbones import EfficientNetLite
    names = []
    for i, args in _project_backbone_layers(desc):
        n = args[2] if len(args) > 2 else EfficientNetLite.DEFAULT_FROZEN_BLOCKS
        if n > 0:
            names += [f"{i}.stem"] + [f"{i}.blocks.{b}" for b in range(n)]
    return names


def model_yaml(name_or_dict: str | dict, nc: int = 1) -> dict:
    """The full model description (dict) for a YAML name such as ``yolo11n.yaml`` or a YAML path."""
    ul()
    if isinstance(name_or_dict, dict):
        d = dict(name_or_dict)
    else:
        from ultralytics.nn.tasks import yaml_model_load
        if Path(name_or_dict).suffix.lower() not in (".yaml", ".yml"):
            raise BadInput(name_or_dict, "expected a model YAML such as yolo11n.yaml or yolo11-lite0.yaml")
        try:
            d = yaml_model_load(resolve_model_yaml(name_or_dict))
        except (FileNotFoundError, OSError) as e:
            raise BadInput(name_or_dict, f"unknown model YAML ({e.__class__.__name__}); expected e.g. yolo11n.yaml"
                           ) from None
    d["nc"] = nc
    d.pop("yaml_file", None)
    return d


def build_model(yaml: dict, nc: int = 1, names: list[str] | None = None, source=None):
    """An untrained ``DetectionModel`` from a model description (no weights, no downloads). ``source`` (the config
    file the description came from) is named when the description cannot be built: ultralytics' restricted mode
    refuses unknown layers and any ``activation`` it would otherwise ``eval``."""
    ul()
    from ultralytics.nn.tasks import DetectionModel

    from detector.backbones import no_imagenet_weights
    try:
        with no_imagenet_weights():
            model = DetectionModel(dict(yaml), ch=3, nc=nc, verbose=False)
    except (TypeError, KeyError, ValueError, IndexError, AssertionError) as e:
        reason = " ".join(str(e).replace("ERROR ❌️ ", "").split())[:300]
        raise BadInput(source, f"model_yaml cannot be built ({type(e).__name__}: {reason})") from None
    model.names = {i: n for i, n in enumerate(names or ["product"])}
    return model


def state_dict_for_saving(model, half: bool = True) -> dict:
    """A plain tensor dict (fp16 floats keep the default weights small; ints such as BN counters stay exact)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous().clone()
        if half and v.is_floating_point():
            v = v.half()
        out[k] = v
    return out


def load_state(model, state: dict, path) -> None:
    """Load a tensor dict into ``model``, refusing any missing, extra or mis-shaped tensor with one clear line."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad_shape:
        raise BadInput(path, f"weights do not fit the model in its config ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected, {len(bad_shape)} mis-shaped tensors; "
                             f"e.g. {(missing + unexpected + bad_shape)[:2]})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    model.float()


def inference_model(model):
    """Fused, eval-mode, fp32 model whose forward returns the raw head output ``(B, 4 + nc, anchors)``."""
    import torch

    class _Raw(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            y = self.m(x)
            return y[0] if isinstance(y, (tuple, list)) else y

    from detector.backbones import EfficientNetLite
    model = model.float().eval()
    with contextlib.suppress(Exception):
        model = model.fuse(verbose=False)
    for m in model.modules():
        if isinstance(m, EfficientNetLite):
            m.fuse()
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.model[-1]
    if getattr(head, "end2end", False):
        raise BadInput(None, "end-to-end (NMS-free) heads are not supported; use a yolov8/yolo11 model YAML")
    if isinstance(getattr(head, "dfl", None), ul().nn.modules.block.DFL):
        head.dfl = _expected_distance(head.dfl)
    return _Raw(model).eval()


def _expected_distance(dfl):
    """ultralytics' ``DFL`` (softmax over the distance bins, then their expectation by a 1x1 conv) computed along
    the bins' own axis, without the transpose. Same numbers (within 1e-5 px); in ONNX Runtime the head's softmax
    over a middle axis was the single slowest node (9% of the network at 320 px): 2.1 -> 0.13 ms/frame."""
    import torch

    class ExpectedDistance(torch.nn.Module):
        def __init__(self, bins: torch.Tensor):
            super().__init__()
            self.register_buffer("bins", bins.reshape(1, 1, -1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, _, a = x.shape
            x = x.view(b, 4, self.bins.shape[2], a)
            e = (x - x.amax(2, keepdim=True)).exp()
            return (e * self.bins).sum(2) / e.sum(2)

    return ExpectedDistance(dfl.conv.weight.detach().reshape(-1).clone())


def load_ultralytics_checkpoint(path, trust_pickle: bool = False):
    """A ``DetectionModel`` from an ultralytics ``.pt`` checkpoint.

    First tries ultralytics' restricted ``weights_only=True`` load (known torch/ultralytics classes only). A file
    that needs full unpickling is refused unless the user trusts it: ``--trust-pickle``, or it is a checkpoint this
    user's own training wrote (its sha256 in the project cache's ``trusted-checkpoints.json``; never a file beside
    the weights, which whoever hands over a checkpoint could hand over too).
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(path, "weights file not found")
    _check_zip(path)
    ul()
    from ultralytics.nn.tasks import load_checkpoint
    try:
        model, _ = load_checkpoint(str(path))
    except Exception as safe_err:  # noqa: BLE001 - any refusal of the restricted loader
        if _loads_safely(path):  # no unpickling needed: just not what ultralytics saves
            raise BadInput(path, "not an ultralytics checkpoint (no model in it; a bare state dict?)") from None
        if not (trust_pickle or is_trusted(path)):
            raise BadInput(path, "this .pt checkpoint needs full unpickling, which can run arbitrary code; refused "
                                 f"({type(safe_err).__name__}). If you trust its source, pass --trust-pickle") from None
        logger.warning("unpickling %s (trusted by %s)", path, "--trust-pickle" if trust_pickle else
                       "this machine's own training, which wrote it")
        from ultralytics.nn import tasks
        try:
            with _unsafe_loading(tasks):
                model, _ = load_checkpoint(str(path))
        except Exception as e:  # noqa: BLE001
            raise BadInput(path, f"not an ultralytics checkpoint ({type(e).__name__}: {shorten(str(e), 160)})") \
                from None
    from ultralytics.nn.tasks import DetectionModel
    if not isinstance(model, DetectionModel) or type(model).__name__ != "DetectionModel":
        raise BadInput(path, f"expected an ultralytics detection checkpoint, got a {type(model).__name__}")
    return model.float()


def _loads_safely(path: Path) -> bool:
    import torch
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any refusal of torch's restricted loader
        return False
    return True


@contextlib.contextmanager
def _unsafe_loading(tasks):
    old = tasks.SAFE_LOAD
    tasks.SAFE_LOAD = False
    try:
        yield
    finally:
        tasks.SAFE_LOAD = old


def resumable(path) -> bool:
    """Whether a checkpoint still holds the epoch and optimizer state (finished runs are stripped of them)."""
    ul()
    from ultralytics.nn.tasks import torch_safe_load
    _check_zip(Path(path))
    try:
        ckpt, _ = torch_safe_load(str(path), safe_only=True)
    except Exception as e:  # noqa: BLE001
        raise BadInput(path, f"unreadable training checkpoint ({type(e).__name__})") from None
    return isinstance(ckpt, dict) and ckpt.get("epoch", -1) >= 0 and ckpt.get("optimizer") is not None


def _check_zip(path: Path) -> None:
    import zipfile
    if not zipfile.is_zipfile(path):
        raise BadInput(path, "not a PyTorch checkpoint (expected a torch.save zip archive, e.g. an ultralytics .pt)")


def _trust_table() -> Path:
    """The checkpoints this user's own training wrote, by sha256: in the project cache, never beside the weights,
    so no file that travels with a checkpoint can vouch for it."""
    from lpr4m.io import cache_root
    return cache_root() / "trusted-checkpoints.json"


def is_trusted(path) -> bool:
    from lpr4m.io import read_json
    table_file = _trust_table()
    try:
        table = read_json(table_file, expect=dict) if table_file.is_file() else {}
    except BadInput:
        return False
    return sha256_file(path) in table


def record_trusted(path) -> None:
    """Record the sha256 of a checkpoint we wrote ourselves, so resuming it may unpickle it."""
    from lpr4m.io import exclusive, read_json, write_json
    table_file = _trust_table()
    table_file.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(table_file.with_name(table_file.name + ".lock"), "the trusted-checkpoint table"):
        try:
            table = read_json(table_file, expect=dict) if table_file.is_file() else {}
        except BadInput:
            table = {}
        table[sha256_file(path)] = str(Path(path).resolve())
        write_json(table_file, table)


def save_ultralytics_checkpoint(model, path) -> None:
    """Write a model as an ultralytics checkpoint (model only), the form its trainer loads as starting weights."""
    import copy
    import torch
    from lpr4m.io import atomic_path
    ckpt = {"model": copy.deepcopy(model).float(), "train_args": {}, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "version": version()}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    record_trusted(path)


# -- training and validation ----------------------------------------------------------------------------------
def train(model: str, data_yaml: Path, project: Path, name: str, overrides: dict[str, Any],
          callbacks: dict[str, list[Callable]] | None = None, resume: Path | None = None) -> Path:
    """Run ultralytics' trainer; returns the run folder (weights/last.pt, best.pt, args.yaml, results.csv)."""
    ul()
    from ultralytics import YOLO
    if resume is not None:
        yolo = YOLO(str(resume), task="detect")
        # the checkpoint names the folder it was written in: a copied or moved run must go on where it is now
        args = {"resume": True, "save_dir": str(Path(resume).resolve().parent.parent)}
        if str(data_yaml) not in ("", "."):
            args["data"] = str(data_yaml)
        args.update({k: v for k, v in overrides.items() if k in ("device", "batch", "workers")})
    else:
        yolo = YOLO(model, task="detect")
        # an absolute project: ultralytics would put a relative one under its own runs_dir/<task>/
        args = {"plots": False, "exist_ok": False, **overrides, "data": str(data_yaml),
                "project": str(Path(project).resolve()), "name": name}
    for event, fns in (callbacks or {}).items():
        for fn in fns:
            yolo.add_callback(event, fn)
    with contextlib.redirect_stdout(sys.stderr):  # progress bars and prints: keep stdout for our JSON
        yolo.train(**args, trainer=detection_trainer())
    return Path(yolo.trainer.save_dir)


def ultralytics_val(model, data_yaml: Path, imgsz: int, batch: int = 8, device: str = "cpu",
                    conf: float = 0.001, iou: float = 0.7) -> dict[str, float]:
    """Ultralytics' own validation on the ``val`` split (rect=False) -- the independent reference for our AP."""
    ul()
    from ultralytics.models.yolo.detect import DetectionValidator
    args = dict(data=str(data_yaml), imgsz=imgsz, batch=batch, device=device, conf=conf, iou=iou, rect=False,
                plots=False, save_json=False, verbose=False, workers=0, split="val", half=False)
    validator = DetectionValidator(args=args)
    with contextlib.redirect_stdout(sys.stderr):
        metrics = validator(model=model)
    return {"ap": float(metrics["metrics/mAP50-95(B)"]), "ap50": float(metrics["metrics/mAP50(B)"])}
