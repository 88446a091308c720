"""DetectorConfig: the input contract and provenance that travel with detector weights (``<stem>.json``)."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpr4m.errors import BadInput
from lpr4m.io import read_json, write_json

KIND = "lpr-detector"
BUNDLED_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "detector.safetensors"  # from any working dir


@dataclass
class DetectorConfig:
    """What a loader needs to rebuild the network and feed it, and how the weights were made."""

    model: str = "yolo11n.yaml"  # ultralytics model YAML the network was built from
    model_yaml: dict = field(default_factory=dict)  # its resolved description: loading needs no YAML lookup
    nc: int = 1
    names: list = field(default_factory=lambda: ["product"])
    imgsz: int = 640  # square letterbox input (pad value 114, RGB, /255)
    stride: int = 32
    weights_format: str = "safetensors"  # safetensors | onnx | engine
    precision: str = "fp32"  # of the exported graph: fp32 | fp16 | int8 (Q/DQ)
    sha256: str = ""  # of the weights file this config describes
    conf: float = 0.25  # default score threshold for detect()
    iou: float = 0.7  # NMS IoU threshold
    max_det: int = 300
    made_by: str = ""  # command line that produced the weights
    source: str = ""  # run folder / parent weights
    metrics: dict = field(default_factory=dict)
    ultralytics_version: str = ""
    kind: str = KIND

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, path=None) -> "DetectorConfig":
        if d.get("kind") != KIND:
            raise BadInput(path, f"not a detector config (kind={d.get('kind')!r}, expected {KIND!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            hint = difflib.get_close_matches(unknown[0], names, n=1)
            raise BadInput(path, f"unknown config key {unknown[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        return cls(**d)

    def save(self, path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "DetectorConfig":
        return cls.from_dict(read_json(path, expect=dict), path)


def sidecar(weights) -> Path:
    """The config JSON beside a weights file: ``x.safetensors -> x.json``; ``x.engine -> x.engine.json``."""
    weights = Path(weights)
    if weights.suffix == ".engine":
        return weights.with_name(weights.name + ".json")
    return weights.with_suffix(".json")
