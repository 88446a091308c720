"""Train the embedder on <clip, shop image> pairs (``python retriever/train.py --data ROOT``).

One flat loop in the timm spirit: build -> (optional) cache frozen-prefix features -> epochs of unique-image
batches -> symmetric InfoNCE (+ optional matching head) -> checkpoints during the epoch -> per-epoch eval row in
results.csv -> weights + config + metrics in a new run folder. ``torchrun --nproc_per_node N`` runs it with DDP
(gloo on CPU, NCCL on GPU) and InfoNCE sees the negatives of every rank.

Presets: ``cpu`` (small-data demo on a couple of cores: frozen early stages whose outputs are computed once for a
few augmented views of every image, so each step only runs the last stages) and ``gpu`` (LPR4M scale: full
fine-tuning, on-the-fly augmentation in DataLoader workers, AMP, gradient accumulation).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lpr4m.cli import (Parser, command_line, device_arg, emit_json, fraction, nonnegative_float, nonnegative_int,
                       output_file, positive_float, positive_int, progress, run_name, setup_logging, torch_device)
from lpr4m.errors import BadInput, Problems
from lpr4m.images import check_image
from lpr4m.io import atomic_path, atomic_write, exclusive, remove_stale_temps, write_json
from lpr4m.layout import Dataset
from retriever.config import AGGREGATIONS, EmbedderConfig
from retriever.data import (AugmentConfig, ImageStore, TrainPair, UniqueImageBatchSampler, drop_images, frame_view,
                            load_pairs, to_input, unreadable_images)
from retriever.losses import InfoNCELoss, MatchingHead
from retriever.models import create_embedder

logger = logging.getLogger(__name__)

# preset < command line; anything a preset leaves out comes from DEFAULTS
DEFAULTS = dict(backbone="efficientnet_lite0", pretrained=True, embed_dim=256, input_size=None,
                resize_mode="letterbox", epochs=10, batch_size=32, accum=1, lr=3e-4, head_lr_mult=10.0,
                weight_decay=0.05, warmup_steps=20, train_frames=3, train_agg="attention", pmd=False,
                pmd_weight=0.5, freeze_stages=0, bn_eval=True, cache_views=0, image_views=16, amp=False,
                workers=4, threads=0, log_every=10, ckpt_every=200, eval_every=1, eval_frames=10,
                max_minutes=0.0, temperature=0.07, seed=0, max_side=None, limit=None, lp_epochs=0, wise_alpha=1.0,
                tta="none")
# cpu: the bundled retriever's recipe (weights/README.md). Only the last trunk stage and the head train: on products
# never trained on that beat training two stages, and each step costs less, so 30 minutes on 2 cores go further.
PRESETS = {
    "cpu": dict(backbone="efficientnet_lite0", input_size=192, epochs=30, batch_size=32, lr=5e-4, head_lr_mult=5.0,
                warmup_steps=15, train_frames=3, freeze_stages=6, bn_eval=True, cache_views=2, image_views=12,
                workers=0, threads=2, log_every=10, ckpt_every=50, eval_every=10, max_minutes=28.0, max_side=320),
    "gpu": dict(backbone="efficientnet_lite0", input_size=224, epochs=10, batch_size=256, accum=1, lr=3e-4,
                head_lr_mult=10.0, warmup_steps=1000, train_frames=4, freeze_stages=0, bn_eval=False,
                cache_views=0, amp=True, workers=8, log_every=50, ckpt_every=2000, eval_every=1, pmd=True),
}
STATE_FILE = "train_state.pt"


# -- distributed -----------------------------------------------------------------------------------------------
def init_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """Rank, world size and device from torchrun's environment (a single process when it is absent); a GPU this
    machine lacks is a one-line BadInput. Under torchrun each CUDA rank takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    name = torch_device(device_arg)
    # each rank its own GPU; a plain "cuda" too, as torch 2.11's set_device wants an index (seen on an H200)
    if name.startswith("cuda") and (world > 1 or name == "cuda"):
        name = torch_device(f"cuda:{local}")
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def is_primary() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item() / dist.get_world_size())


# -- the module DDP wraps: encoder + pooling + loss, so every trained parameter is synchronised ----------------
class TrainModule(nn.Module):
    def __init__(self, model, embed_dim: int, temperature: float, pmd: bool, pmd_weight: float, train_agg: str):
        super().__init__()
        self.model = model
        self.loss = InfoNCELoss(temperature)
        self.pmd = MatchingHead(embed_dim) if pmd else None
        self.pmd_weight = pmd_weight
        self.train_agg = train_agg

    def forward(self, frames: torch.Tensor, frame_index: torch.Tensor, images: torch.Tensor, start: int = 0):
        n_clips = len(images)
        emb = self.model(torch.cat([frames, images]), start=start)  # one shared encoder, one forward
        frame_emb, image_emb = emb[: len(frames)].float(), emb[len(frames):].float()
        clip_emb = self.model.aggregate(frame_emb, frame_index, n_clips, self.train_agg)
        loss, logits = self.loss(clip_emb, image_emb)
        out = {"icl": loss.detach()}
        if self.pmd is not None:
            pmd = self.pmd.loss(clip_emb, image_emb)
            out["pmd"] = pmd.detach()
            loss = loss + self.pmd_weight * pmd
        with torch.no_grad():
            rank = dist.get_rank() if dist.is_initialized() else 0
            out["acc"] = (logits.argmax(1) == torch.arange(n_clips, device=logits.device) + rank * n_clips
                          ).float().mean()
        out["loss"] = loss
        return out


def set_train_mode(model, frozen_stages: int, bn_eval: bool) -> None:
    model.train()
    stages = model.trunk.stages()
    for s in stages[:frozen_stages]:
        s.eval()
    if bn_eval:
        for m in model.trunk.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def freeze(model, n_stages: int) -> None:
    for s in model.trunk.stages()[:n_stages]:
        for p in s.parameters():
            p.requires_grad_(False)


def wise_interpolate(anchor: dict, finetuned: dict, alpha: float, keys=None) -> dict:
    """WiSE-FT (Wortsman et al. 2022): ``anchor + alpha * (finetuned - anchor)`` for the floating-point tensors in
    ``keys`` (default: all); the rest, and integer buffers, are the fine-tuned ones."""
    out = {}
    for k, v in finetuned.items():
        if v.is_floating_point() and k in anchor and (keys is None or k in keys):
            out[k] = anchor[k].to(v.dtype) + alpha * (v - anchor[k].to(v.dtype))
        else:
            out[k] = v
    return out


# -- batch sources ---------------------------------------------------------------------------------------------
class FeatureCache:
    """Frozen-prefix outputs of a few augmented views of every frame and shop image, computed once (fp16).

    View 0 is the plain (un-augmented) image. Training then samples a view per frame per step, so augmentation
    still varies while each step costs only the trainable stages.
    """

    def __init__(self, model, pairs: list[TrainPair], config: EmbedderConfig, stop: int, frame_views: int,
                 image_views: int, store: ImageStore, aug: AugmentConfig, seed: int, device, batch: int = 32):
        self.stop = stop
        rng = np.random.default_rng(seed)
        frame_keys = sorted({(p, b and tuple(b)) for pair in pairs for p, b in zip(pair.frame_paths, pair.frame_boxes)},
                            key=lambda k: (str(k[0]), k[1] or ()))
        self.frame_row = {k: i for i, k in enumerate(frame_keys)}
        image_paths = sorted({pair.image_path for pair in pairs}, key=str)
        self.image_row = {p: i for i, p in enumerate(image_paths)}
        jobs = [("f", i, v) for i in range(len(frame_keys)) for v in range(frame_views)] + \
               [("i", i, v) for i in range(len(image_paths)) for v in range(image_views)]
        self.frames = self.images = None
        model.eval()
        bar = progress(total=len(jobs), desc="caching views", unit="img")
        t0 = time.perf_counter()
        for s in range(0, len(jobs), batch):
            xs = []
            for kind, i, v in jobs[s:s + batch]:
                if kind == "f":
                    path, box = frame_keys[i]
                    rgb = frame_view(store.get(path), box, None if v == 0 else rng, None if v == 0 else aug)
                else:
                    rgb = store.get(image_paths[i])
                    rgb = rgb if v == 0 else frame_view(rgb, None, rng, aug)
                xs.append(to_input(rgb, config))
            with torch.inference_mode():
                feats = model.trunk(torch.stack(xs).to(device), 0, stop).to(torch.float16).cpu()
            if self.frames is None:
                shape = tuple(feats.shape[1:])
                self.frames = torch.empty((len(frame_keys), frame_views) + shape, dtype=torch.float16)
                self.images = torch.empty((len(image_paths), image_views) + shape, dtype=torch.float16)
            for (kind, i, v), f in zip(jobs[s:s + batch], feats):
                (self.frames if kind == "f" else self.images)[i, v] = f
            bar.update(len(xs))
        bar.close()
        self.frame_views, self.image_views = frame_views, image_views
        logger.info("cached %d frame views + %d shop-image views (%.1f MB) in %.0f s", len(frame_keys) * frame_views,
                    len(image_paths) * image_views, (self.frames.numel() + self.images.numel()) * 2 / 1e6,
                    time.perf_counter() - t0)

    def batch(self, pairs: list[TrainPair], rng: np.random.Generator, train_frames: int):
        fx, index, ix = [], [], []
        for j, pair in enumerate(pairs):
            keys = list(zip(pair.frame_paths, pair.frame_boxes))
            chosen = rng.choice(len(keys), size=min(train_frames, len(keys)), replace=False)
            for c in chosen:
                p, b = keys[c]
                fx.append(self.frames[self.frame_row[(p, b and tuple(b))], rng.integers(self.frame_views)])
                index.append(j)
            ix.append(self.images[self.image_row[pair.image_path], rng.integers(self.image_views)])
        return torch.stack(fx).float(), torch.tensor(index), torch.stack(ix).float()


class PairDataset(torch.utils.data.Dataset):
    """On-the-fly views for full fine-tuning: up to ``train_frames`` augmented frames + one augmented shop image."""

    def __init__(self, pairs, config, train_frames, aug, seed, max_side=None):
        self.pairs, self.config, self.train_frames, self.aug, self.seed = pairs, config, train_frames, aug, seed
        self.store = ImageStore(max_side, in_memory=False)
        self.epoch = 0

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        pair = self.pairs[i]
        chosen = rng.choice(len(pair.frame_paths), size=min(self.train_frames, len(pair.frame_paths)), replace=False)
        frames = torch.stack([to_input(frame_view(self.store.get(pair.frame_paths[c]), pair.frame_boxes[c], rng,
                                                  self.aug), self.config) for c in chosen])
        image = to_input(frame_view(self.store.get(pair.image_path), None, rng, self.aug), self.config)
        return frames, image


def collate_pairs(items):
    frames = torch.cat([f for f, _ in items])
    index = torch.cat([torch.full((len(f),), j, dtype=torch.long) for j, (f, _) in enumerate(items)])
    return frames, index, torch.stack([im for _, im in items])


class _SkipBatches:
    """A batch sampler that skips the batches of an epoch already done before ``--resume``."""

    def __init__(self, sampler, skip):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        for i, b in enumerate(self.sampler):
            if i >= self.skip:
                yield b

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


# -- arguments -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="retriever/train.py", description=__doc__.split("\n\n")[0],
               argument_default=None)
    g = p.add_argument_group("data")
    g.add_argument("--data", action="extend", nargs="+", default=None, metavar="ROOT",
                   help="LPR4M root(s) with annotations/training_videoinfo*.txt; several roots train together")
    g.add_argument("--val-data", help="LPR4M root whose test split is evaluated each --eval-every epochs "
                                      "(default: the first --data root with a test split; 'none' to skip)")
    g.add_argument("--limit", type=positive_int, help="use only the first N training clips of each root")
    g.add_argument("--max-side", type=positive_int, help="shrink decoded training images to this longest side")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(PRESETS), help="defaults for a CPU demo or LPR4M-scale GPU training")
    g.add_argument("--backbone", help="registered backbone or timm:<name>")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None)
    g.add_argument("--embed-dim", type=positive_int)
    g.add_argument("--input-size", type=positive_int)
    g.add_argument("--resize-mode", choices=("letterbox", "squash"))
    g.add_argument("--tta", choices=("none", "flip"),
                   help="test-time augmentation recorded in the weights' config (used by every evaluation)")
    g.add_argument("--freeze-stages", type=nonnegative_int, help="freeze the first N trunk stages (stem = stage 0)")
    g.add_argument("--no-bn-eval", dest="bn_eval", action="store_false", default=None,
                   help="update BatchNorm statistics (default keeps them frozen for small batches)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int)
    g.add_argument("--lp-epochs", type=nonnegative_int,
                   help="LP-FT: train only the projection and pooling head (trunk frozen) for the first N epochs")
    g.add_argument("--wise-alpha", type=fraction,
                   help="WiSE-FT: the saved weights are anchor + alpha * (fine-tuned - anchor), the anchor being "
                        "the weights when the trunk started to train (pretrained trunk, linear-probed head); 1 = "
                        "plain fine-tuning")
    g.add_argument("--batch-size", "--batch", type=positive_int, help="clips per rank per step (distinct shop images)")
    g.add_argument("--accum", type=positive_int, help="gradient accumulation steps")
    g.add_argument("--lr", type=positive_float)
    g.add_argument("--head-lr-mult", type=positive_float)
    g.add_argument("--weight-decay", type=nonnegative_float)
    g.add_argument("--warmup-steps", type=nonnegative_int)
    g.add_argument("--temperature", type=positive_float, help="initial InfoNCE temperature (learned)")
    g.add_argument("--train-frames", type=positive_int, help="frames per clip per step")
    g.add_argument("--train-agg", choices=("mean", "attention"), help="clip aggregation used in training")
    g.add_argument("--pmd", action="store_true", default=None, help="add the hard-negative matching head loss")
    g.add_argument("--pmd-weight", type=nonnegative_float)
    g.add_argument("--cache-views", type=nonnegative_int,
                   help="cache frozen-prefix features of N views per frame (0 = off)")
    g.add_argument("--image-views", type=positive_int, help="cached views per shop image")
    g.add_argument("--amp", action="store_true", default=None, help="mixed precision (CUDA)")
    g.add_argument("--workers", type=nonnegative_int)
    g.add_argument("--threads", type=nonnegative_int, help="torch CPU threads (0 = torch default)")
    g.add_argument("--max-minutes", type=nonnegative_float,
                   help="stop (and save) after this much wall time (0 = no limit)")
    g.add_argument("--seed", type=nonnegative_int)
    g.add_argument("--device", type=device_arg, default="auto")
    g = p.add_argument_group("output")
    g.add_argument("--runs-dir", default="runs/retriever")
    g.add_argument("--name", type=run_name, default=None, help="suffix of the run folder name (a plain name: no '/' or '..')")
    g.add_argument("--resume", default=None, help="a run folder (or its train_state.pt) to continue")
    g.add_argument("--log-every", type=positive_int)
    g.add_argument("--ckpt-every", type=nonnegative_int, help="save a resumable checkpoint every N optimizer steps")
    g.add_argument("--eval-every", type=nonnegative_int, help="evaluate every N epochs (0 = only at the end)")
    g.add_argument("--eval-frames", type=positive_int)
    g.add_argument("--stop-after-steps", type=positive_int, default=None,
                   help=argparse.SUPPRESS)  # tests: simulate a crash
    g.add_argument("--strict", action="store_true", help="stop at the first unreadable image or incomplete pair "
                                                          "(default: skip and count them)")
    g.add_argument("--out", type=output_file, default=None, help="write the JSON result here instead of stdout")
    g.add_argument("-v", "--verbose", action="store_true")
    return p


def resolve_args(args: argparse.Namespace) -> dict:
    """dataclass-like resolution: DEFAULTS < preset < command line."""
    cfg = dict(DEFAULTS)
    if args.preset:
        cfg.update(PRESETS[args.preset])
    for k, v in vars(args).items():
        if v is not None and (k in DEFAULTS or k not in cfg):
            cfg[k] = v
    cfg.setdefault("preset", args.preset)
    if cfg["train_agg"] not in AGGREGATIONS:
        raise BadInput(None, f"--train-agg {cfg['train_agg']!r}")
    return cfg


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warmup then cosine decay to 0 (a multiplier of the base learning rate)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def make_config(cfg: dict, spec) -> EmbedderConfig:
    return EmbedderConfig(backbone=cfg["backbone"], embed_dim=cfg["embed_dim"], input_size=cfg["input_size"],
                          resize_mode=cfg["resize_mode"], mean=spec.mean, std=spec.std, aggregation=cfg["train_agg"],
                          tta=cfg.get("tta", "none"))


def run_eval(model, config, val_ds, frames, device, seen_ids: set[str] | None = None) -> dict:
    """Rank-k per aggregation on the validation split; with ``seen_ids`` also for its queries of products never
    trained on (``<agg>_unseen``) and of the others (``<agg>_seen``)."""
    from retriever.embedder import Embedder, TorchBackend, pool_params_from_model
    from retriever.evaluation import evaluate
    emb = Embedder(TorchBackend(model, str(device)), config, None, pool_params_from_model(model))
    crops = "gt" if val_ds.gt_boxes else "none"
    out = evaluate(val_ds, emb, crops, ("mean", "attention"), ("live",), frames, True, seen_ids=seen_ids)
    res = {k.split("/", 1)[1]: v for k, v in out["results"].items()}
    for key, groups in out["by_product"].items():
        for group, r in groups.items():
            if r.get("n_queries"):
                res[f"{key.split('/', 1)[1]}_{group}"] = r
    return res


# -- main ------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Train (or --resume) one run; a run folder has one trainer at a time (its ``.lock``)."""
    with contextlib.ExitStack() as locks:  # the run folder's lock, held until this run ends
        return _main(argv, locks)


def _main(argv: Sequence[str] | None, locks: contextlib.ExitStack) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.name is not None:
        from lpr4m.ids import check_safe_name
        check_safe_name(args.name, "run name")  # the run folder must stay inside --runs-dir
    argv_list = list(sys.argv[1:] if argv is None else argv)
    state = None
    if args.resume:
        state_path = Path(args.resume)
        state_path = state_path / STATE_FILE if state_path.is_dir() else state_path
        if not state_path.is_file():
            raise BadInput(state_path, "nothing to resume (expected a run folder with train_state.pt)")
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise BadInput(state_path, f"unreadable training state ({type(e).__name__})") from None
        cfg = dict(state["cfg"])
        if args.max_minutes is not None:
            cfg["max_minutes"] = args.max_minutes
        run_dir = state_path.parent
        if int(os.environ.get("RANK", "0")) == 0:
            locks.enter_context(exclusive(run_dir / ".lock", f"the training run {run_dir}", wait=False))
        if removed := remove_stale_temps(state_path):  # a kill during an earlier save: nothing else writes here
            logger.info("removed %d partial training-state file(s) a killed run left in %s", removed, run_dir)
    else:
        if not args.data:
            parser.error("--data is required (unless --resume)")
        cfg = resolve_args(args)
        cfg["data"] = [str(d) for d in args.data]
        cfg["val_data"] = args.val_data
        cfg["command"] = command_line("retriever/train.py", argv_list)
        run_dir = None
    rank, world, device = init_distributed(args.device)
    if rank != 0:  # only the primary rank logs (warnings still come through)
        logging.getLogger().setLevel(logging.WARNING)
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"] + rank)
    t_start = time.perf_counter()

    # data
    problems = Problems(strict=args.strict)
    roots = [Dataset(d) for d in ([cfg["data"]] if isinstance(cfg["data"], str) else cfg["data"])]
    pairs = [p for ds in roots for p in load_pairs(ds, problems, cfg["limit"])]
    seen_ids = {p.image_id for p in pairs}
    val_ds = None
    if cfg.get("val_data") != "none":
        candidates = [Dataset(cfg["val_data"])] if cfg.get("val_data") else roots
        val_ds = next((v for v in candidates if v.annotation("gtimage", required=False) is not None), None)

    # model
    model, spec = create_embedder(cfg["backbone"], pretrained=cfg["pretrained"], embed_dim=cfg["embed_dim"])
    cfg["input_size"] = cfg["input_size"] or spec.input_size
    config = make_config(cfg, spec)
    config.training_command = cfg["command"]
    n_stages = model.trunk.num_stages
    frozen = min(int(cfg["freeze_stages"]), n_stages - 1) if model.trunk.stage_names else 0
    freeze(model, frozen)
    tm = TrainModule(model, cfg["embed_dim"], cfg["temperature"], cfg["pmd"], cfg["pmd_weight"],
                     cfg["train_agg"]).to(device)
    if state is not None:
        tm.load_state_dict(state["module"])

    # readable images only, checked before the run folder exists (a --strict stop leaves none behind); the cached
    # path decodes every image into memory anyway, so there the check fills that store
    store = ImageStore(cfg["max_side"], problems) if cfg["cache_views"] and frozen > 0 else None
    bad = unreadable_images(pairs, problems, store.get if store else check_image, 0 if store else cfg["workers"]) \
        if rank == 0 else None
    pairs = drop_images(pairs, broadcast_object(bad))
    sampler = UniqueImageBatchSampler([p.image_id for p in pairs], cfg["batch_size"], cfg["seed"], rank, world)

    # run folder (named on rank 0, shared with the others)
    if run_dir is None:
        name = datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{cfg['backbone'].replace(':', '_')}" + \
            (f"-{cfg['preset']}" if cfg.get("preset") else "") + (f"-{args.name}" if args.name else "")
        run_dir = Path(args.runs_dir) / name
        if is_primary():
            base, i = run_dir, 1
            while run_dir.exists():  # never overwrite a run
                run_dir = base.with_name(f"{base.name}-{i}")
                i += 1
            run_dir.mkdir(parents=True)
            locks.enter_context(exclusive(run_dir / ".lock", f"the training run {run_dir}", wait=False))
            write_json(run_dir / "config.json", cfg)
        run_dir = broadcast_object(run_dir)

    decay, no_decay, head = [], [], []
    for n, p in tm.named_parameters():
        if not p.requires_grad:
            continue
        if not n.startswith("model.trunk."):
            head.append(p)
        elif p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    lr = cfg["lr"]
    optimizer = torch.optim.AdamW([
        {"params": decay, "lr": lr, "weight_decay": cfg["weight_decay"], "base_lr": lr},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "base_lr": lr},
        {"params": head, "lr": lr * cfg["head_lr_mult"], "weight_decay": 1e-4, "base_lr": lr * cfg["head_lr_mult"]},
    ])
    use_amp = bool(cfg["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    ddp = tm
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(tm, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=True)

    aug = AugmentConfig()
    cache = None
    start_stage = 0
    if store is not None:
        cache = FeatureCache(model, pairs, config, frozen, int(cfg["cache_views"]), int(cfg["image_views"]),
                             store, aug, cfg["seed"], device)
        start_stage = frozen
        del store
    dataset = None if cache is not None else PairDataset(pairs, config, cfg["train_frames"], aug, cfg["seed"],
                                                         cfg["max_side"])
    steps_per_epoch = len(sampler) // cfg["accum"]
    total_steps = max(1, steps_per_epoch * cfg["epochs"])
    epoch0 = state["epoch"] if state else 0
    done_in_epoch = state["batches_done"] if state else 0
    step = state["step"] if state else 0
    best = dict(state.get("best", {})) if state else {}
    history = list(state.get("history", [])) if state else []
    logger.info("run %s: %d pairs, %d batches/epoch (global batch %d), %d epochs, frozen stages %d, %s",
                run_dir, len(pairs), len(sampler), cfg["batch_size"] * world, cfg["epochs"], frozen,
                "cached views" if cache else "on-the-fly views")

    def save_state(epoch, batches_done):
        if not is_primary():
            return
        blob = {"cfg": cfg, "module": tm.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if use_amp else {}, "epoch": epoch, "batches_done": batches_done,
                "step": step, "best": best, "history": history, "anchor": anchor}
        with atomic_path(run_dir / STATE_FILE) as tmp:
            torch.save(blob, tmp)

    def diverged(what):
        return BadInput(None, f"{what} at step {step}; weights not saved: lower --lr (now {cfg['lr']:g})")

    def save_weights(name, metrics):
        from retriever.embedder import save_checkpoint
        if not all(t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()):
            raise diverged("the weights became non-finite")  # the last step can break them after a finite loss
        config.metrics = metrics
        save_checkpoint(model, config, run_dir / "weights" / f"{name}.safetensors")

    lp_epochs = int(cfg.get("lp_epochs") or 0)
    wise_alpha = float(cfg.get("wise_alpha", 1.0))
    trunk_params = [p for p in model.trunk.parameters() if p.requires_grad]
    anchor = state.get("anchor") if state else None

    def snapshot_anchor():
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    keep_anchor = wise_alpha < 1.0  # WiSE-FT needs it; plain runs do not carry a second model in their state
    if anchor is None and lp_epochs == 0 and keep_anchor:
        anchor = snapshot_anchor()  # pretrained trunk, fresh head
    out_of_time = False
    # with a wall-time limit the cosine schedule follows whichever is further along, steps or time, so a run cut
    # by --max-minutes still ends at a low learning rate instead of mid-schedule
    t_train0 = time.perf_counter()
    train_budget = cfg["max_minutes"] * 60 - (t_train0 - t_start) if cfg["max_minutes"] else 0.0
    if cfg["max_minutes"] and train_budget <= 0:
        logger.warning("--max-minutes %.1f already spent before training started", cfg["max_minutes"])
    time_step0 = step
    stopped = False
    for epoch in range(epoch0, cfg["epochs"]):
        sampler.set_epoch(epoch)
        set_train_mode(model, frozen, cfg["bn_eval"])
        probing = epoch < lp_epochs  # LP-FT: the head first, on the pretrained trunk's features
        for p in trunk_params:
            p.requires_grad_(not probing)
        if not probing and epoch == lp_epochs and lp_epochs:
            logger.info("linear probe done after %d epochs: the trunk trains from now on", lp_epochs)
            if keep_anchor and anchor is None:
                anchor = snapshot_anchor()  # the linear-probed head on the pretrained trunk
        skip = done_in_epoch if epoch == epoch0 else 0
        if cache is not None:
            # one rng per (epoch, rank, batch): a resumed run draws the same views as an uninterrupted one
            batches = (cache.batch([pairs[i] for i in b], np.random.default_rng([cfg["seed"], epoch, rank, skip + j]),
                                   cfg["train_frames"]) for j, b in enumerate(_SkipBatches(sampler, skip)))
        else:
            dataset.epoch = epoch
            batches = torch.utils.data.DataLoader(dataset, batch_sampler=_SkipBatches(sampler, skip),
                                                  num_workers=cfg["workers"], collate_fn=collate_pairs,
                                                  pin_memory=device.type == "cuda",
                                                  persistent_workers=False)
        t_epoch = time.perf_counter()
        sums, count, t_log, seen = {}, 0, time.perf_counter(), 0
        batches_done = skip
        for frames, index, images in batches:
            frames, index, images = frames.to(device, non_blocking=True), index.to(device), images.to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                out = ddp(frames, index, images, start_stage)
            values = {k: float(v.detach()) for k, v in out.items()}  # one device sync per step, for all of them
            if not math.isfinite(values["loss"]):  # stop before NaN reaches the saved weights
                raise diverged(f"loss became {values['loss']}")
            scaler.scale(out["loss"] / cfg["accum"]).backward()
            batches_done += 1
            seen += len(images)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            if batches_done % cfg["accum"] == 0:
                eff = step
                if train_budget > 0 and step > time_step0:
                    frac = (time.perf_counter() - t_train0) / (0.93 * train_budget)  # keep time for the last eval
                    eff = max(step, int(time_step0 + frac * (total_steps - time_step0)))
                    if world > 1:
                        eff = int(round(all_reduce_mean(float(eff))))
                scale = lr_at(eff, total_steps, cfg["warmup_steps"])
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * scale
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % cfg["log_every"] == 0 and is_primary():
                    dt = time.perf_counter() - t_log
                    logger.info("Train: %d [%d/%d] loss %.4f (%.4f) acc %.3f lr %.2e T %.4f %.1f clips/s", epoch,
                                batches_done, len(sampler), values["loss"], sums["loss"] / count,
                                sums["acc"] / count, optimizer.param_groups[0]["lr"], tm.loss.temperature,
                                seen * world / max(dt, 1e-9))
                    t_log, seen = time.perf_counter(), 0
                if cfg["ckpt_every"] and step % cfg["ckpt_every"] == 0:
                    save_state(epoch, batches_done)
                if args.stop_after_steps and step >= args.stop_after_steps:
                    save_state(epoch, batches_done)
                    stopped = True
                    break
                if cfg["max_minutes"]:
                    late = float(time.perf_counter() - t_start > cfg["max_minutes"] * 60 or
                                 (train_budget > 0 and eff >= total_steps))
                    if world > 1:  # every rank must stop at the same step (collectives)
                        late = all_reduce_mean(late)
                    if late > 0:
                        out_of_time = True
                        break
        if stopped:
            logger.warning("stopped after %d steps (--stop-after-steps); continue with --resume %s", step, run_dir)
            break
        row = {"epoch": epoch, "step": step, "time_s": round(time.perf_counter() - t_epoch, 2),
               "temperature": round(tm.loss.temperature, 5), "lr": optimizer.param_groups[0]["lr"]}
        for k, v in sums.items():
            row[k] = round(all_reduce_mean(v / max(count, 1)), 5)
        last_epoch = epoch == cfg["epochs"] - 1 or out_of_time
        if val_ds is not None and is_primary() and (last_epoch or (cfg["eval_every"] and
                                                                   (epoch + 1) % cfg["eval_every"] == 0)):
            res = run_eval(model, config, val_ds, cfg["eval_frames"], device, seen_ids)
            set_train_mode(model, frozen, cfg["bn_eval"])
            for agg, r in res.items():
                for k in (1, 5, 10):
                    row[f"{agg}_R{k}"] = round(r[f"R{k}"], 4)
            # model selection on products never trained on, where the validation split has them
            unseen = [r["R1"] for a, r in res.items() if a.endswith("_unseen")]
            r1 = max(unseen) if unseen else max(r["R1"] for a, r in res.items() if "_" not in a)
            if r1 >= best.get("R1", -1):
                best = {"R1": r1, "epoch": epoch, "results": res}
                save_weights("best", {"epoch": epoch, **{a: {k: v for k, v in r.items() if k.startswith("R")}
                                                          for a, r in res.items()}})
        history.append(row)
        if is_primary():
            write_results_csv(run_dir / "results.csv", history)
        done_in_epoch = 0
        save_state(epoch + 1, 0)
        if out_of_time:
            logger.warning("time limit %.1f min reached in epoch %d", cfg["max_minutes"], epoch)
            break

    result = {"run_dir": str(run_dir), "steps": step, "epochs_done": len(history), "stopped_early": stopped,
              "out_of_time": out_of_time, "wall_s": round(time.perf_counter() - t_start, 1),
              "world_size": world, "problems": problems.as_dict()}
    if is_primary() and not stopped:
        last_metrics = {"epoch": len(history) - 1, "last_row": history[-1] if history else {}}
        if wise_alpha < 1.0 and anchor is not None:
            save_weights("finetuned", last_metrics)
            # a fresh head (no linear probe) is no anchor for the head: interpolate the trunk only then
            keys = None if lp_epochs else {k for k in anchor if k.startswith("trunk.")}
            model.load_state_dict(wise_interpolate(anchor, model.state_dict(), wise_alpha, keys))
            last_metrics["wise_alpha"] = wise_alpha
            if val_ds is not None:
                res = run_eval(model, config, val_ds, cfg["eval_frames"], device, seen_ids)
                last_metrics["wise"] = {a: {k: round(v, 4) for k, v in r.items() if k.startswith("R")}
                                        for a, r in res.items()}
                logger.info("WiSE-FT alpha %.2f: %s", wise_alpha,
                            ", ".join(f"{a} R1 {r['R1']:.3f}" for a, r in last_metrics["wise"].items()))
        save_weights("last", last_metrics)
        result.update(weights=str(run_dir / "weights" / "last.safetensors"),
                      best=best, best_weights=str(run_dir / "weights" / "best.safetensors") if best else None)
        write_json(run_dir / "metrics.json", result)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        emit_json(result, args.out)
    return 0


def write_results_csv(path, rows: list[dict]) -> None:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_write(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
