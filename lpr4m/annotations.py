"""Readers and writers for every LPR4M annotation file (DESIGN.md, "The LPR4M layout").

Readers stream (the real ``training_videoinfo`` has 4M rows), validate each row and raise ``BadInput`` naming
file and line; batch callers pass a ``Problems`` to skip-and-count instead. Writers are atomic and write the
README form (11 columns, JSON lists). List cells are parsed as JSON, then as Python literals with
``ast.literal_eval`` (the authors' files use both) -- never ``eval``.
"""
from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from lpr4m.errors import BadInput, Problems
from lpr4m.ids import frame_id_from, parse_image_id, parse_live_id, parse_video_id, check_safe_name
from lpr4m.io import atomic_write, read_json, write_json

Box = list  # [x1, y1, x2, y2], normalised to [0, 1]

README_COLUMNS = ("video_id", "frame_ids", "boxes", "image_id", "image_title", "category_id", "category_name",
                  "asr", "scale_type", "duration_type", "number_type")
AUTHORS_COLUMNS = README_COLUMNS[:7] + ("spu_id",) + README_COLUMNS[7:]
_BOX_TOL = 1e-6


@dataclass
class TrainingClip:
    """One row of ``training_videoinfo``: a clip, its frames and boxes, and the shop image it shows."""

    video_id: str
    frame_ids: list[str]
    boxes: list[list[Box]]  # one list of boxes per frame ([] = no product / not annotated)
    image_id: str
    image_title: str = ""
    category_id: str = ""
    category_name: str = ""
    asr: str = ""
    scale_type: str = ""
    duration_type: str = ""
    number_type: str = ""
    spu_id: str = ""
    line: int | None = field(default=None, compare=False)

    @property
    def live_id(self) -> str:
        return parse_video_id(self.video_id).live_id

    @property
    def has_boxes(self) -> bool:
        return any(self.boxes)


def parse_list(text: str, path=None, line=None, what: str = "list"):
    """A list cell written as JSON or as a Python literal."""
    text = text.strip()
    if text == "":
        return []
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise BadInput(path, f"{what} is neither JSON nor a Python literal list: {text[:60]!r}", line) from None
    if not isinstance(value, (list, tuple)):
        raise BadInput(path, f"{what} must be a list, got {type(value).__name__}", line)
    return list(value)


def check_box(box, path=None, line=None) -> Box:
    """A normalised xyxy box: 4 finite numbers in [0, 1] with x1 <= x2 and y1 <= y2."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise BadInput(path, f"box {box!r} must be [x1, y1, x2, y2]", line)
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise BadInput(path, f"box {box!r} must hold 4 numbers", line) from None
    if not all(math.isfinite(v) and -_BOX_TOL <= v <= 1 + _BOX_TOL for v in (x1, y1, x2, y2)):
        raise BadInput(path, f"box {box!r} is outside [0, 1] (boxes are normalised xyxy)", line)
    if x2 < x1 or y2 < y1:
        raise BadInput(path, f"box {box!r} has x2 < x1 or y2 < y1 (expected xyxy)", line)
    return [min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2)]


def check_boxes(boxes, path=None, line=None) -> list[Box]:
    if not isinstance(boxes, (list, tuple)):
        raise BadInput(path, f"boxes of a frame must be a list, got {type(boxes).__name__}", line)
    return [check_box(b, path, line) for b in boxes]


def _parse_row(cells: list[str], path, line: int) -> TrainingClip:
    if len(cells) == len(README_COLUMNS):
        row = dict(zip(README_COLUMNS, cells))
    elif len(cells) == len(AUTHORS_COLUMNS):
        row = dict(zip(AUTHORS_COLUMNS, cells))
    else:
        raise BadInput(path, f"expected {len(README_COLUMNS)} tab-separated columns "
                             f"(or {len(AUTHORS_COLUMNS)} with spu_id), got {len(cells)}", line)
    video_id = str(parse_video_id(row["video_id"].strip(), path, line))
    frames = [frame_id_from(str(f), path, line) for f in parse_list(row["frame_ids"], path, line, "frame list")]
    raw_boxes = parse_list(row["boxes"], path, line, "box list")
    if raw_boxes and len(raw_boxes) != len(frames):
        raise BadInput(path, f"{len(raw_boxes)} box lists for {len(frames)} frames", line)
    boxes = [check_boxes(b, path, line) for b in raw_boxes] if raw_boxes else [[] for _ in frames]
    for f in frames:
        if not f.startswith(video_id + "-"):
            raise BadInput(path, f"frame {f!r} does not belong to clip {video_id!r}", line)
    return TrainingClip(
        video_id=video_id, frame_ids=frames, boxes=boxes,
        image_id=parse_image_id(row["image_id"].strip(), path, line),
        **{k: row.get(k, "").strip() for k in ("image_title", "category_id", "category_name", "asr", "scale_type",
                                                "duration_type", "number_type", "spu_id")},
        line=line)


def read_training_videoinfo(path, problems: Problems | None = None) -> Iterator[TrainingClip]:
    """Stream the rows of a ``training_videoinfo*.txt``; bad rows raise, or are counted in ``problems``."""
    path = Path(path)
    try:
        f = open(path, "rb")  # decoded line by line: one bad byte costs its row, not the file
    except FileNotFoundError:
        raise BadInput(path, "file not found") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                try:
                    text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    raise BadInput(path, "not UTF-8 text (expected a tab-separated training_videoinfo row)",
                                   lineno) from None
                if text.strip():
                    yield _parse_row(text.split("\t"), path, lineno)
            except BadInput as err:
                if problems is None:
                    raise
                problems.add(err, "malformed_row")


def _cell(text) -> str:
    return str(text).replace("\t", " ").replace("\n", " ").replace("\r", " ")


def write_training_videoinfo(path, clips: Iterable[TrainingClip]) -> int:
    """Write clips in the README form (11 columns, JSON lists); returns the number of rows."""
    n = 0
    with atomic_write(path, newline="") as f:
        for c in clips:
            cells = [c.video_id, json.dumps(c.frame_ids), json.dumps(c.boxes), c.image_id, c.image_title,
                     c.category_id, c.category_name, c.asr, c.scale_type, c.duration_type, c.number_type]
            f.write("\t".join(_cell(x) for x in cells) + "\n")
            n += 1
    return n


def _read_id_lists(path, key_parser, value_parser, what: str, problems: Problems | None = None
                   ) -> dict[str, list[str]]:
    """A JSON map of id -> id list. A bad entry is left out and counted in ``problems`` (raised at once when there
    are none, or when they are strict), with the line of its key."""
    obj = read_json(path, expect=dict)
    out = {}
    line_of = JsonKeyLines(path)
    for key, values in obj.items():
        try:
            parsed = str(key_parser(key, path))
            if not isinstance(values, list):
                raise BadInput(path, f"{what} of {parsed!r} must be a list of image ids")
            out[parsed] = [value_parser(v, path) if isinstance(v, str) else _not_str(path, v) for v in values]
        except BadInput as err:
            if problems is None:
                raise
            problems.add(BadInput(path, err.message, line_of(str(key))), "bad_annotation")
    return out


def _not_str(path, v):
    raise BadInput(path, f"expected an image id string, got {v!r}")


def read_videoid_to_gtimage(path, problems: Problems | None = None) -> dict[str, list[str]]:
    """``{video_id: [image_id, ...]}``: any listed image is a correct answer."""
    return _read_id_lists(path, parse_video_id, parse_image_id, "ground-truth images", problems)


def read_liveid_to_gallery(path, problems: Problems | None = None) -> dict[str, list[str]]:
    """``{live_id: [image_id, ...]}``: the gallery a query of that live is ranked in."""
    return _read_id_lists(path, parse_live_id, parse_image_id, "gallery", problems)


class JsonKeyLines:
    """The line of a JSON object's key in its file, for an error message. Looked up only for bad entries and in
    file order (``json.load`` keeps it), so the file is scanned once however many entries are bad."""

    def __init__(self, path):
        self.path, self.data, self.pos, self.line = Path(path), None, 0, 1

    def __call__(self, key: str) -> int | None:
        if self.data is None:
            self.data = self.path.read_bytes()
        at = self.data.find(json.dumps(key, ensure_ascii=False).encode("utf-8"), self.pos)
        if at < 0:
            return None
        self.line += self.data.count(b"\n", self.pos, at)
        self.pos = at
        return self.line


def read_frameid_to_gtbox(path, problems: Problems | None = None) -> dict[str, list[Box]]:
    """``{frame_id: [[x1, y1, x2, y2], ...]}`` normalised; ``[]`` means the frame shows no product. A bad entry is
    left out and counted in ``problems`` (raised at once when there are none, or when they are strict)."""
    obj = read_json(path, expect=dict)
    out = {}
    line_of = JsonKeyLines(path)
    for key, boxes in obj.items():
        try:
            out[frame_id_from(key, path)] = check_boxes(boxes, path)
        except BadInput as err:
            err = BadInput(path, f"frame {str(key)[:80]!r}: {err.message}", line_of(str(key)))
            if problems is None:
                raise err from None
            problems.add(err, "bad_annotation")
    return out


def write_id_map(path, mapping: dict) -> None:
    write_json(path, mapping, indent=1)


def read_id_text(path, key_parser=check_safe_name) -> dict[str, str]:
    """``id<TAB>text`` files (ASR per video, title per image); a line without a tab has empty text."""
    path = Path(path)
    out = {}
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # a BOM is not part of the first id
            for lineno, text in enumerate(f, 1):
                text = text.rstrip("\r\n")
                if not text.strip():
                    continue
                key, _, value = text.partition("\t")
                out[key_parser(key.strip(), path, lineno) if key_parser is not check_safe_name
                    else check_safe_name(key.strip(), "id", path, lineno)] = value.strip()
    except FileNotFoundError:
        raise BadInput(path, "file not found") from None
    except UnicodeDecodeError:
        raise BadInput(path, "not UTF-8 text (expected id<TAB>text lines)") from None
    return out


def read_asr(path) -> dict[str, str]:
    return {str(k): v for k, v in read_id_text(path, lambda s, p, n: str(parse_video_id(s, p, n))).items()}


def read_titles(path) -> dict[str, str]:
    return read_id_text(path, parse_image_id)


def write_id_text(path, mapping: dict[str, str]) -> None:
    with atomic_write(path, newline="") as f:
        for key, value in mapping.items():
            f.write(f"{key}\t{_cell(value)}\n")
