"""Pseudo-labels (``detector/pseudo_label.py``): the bundled detector as teacher on the mini with its boxes taken
away, checked against the boxes it lost."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from lpr4m.annotations import write_training_videoinfo
from lpr4m.cli import run_main
from lpr4m.layout import Dataset

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "weights" / "detector.onnx"


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def unboxed(lpr4m_mini, tmp_path_factory):
    """The mini's training clips without their boxes (frames linked), and the boxes they had."""
    root = tmp_path_factory.mktemp("unboxed")
    (root / "annotations").mkdir()
    os.symlink(lpr4m_mini / "training_video", root / "training_video")
    clips = list(Dataset(lpr4m_mini).training_clips())
    truth = {f: b for c in clips for f, b in zip(c.frame_ids, c.boxes)}
    write_training_videoinfo(root / "annotations" / "training_videoinfo.txt",
                             [dataclasses.replace(c, boxes=[[] for _ in c.frame_ids]) for c in clips])
    return root, truth


def test_teacher_boxes_match_the_lost_boxes_and_the_root_trains(unboxed, tmp_path):
    from detector.dataset import build_yolo_dataset
    from detector.pseudo_labels import main
    root, truth = unboxed
    out = tmp_path / "pl"
    held_out = next(iter(Dataset(root).training_clips())).image_id
    (tmp_path / "exclude.txt").write_text(f"# a test product\n{held_out}\n\n")
    assert run_main(main, ["--data", str(root), "--weights", str(TEACHER), "--out", str(out), "--min-score", "0.5",
                           "--exclude-products", str(tmp_path / "exclude.txt"),
                           "--out-json", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    ds = Dataset(out)
    labels = {f: b for c in ds.training_clips() for f, b in zip(c.frame_ids, c.boxes)}
    labels.update(ds.gt_boxes)
    assert summary["frames_labelled"] == len(labels) > 0.5 * sum(bool(b) for b in truth.values())
    assert summary["val_clips"] >= 1 and summary["median_score"] >= 0.5
    assert all(len(b) == 1 for b in labels.values())  # the best box of each kept frame, nothing for the rest
    ious = [_iou(b[0], truth[f][0]) if truth[f] else 0.0 for f, b in labels.items()]
    assert sum(i >= 0.5 for i in ious) >= 0.9 * len(ious)  # the teacher's boxes are the products
    excluded = {f for c in Dataset(root).training_clips() if c.image_id == held_out for f in c.frame_ids}
    assert excluded and excluded.isdisjoint(labels)
    assert summary["excluded_products"] == 1 and held_out not in {c.image_id for c in ds.training_clips()}
    train_clips = {c.video_id for c in ds.training_clips()}
    val_clips = {p.name for p in (out / "query").iterdir()}
    assert train_clips.isdisjoint(val_clips) and (out / "query" / next(iter(val_clips))).is_symlink()
    data = build_yolo_dataset(ds, tmp_path / "cache", workers=1)
    assert data.manifest["train"]["frames"] + data.manifest["val"]["frames"] == len(labels)


def test_no_confident_box_and_bad_output_exit_2(unboxed, tmp_path, capsys):
    from detector.pseudo_labels import main
    root, _ = unboxed
    argv = ["--data", str(root), "--weights", str(TEACHER), "--min-score", "1.0"]
    assert run_main(main, [*argv, "--out", str(tmp_path / "x")]) == 2
    assert "no training frame got a box scoring >= 1.0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    assert run_main(main, ["--data", str(root), "--weights", str(TEACHER), "--out", str(tmp_path / "full")]) == 2
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"
