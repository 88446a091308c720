"""The embedder's config: everything inference needs besides the tensors, saved as JSON next to the weights.

Like timm's ``PretrainedCfg``, preprocessing travels with the weights: input size, resize mode, mean/std and the
embedding size are read from here by every backend, never hard-coded.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from lpr4m.errors import BadInput
from lpr4m.io import read_json, write_json

RESIZE_MODES = ("letterbox", "squash")
TTA_MODES = ("none", "flip")
AGGREGATIONS = ("mean", "attention", "max")


@dataclass
class EmbedderConfig:
    """How an embedder was built and how to feed it (saved as ``<weights>.json``)."""

    backbone: str = "efficientnet_lite0"
    embed_dim: int = 256
    input_size: int = 224
    resize_mode: str = "letterbox"  # letterbox = keep aspect ratio, pad to square; squash = plain resize
    pad_value: int = 114
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    normalize: bool = True  # embeddings are L2-normalised (cosine = inner product)
    aggregation: str = "mean"
    pool_hidden: int = 64  # hidden size of the attention / quality pooling head
    tta: str = "none"  # test-time augmentation: "flip" embeds each image and its mirror image, and averages
    sha256: str = ""  # of the weights file this config describes
    format: str = "safetensors"
    training_command: str = ""
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if self.resize_mode not in RESIZE_MODES:
            raise BadInput(None, f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.aggregation not in AGGREGATIONS:
            raise BadInput(None, f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.tta not in TTA_MODES:
            raise BadInput(None, f"tta must be one of {TTA_MODES}, got {self.tta!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise BadInput(None, "mean and std must hold 3 values (std > 0)")
        if int(self.input_size) < 16 or int(self.embed_dim) < 2:
            raise BadInput(None, f"input_size {self.input_size} / embed_dim {self.embed_dim} out of range")

    @property
    def fingerprint(self) -> str:
        """Identifies weights + preprocessing: an index built with one embedder refuses another.

        Exports (.onnx, .engine) carry the sha256 of the checkpoint they came from, so the same model keeps one
        fingerprint on every backend.
        """
        weights_sha = str(self.extra.get("source_sha256") or self.sha256)
        pre = [self.backbone, self.embed_dim, self.input_size, self.resize_mode, self.pad_value, list(self.mean),
               list(self.std), self.normalize] + ([self.tta] if self.tta != "none" else [])
        pre = json.dumps(pre, sort_keys=True)
        return f"{self.backbone}-{self.embed_dim}-{hashlib.sha256(pre.encode()).hexdigest()[:8]}-{weights_sha[:16]}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict, path=None) -> "EmbedderConfig":
        if "model_yaml" in d:  # a detector's sidecar: "unknown config key 'model'" would not say so
            raise BadInput(path, "a detector's config (it has 'model_yaml'): these are detector weights; expected "
                                 "embedder weights (e.g. weights/retriever.safetensors)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            hint = difflib.get_close_matches(unknown[0], names, n=1)
            raise BadInput(path, f"unknown config key {unknown[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            if isinstance(e, BadInput):
                raise BadInput(path, e.message) from None
            raise BadInput(path, f"bad embedder config: {e}") from None

    def save(self, path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "EmbedderConfig":
        return cls.from_dict(read_json(path, expect=dict), path)


def config_path_for(weights) -> Path:
    """``retriever.safetensors`` -> ``retriever.json``; exports keep their own: ``retriever.onnx.json``."""
    weights = Path(weights)
    if weights.suffix.lower() == ".safetensors":
        return weights.with_suffix(".json")
    return weights.with_name(weights.name + ".json")

