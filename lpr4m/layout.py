"""The LPR4M layout on disk: where each file lives, found by id, never outside the dataset root."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

from lpr4m import annotations as ann
from lpr4m.errors import BadInput, Problems
from lpr4m.ids import IMAGE_SUFFIXES, check_safe_name, parse_frame_id, parse_gallery_name, parse_video_id

ANNOTATIONS = {
    "training_videoinfo": "training_videoinfo*.txt",
    "gtimage": "test_videoid_to_gtimage*.json",
    "gallery": "test_liveid_to_gallery*.json",
    "gtbox": "test_frameid2gtbox*.json",
    "asr": "test_videoid_asr*.txt",
    "titles": "test_image_title*.txt",
}


@dataclass
class TestClip:
    """A query clip of the test split: its frames on disk (in order), answers, gallery and boxes."""

    video_id: str
    live_id: str
    frame_paths: list[Path]
    gt_image_ids: list[str]
    boxes: list[list[ann.Box] | None] = field(default_factory=list)  # per frame; None = frame not annotated

    @property
    def frame_ids(self) -> list[str]:
        return [p.stem for p in self.frame_paths]


class Dataset:
    """An LPR4M root. Paths are built from checked ids, so no annotation can point outside ``root``.

    >>> ds = Dataset("data/lpr4m-mini")
    >>> clip = ds.test_clips()[0]; ds.gallery(clip.live_id)[:1]
    """

    def __init__(self, root, problems: Problems | None = None):
        self.root = Path(root)
        self.problems = problems if problems is not None else Problems()  # where bad annotation entries are counted
        if not self.root.is_dir():
            raise BadInput(self.root, ("not a folder" if self.root.exists() else "dataset root not found")
                           + " (expected an LPR4M folder with annotations/)")

    # -- paths -------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*(check_safe_name(p, "path component") for p in parts))

    def annotation(self, key: str, required: bool = True) -> Path | None:
        """The annotation file for ``key`` (see ANNOTATIONS); the shortest matching name wins."""
        hits = sorted((self.root / "annotations").glob(ANNOTATIONS[key]), key=lambda p: (len(p.name), p.name))
        if not hits and required:
            raise BadInput(self.root / "annotations", f"missing {ANNOTATIONS[key]}")
        return hits[0] if hits else None

    def training_frame_path(self, frame_id: str) -> Path:
        video_id, _ = parse_frame_id(frame_id)
        return self.path("training_video", video_id, frame_id + ".jpg")

    def query_frame_path(self, frame_id: str) -> Path:
        video_id, _ = parse_frame_id(frame_id)
        return self.path("query", video_id, frame_id + ".jpg")

    def training_image_path(self, image_id: str) -> Path:
        return self.path("training_image", image_id + ".jpg")

    def gallery_image_path(self, live_id: str, image_id: str, view: int = 0) -> Path:
        return self.path("gallery", live_id, f"{image_id}-{view}.jpg")

    # -- annotations ---------------------------------------------------------------------------------------
    def training_clips(self, problems: Problems | None = None) -> Iterator[ann.TrainingClip]:
        return ann.read_training_videoinfo(self.annotation("training_videoinfo"), problems)

    def training_image_ids(self) -> set[str]:
        """The products (shop image ids) of the training split: what "seen in training" means."""
        if self.annotation("training_videoinfo", required=False) is None:
            raise BadInput(self.root / "annotations", "no training_videoinfo*.txt: not a training split")
        return {c.image_id for c in self.training_clips(self.problems)}

    @cached_property
    def gt_images(self) -> dict[str, list[str]]:
        return ann.read_videoid_to_gtimage(self.annotation("gtimage"), self.problems)

    @cached_property
    def live_galleries(self) -> dict[str, list[str]]:
        return ann.read_liveid_to_gallery(self.annotation("gallery"), self.problems)

    @cached_property
    def gt_boxes(self) -> dict[str, list[ann.Box]]:
        path = self.annotation("gtbox", required=False)
        return ann.read_frameid_to_gtbox(path, self.problems) if path else {}

    @cached_property
    def titles(self) -> dict[str, str]:
        path = self.annotation("titles", required=False)
        return ann.read_titles(path) if path else {}

    @cached_property
    def asr(self) -> dict[str, str]:
        path = self.annotation("asr", required=False)
        return ann.read_asr(path) if path else {}

    def query_frames(self, video_id: str) -> list[Path]:
        """The clip's frames under ``query/<video_id>/``, in frame order."""
        folder = self.path("query", video_id)
        if not folder.is_dir():
            return []
        return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                      key=lambda p: p.stem)

    def test_clips(self) -> list[TestClip]:
        """Every test query in ``test_videoid_to_gtimage`` order (a clip with no frames keeps an empty list)."""
        boxes = self.gt_boxes
        clips = []
        for video_id, gt in self.gt_images.items():
            frames = self.query_frames(video_id)
            clips.append(TestClip(video_id, parse_video_id(video_id).live_id, frames, gt,
                                  [boxes.get(p.stem) for p in frames]))
        return clips

    def gallery_files(self, live_id: str) -> list[tuple[str, int, Path]]:
        """(image_id, view, path) for each image file under ``gallery/<live_id>/``."""
        folder = self.path("gallery", live_id)
        if not folder.is_dir():
            return []
        out = []
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    image_id, view = parse_gallery_name(p.stem, p)
                except BadInput:
                    continue
                out.append((image_id, view, p))
        return out

    def gallery(self, live_id: str, main_only: bool = False) -> list[tuple[str, int, Path]]:
        """The shop images of a live's gallery that the annotation lists and that exist on disk."""
        listed = set(self.live_galleries.get(live_id, []))
        return [(i, v, p) for i, v, p in self.gallery_files(live_id)
                if i in listed and (v == 0 or not main_only)]
