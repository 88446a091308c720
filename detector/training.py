"""``python detector/train.py --data ROOT``: build the cached YOLO dataset, train offline, keep a run folder.

A run folder ``runs/detector/<YYYYmmdd-HHMMSS>-<name>/`` holds ultralytics' ``weights/{last,best}.pt`` (their
sha256 recorded in the project cache, so a resume may unpickle them), ``args.yaml``, ``results.csv`` (one row per
epoch), our ``config.json`` and ``metrics.json``, and the published form ``weights/detector.safetensors`` +
``weights/detector.json``. ``--data`` takes several roots (one ``data.yaml`` in the run folder lists them all).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from lpr4m.cli import (Parser, command_line, device_arg, emit_json, image_size, nonnegative_float, nonnegative_int,
                       output_file, positive_float, positive_int, run_name, setup_logging, torch_device)
from lpr4m.errors import BadInput, Problems
from lpr4m.io import read_json, write_json
from lpr4m.layout import Dataset

logger = logging.getLogger(__name__)

# Presets: "cpu" is sized for a demo dataset on a laptop (<= 15 min on 2 cores); "gpu" for LPR4M on GPUs.
PRESETS: dict[str, dict] = {
    "cpu": dict(model="yolo11-lite0.yaml", epochs=12, imgsz=256, batch=16, device="cpu", workers=2, patience=100,
                close_mosaic=0, cache="ram", warmup_epochs=1.0, frames_per_clip=3, hours=0.22, val=False),
    "gpu": dict(model="yolo11s.yaml", epochs=60, imgsz=640, batch=64, device="0", workers=8, patience=20,
                close_mosaic=10, cache=False, warmup_epochs=3.0, frames_per_clip=None, hours=None, val=True),
    "tiny": dict(model="yolo11n.yaml", epochs=2, imgsz=128, batch=8, device="cpu", workers=0, patience=100,
                 close_mosaic=0, cache=False, warmup_epochs=0.0, frames_per_clip=None, hours=None, val=True),
}
# Further ultralytics training arguments per preset (optimizer, augmentation); recorded in the run's config.json.
# cpu: a from-scratch run of a few hundred batches needs every batch to be an optimizer step (nbs = batch; the
# default nbs=64 accumulates 4 batches per step) and plain frames (mosaic off converges faster in short runs).
HYP: dict[str, dict] = {"cpu": dict(nbs="batch", mosaic=0.0), "gpu": {}, "tiny": {}}
KNOBS = ("model", "epochs", "imgsz", "batch", "device", "workers", "patience", "close_mosaic", "cache", "warmup_epochs",
         "frames_per_clip", "hours")
LOG_EVERY = 20  # batches between training log lines
RESUME_FLAGS = ("resume", "runs_dir", "device", "batch", "workers", "out", "verbose", "data")  # data: checked


def _batch_size(text: str) -> int:
    return -1 if text.strip() == "-1" else positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python detector/train.py", description=__doc__.split("\n\n")[0])
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", help="LPR4M dataset root(s): boxed training clips + test_frameid2gtbox for "
                                             "validation; several roots train on all of them (e.g. the synthetic "
                                             "mini and catalogue composites)")
    d.add_argument("--cache-dir", help="where the YOLO dataset view is cached (default $LPR_CACHE_DIR or "
                                       "~/.cache/lpr/detector-data)")
    d.add_argument("--rebuild-cache", action="store_true", help="rebuild the dataset view even if cached")
    d.add_argument("--frames-per-clip", type=positive_int,
                   help="keep N evenly spaced training frames per clip (default: all)")
    d.add_argument("--strict", action="store_true", help="stop at the first bad row or missing frame")
    m = p.add_argument_group("model and schedule (flags override the preset)")
    m.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    m.add_argument("--model", help="model YAML (ours: yolo11-lite0.yaml; ultralytics: yolo11n.yaml, ...), our "
                                   ".safetensors, or an ultralytics .pt to fine-tune")
    m.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling a --model .pt that the restricted loader refuses (runs code in the file!)")
    m.add_argument("--epochs", type=positive_int,
                   help="train exactly N epochs: drops the preset's time budget unless --hours is given too")
    m.add_argument("--imgsz", type=image_size)
    m.add_argument("--batch", type=_batch_size, help="images per batch; -1: ultralytics' AutoBatch (GPU)")
    m.add_argument("--device", type=device_arg, help="cpu, 0, or 0,1,2,3 for multi-GPU (ultralytics DDP)")
    m.add_argument("--workers", type=nonnegative_int)
    m.add_argument("--patience", type=nonnegative_int, help="epochs without improvement before stopping (0: never)")
    m.add_argument("--warmup-epochs", type=nonnegative_float)
    m.add_argument("--hours", type=positive_float,
                   help="wall-time budget: ultralytics fits the epochs into it (overrides --epochs); the cpu "
                        "preset uses 0.22 h")
    m.add_argument("--seed", type=nonnegative_int, default=0)
    m.add_argument("--no-amp", action="store_true",
                   help="train a GPU run in float32: offline, ultralytics skips its AMP self-check and keeps AMP on "
                        "(NaN losses or zero mAP on the few GPUs where half precision misbehaves)")
    o = p.add_argument_group("output")
    o.add_argument("--name", type=run_name, default="yolo", help="run name suffix (folder: <runs-dir>/<timestamp>-<name>)")
    o.add_argument("--runs-dir", default="runs/detector")
    o.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                   help="continue an interrupted run (default: the latest run in --runs-dir)")
    o.add_argument("--out", type=output_file, help="write the JSON result here instead of stdout")
    o.add_argument("-v", "--verbose", action="store_true")
    return p


def resolve_knobs(args: argparse.Namespace) -> dict:
    knobs = dict(PRESETS[args.preset])
    for k in KNOBS:
        v = getattr(args, k, None)
        if v is not None:
            knobs[k] = v
    if getattr(args, "epochs", None) is not None and getattr(args, "hours", None) is None:
        knobs["hours"] = None  # ultralytics' time budget would override the epochs the user asked for
    knobs["device"] = str(knobs["device"])
    knobs["hyp"] = dict(HYP.get(args.preset, {}))
    if knobs["hyp"].get("nbs") == "batch":  # one optimizer step per batch, whatever --batch says
        knobs["hyp"]["nbs"] = knobs["batch"]
    return knobs


def _new_run_dir(runs_dir: Path, name: str) -> Path:
    from lpr4m.ids import check_safe_name
    check_safe_name(name, "run name")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(100):
        run = runs_dir / (f"{stamp}-{name}" if i == 0 else f"{stamp}-{name}-{i}")
        try:
            run.mkdir(parents=True, exist_ok=False)
            return run
        except FileExistsError:
            continue
    raise BadInput(runs_dir, "could not create a new run folder")


def _latest_run(runs_dir: Path) -> Path:
    runs = sorted((p for p in runs_dir.glob("*/weights/last.pt")), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise BadInput(runs_dir, "no run with weights/last.pt to resume")
    return runs[-1].parent.parent


def resume_checkpoint(run_dir: Path) -> Path:
    """``weights/last.pt``, or ``best.pt`` when ``last.pt`` is unreadable (a run killed while an older version wrote
    it) and ``best.pt`` can still be resumed; says which."""
    from detector import yolo
    last, best = run_dir / "weights" / "last.pt", run_dir / "weights" / "best.pt"
    if not last.is_file():
        raise BadInput(run_dir, "not a resumable run (weights/last.pt missing)")
    try:
        if yolo.resumable(last):
            return last
        finished = True
    except BadInput as err:
        finished, broken = False, err
    with contextlib.suppress(BadInput):
        if best.is_file() and yolo.resumable(best):
            logger.warning("%s: resuming from best.pt instead", broken if not finished else
                           f"{last}: holds no optimizer state")
            return best
    if finished:
        raise BadInput(last, "cannot resume: this run finished (its checkpoint holds no optimizer state); start a "
                             "new run, e.g. with --model " + str(run_dir / "weights" / "detector.safetensors"))
    raise BadInput(last, f"cannot resume: {broken.message}, and no resumable best.pt beside it")


def _start_weights(model: str, run_dir: Path, trust_pickle: bool) -> tuple[str, dict]:
    """What ultralytics should build from, and the model description: a YAML name/path (ours resolved to a path);
    our or a user's weights re-saved as an ultralytics checkpoint in the run folder, which the restricted loader
    reads."""
    from detector import yolo
    from detector.infer import load_torch_model
    path = Path(model)
    if path.suffix in (".yaml", ".yml") or (not path.suffix and not path.exists()):
        desc = yolo.model_yaml(model)  # validates the name now, with a clear error
        start = yolo.resolve_model_yaml(model)
    elif path.suffix in (".safetensors", ".pt"):
        net, _ = load_torch_model(path, trust_pickle=trust_pickle)
        desc = net.yaml
        start = str(run_dir / "init" / "start.pt")
        yolo.save_ultralytics_checkpoint(net, start)
    else:
        raise BadInput(path, "--model must be a model YAML, our .safetensors weights or an ultralytics .pt")
    return start, desc


def _callbacks(run_record: dict | None, extra: dict | None) -> dict[str, list[Callable]]:
    """Our logging and checkpoint bookkeeping as ultralytics callbacks. They also run in multi-GPU workers, which
    receive them pickled; ``run_record`` (config.json) is written again there, because ultralytics' multi-GPU launch
    deletes the run folder before it starts the workers."""
    from detector import yolo
    state = {"t": time.time(), "seen": 0}

    def on_pretrain_routine_start(trainer):
        record = Path(trainer.save_dir) / "config.json"
        if run_record is not None and not record.is_file():
            write_json(record, run_record)

    def on_train_batch_end(trainer):
        bs = trainer.batch_size
        state["seen"] += bs
        n = getattr(trainer, "_lpr_batch", 0) + 1
        trainer._lpr_batch = n
        if n % LOG_EVERY == 0:
            dt = time.time() - state["t"]
            lr = trainer.optimizer.param_groups[0]["lr"] if trainer.optimizer else float("nan")
            loss = _total(trainer.tloss)
            logger.info("train: epoch %d step %d  loss %.4g  lr %.3g  %.1f img/s", trainer.epoch + 1, n, loss, lr,
                        state["seen"] / max(dt, 1e-9))

    def on_model_save(trainer):
        for f in (trainer.last, trainer.best):
            if Path(f).is_file():
                yolo.record_trusted(f)

    def on_fit_epoch_end(trainer):
        if trainer.epoch >= trainer.epochs:  # ultralytics' final validation of best.pt, not an epoch
            return
        m = trainer.metrics or {}
        if not trainer.args.val and trainer.epoch + 1 < trainer.epochs:
            logger.info("epoch %d/%d  loss %.4g (validation only after the last epoch: val=False)", trainer.epoch + 1,
                        trainer.epochs, _total(trainer.tloss))
            return
        logger.info("epoch %d/%d  mAP50 %.4f  mAP50-95 %.4f", trainer.epoch + 1, trainer.epochs,
                    m.get("metrics/mAP50(B)", float("nan")), m.get("metrics/mAP50-95(B)", float("nan")))

    cbs = {"on_pretrain_routine_start": [on_pretrain_routine_start], "on_train_batch_end": [on_train_batch_end],
           "on_model_save": [on_model_save], "on_fit_epoch_end": [on_fit_epoch_end]}
    for event, fns in (extra or {}).items():
        cbs.setdefault(event, []).extend(fns)
    return cbs


def _total(loss) -> float:
    """Sum of ultralytics' running loss items (a tensor, or a dict of them in recent versions)."""
    if loss is None:
        return float("nan")
    if isinstance(loss, dict):
        return float(sum(float(v.sum()) if hasattr(v, "sum") else float(v) for v in loss.values()))
    return float(loss.sum())


def publish_run(run_dir: Path, made_by: str, imgsz: int) -> dict:
    """Convert the run's best (else last) checkpoint to ``weights/detector.safetensors`` + ``detector.json``."""
    from detector import yolo
    from detector.infer import save_torch_model
    ckpt = run_dir / "weights" / "best.pt"
    if not ckpt.is_file():
        ckpt = run_dir / "weights" / "last.pt"
    for f in (run_dir / "weights" / "best.pt", run_dir / "weights" / "last.pt"):
        if f.is_file():  # ultralytics rewrote them (optimizer stripped) after the last on_model_save
            yolo.record_trusted(f)
    model = yolo.load_ultralytics_checkpoint(ckpt)
    metrics = _final_metrics(run_dir)
    out = run_dir / "weights" / "detector.safetensors"
    save_torch_model(model, out, imgsz=imgsz, made_by=made_by, source=str(run_dir), metrics=metrics)
    write_json(run_dir / "metrics.json", metrics)
    return {"weights": str(out), "config": str(out.with_suffix(".json")), "metrics": metrics}


def _final_metrics(run_dir: Path) -> dict:
    """The last row of ultralytics' results.csv (per-epoch metrics), as numbers."""
    import csv
    path = run_dir / "results.csv"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    out = {}
    for k, v in rows[-1].items():
        try:
            out[k.strip()] = float(v)
        except (TypeError, ValueError):
            pass
    # a resume after a kill that lost an epoch's checkpoint trains that epoch again, and ultralytics appends a row
    out["epochs_done"] = int(out.pop("epoch", len(rows)))
    return out


def ultralytics_overrides(knobs: dict, seed: int, amp: bool = True, freeze: list | None = None) -> dict:
    """The resolved knobs as ultralytics' train() arguments; mixed precision only on a GPU and unless refused."""
    return dict(epochs=knobs["epochs"], imgsz=knobs["imgsz"], batch=knobs["batch"], device=knobs["device"],
                workers=knobs["workers"], patience=knobs["patience"], close_mosaic=knobs["close_mosaic"],
                cache=knobs["cache"], warmup_epochs=knobs["warmup_epochs"], seed=seed, time=knobs["hours"],
                val=knobs["val"], amp=amp and knobs["device"] != "cpu", deterministic=False, plots=False,
                freeze=freeze or None, **knobs["hyp"])


def train(args: argparse.Namespace, callbacks: dict | None = None) -> dict:
    """The work behind ``main``; ``callbacks`` (ultralytics events -> fns) let tests interrupt a run."""
    with contextlib.ExitStack() as locks:
        return _train(args, callbacks, locks)


def _claim(run_dir: Path, locks: contextlib.ExitStack, resuming: bool) -> None:
    """One process per run folder (a second ``--resume`` of it exits 2 naming the holder); then the temp files a
    killed checkpoint write left are ours to remove."""
    from lpr4m.io import exclusive
    if not run_dir.is_dir() or (resuming and not (run_dir / "weights" / "last.pt").is_file()):
        raise BadInput(run_dir, "not a run folder (expected runs/detector/<run> with weights/last.pt)")
    locks.enter_context(exclusive(run_dir / ".lock", f"the training run {run_dir}", wait=False))
    for stale in (run_dir / "weights").glob(".*.pt.partial"):
        logger.info("removing %s, left by a run killed while it saved a checkpoint", stale)
        stale.unlink(missing_ok=True)


def _train(args: argparse.Namespace, callbacks: dict | None, locks: contextlib.ExitStack) -> dict:
    from detector import yolo
    from detector.dataset import build_yolo_dataset, merged_yaml
    made_by = command_line("detector/train.py", args.argv or [])
    knobs = resolve_knobs(args)
    # a GPU this machine lacks: one line now, not ultralytics' error after the build; "auto" as ultralytics names it
    knobs["device"] = torch_device(knobs["device"], several=True).replace("cuda:", "").replace("cuda", "0")
    runs_dir = Path(args.runs_dir)
    t0 = time.time()
    if args.resume:
        run_dir = _latest_run(runs_dir) if args.resume == "latest" else Path(args.resume)
        _claim(run_dir, locks, resuming=True)
        last = resume_checkpoint(run_dir)
        overrides = {k: knobs[k] for k in ("device", "batch", "workers") if getattr(args, k, None) is not None}
        config = read_json(run_dir / "config.json", expect=dict) if (run_dir / "config.json").is_file() else {}
        recorded = config.get("dataset", {}).get("roots")
        if args.data and recorded and [str(Path(d).resolve()) for d in args.data] != recorded:
            raise BadInput(args.data[0], f"--resume continues {run_dir}, which trains on {' '.join(recorded)}: "
                                         "drop --data")
        if overrides and config:  # the record says what the rest of the run trained with
            config.setdefault("resumed_with", []).append(overrides)
            write_json(run_dir / "config.json", config)
        logger.info("resuming %s", run_dir)
        try:
            merged = run_dir / "data.yaml"  # several roots: the list lives in the run folder, which may have moved
            yolo.train("", merged if merged.is_file() else Path(), runs_dir, run_dir.name, overrides,
                       _callbacks(None, callbacks), resume=last)
        except AssertionError as e:  # ultralytics: "training to N epochs is finished, nothing to resume"
            raise BadInput(last, f"cannot resume: {e}") from None
        imgsz = config.get("knobs", {}).get("imgsz", knobs["imgsz"])
        data_info = config.get("dataset", {})
    else:
        if not args.data:
            raise BadInput(None, "--data ROOT is required (or --resume RUN_DIR)")
        problems = Problems(strict=args.strict)
        views = [build_yolo_dataset(Dataset(root, problems), args.cache_dir, workers=knobs["workers"] or None,
                                    problems=problems, rebuild=args.rebuild_cache,
                                    frames_per_clip=knobs["frames_per_clip"]) for root in args.data]
        run_dir = _new_run_dir(runs_dir, args.name)
        _claim(run_dir, locks, resuming=False)
        data_yaml = views[0].yaml if len(views) == 1 else merged_yaml(views, run_dir / "data.yaml")
        try:
            start, desc = _start_weights(knobs["model"], run_dir, args.trust_pickle)
        except BadInput:
            shutil.rmtree(run_dir, ignore_errors=True)  # refused before training: leave no empty run folder
            raise
        overrides = ultralytics_overrides(knobs, args.seed, amp=not args.no_amp, freeze=yolo.frozen_layers(desc))
        data_info = {"roots": [str(Path(root).resolve()) for root in args.data],
                     "caches": [str(v.root) for v in views],
                     **{split: dict(sum((Counter(v.manifest[split]) for v in views), Counter()))
                        for split in ("train", "val")},
                     "problems": [v.manifest["problems"] for v in views]}
        record = {"knobs": knobs, "start_weights": start, "preset": args.preset, "ultralytics_overrides": overrides,
                  "dataset": data_info, "made_by": made_by, "seed": args.seed}
        write_json(run_dir / "config.json", record)
        yolo.train(start, data_yaml, runs_dir, run_dir.name, dict(overrides, exist_ok=True),
                   _callbacks(record, callbacks))
        imgsz = knobs["imgsz"]
    published = publish_run(run_dir, made_by, imgsz)
    return {"run_dir": str(run_dir), **published, "dataset": data_info, "wall_s": round(time.time() - t0, 1)}


def main(argv: Sequence[str] | None = None, callbacks: dict | None = None) -> int:
    """Train the detector; prints a JSON summary (run folder, weights, metrics)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        fixed = [k for k, v in vars(args).items() if k not in RESUME_FLAGS and v != parser.get_default(k)]
        if fixed:
            raise BadInput(None, f"--resume continues a run with its recorded settings: drop "
                                 f"{', '.join('--' + k.replace('_', '-') for k in fixed)} (a resume may change only "
                                 "--device, --batch and --workers)")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    result = train(args, callbacks)
    emit_json(result, args.out)
    return 0
