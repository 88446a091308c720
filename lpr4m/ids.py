"""LPR4M ids (see DESIGN.md) and the checks that keep every id a plain file name.

    live_id   = 5 dash-separated fields (a UUID)
    video_id  = live_id-start_ms-end_ms
    frame_id  = video_id-NNNN
    image_id  = 5 dash-separated fields; gallery files are <image_id>-<view>.jpg (view 0 = main image)
"""
from __future__ import annotations

import posixpath
import re
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from lpr4m.errors import BadInput

_FIELD = r"[0-9A-Za-z]+"
_UUID = rf"{_FIELD}(?:-{_FIELD}){{4}}"
LIVE_ID_RE = re.compile(rf"^{_UUID}$")
IMAGE_ID_RE = LIVE_ID_RE
VIDEO_ID_RE = re.compile(rf"^(?P<live>{_UUID})-(?P<start>\d+)-(?P<end>\d+)$")
FRAME_ID_RE = re.compile(rf"^(?P<video>{_UUID}-\d+-\d+)-(?P<index>\d+)$")
GALLERY_NAME_RE = re.compile(rf"^(?P<image>{_UUID})-(?P<view>\d+)$")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class VideoId(NamedTuple):
    live_id: str
    start_ms: int
    end_ms: int

    @property
    def duration_s(self) -> float:
        return max(0, self.end_ms - self.start_ms) / 1000.0

    def __str__(self) -> str:
        return f"{self.live_id}-{self.start_ms}-{self.end_ms}"


def check_safe_name(name: str, what: str = "id", path=None, line: int | None = None) -> str:
    """Refuse anything that could leave its folder when used as a file name (``/``, ``..``, NUL, ...)."""
    if not isinstance(name, str) or not name or name in (".", "..") or name.startswith(".") \
            or any(c in name for c in ("/", "\\", "\0")) or ".." in name:
        raise BadInput(path, f"unsafe {what} {name!r}: ids must be plain names without '/', '..' or NUL", line)
    return name


def _match(regex: re.Pattern, text: str, what: str, path=None, line=None) -> re.Match:
    check_safe_name(text, what, path, line)
    m = regex.match(text)
    if m is None:
        raise BadInput(path, f"malformed {what} {text!r}", line)
    return m


def parse_live_id(text: str, path=None, line=None) -> str:
    return _match(LIVE_ID_RE, text, "live_id (expected 5 dash-separated fields)", path, line).group(0)


def parse_image_id(text: str, path=None, line=None) -> str:
    return _match(IMAGE_ID_RE, text, "image_id (expected 5 dash-separated fields)", path, line).group(0)


def parse_video_id(text: str, path=None, line=None) -> VideoId:
    m = _match(VIDEO_ID_RE, text, "video_id (expected live_id-start_ms-end_ms)", path, line)
    return VideoId(m["live"], int(m["start"]), int(m["end"]))


def parse_frame_id(text: str, path=None, line=None) -> tuple[str, int]:
    """``frame_id`` -> (video_id, frame index)."""
    m = _match(FRAME_ID_RE, text, "frame_id (expected video_id-NNNN)", path, line)
    return m["video"], int(m["index"])


def frame_id_from(text: str, path=None, line=None) -> str:
    """A frame id, or the authors' variant that stores a frame *path*: keep the file stem, check it."""
    name = posixpath.basename(text.replace("\\", "/").strip())
    stem = name.rsplit(".", 1)[0] if name.lower().endswith(IMAGE_SUFFIXES) else name
    parse_frame_id(stem, path, line)
    return stem


def parse_gallery_name(stem: str, path=None, line=None) -> tuple[str, int]:
    """``<image_id>-<view>`` (a gallery file stem) -> (image_id, view)."""
    m = _match(GALLERY_NAME_RE, stem, "gallery image name (expected <image_id>-<view>)", path, line)
    return m["image"], int(m["view"])


class UrlTarget(NamedTuple):
    """Where a downloaded sample belongs in the LPR4M layout, as parts relative to the dataset root."""

    kind: str  # training_frame | query_frame | gallery_image | training_image
    parts: tuple[str, ...]

    @property
    def relpath(self) -> str:
        return "/".join(self.parts)


def target_from_url(url: str) -> UrlTarget:
    """Place a sample by its URL: the ids are the file stem (and, for gallery images, the parent folder).

    LPR4M's URLs end like the layout itself (``.../training_video/<video_id>/<frame_id>.jpg``,
    ``.../gallery/<live_id>/<image_id>-0.jpg``); the split comes from the folder names when present, else from
    the id's shape (a frame of an unknown split is a training frame).
    """
    segments = [unquote(s) for s in urlsplit(url).path.split("/") if s]
    if not segments:
        raise BadInput(None, f"URL {url!r} has no file name")
    name = segments[-1]
    stem = name.rsplit(".", 1)[0] if "." in name else name
    check_safe_name(stem, "file name in URL")
    folders = set(segments[:-1])
    if FRAME_ID_RE.match(stem):
        video_id, _ = parse_frame_id(stem)
        split = "query" if folders & {"query", "test_video", "test"} else "training_video"
        return UrlTarget("query_frame" if split == "query" else "training_frame", (split, video_id, stem + ".jpg"))
    if GALLERY_NAME_RE.match(stem) and len(segments) >= 2 and LIVE_ID_RE.match(segments[-2]):
        return UrlTarget("gallery_image", ("gallery", parse_live_id(segments[-2]), stem + ".jpg"))
    if IMAGE_ID_RE.match(stem):
        return UrlTarget("training_image", ("training_image", stem + ".jpg"))
    raise BadInput(None, f"URL {url!r}: file name {name!r} is not an LPR4M frame, gallery or shop image id")
