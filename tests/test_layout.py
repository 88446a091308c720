"""lpr4m.layout.Dataset on a tiny LPR4M root written with the annotation writers.

``make_dataset`` is also used by test_stats.py and test_bad_input.py (it is small, deterministic and fast).
"""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from lpr4m import annotations as ann
from lpr4m.errors import BadInput
from lpr4m.images import load_rgb, save_jpeg
from lpr4m.layout import Dataset


def uid(i: int) -> str:
    return str(uuid.UUID(int=0xC0FFEE000 + i))


def _jpeg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    save_jpeg(path, rng.integers(0, 255, (16, 20, 3), dtype=np.uint8))


def make_dataset(root: Path, n_train: int = 3, frames_per_clip: int = 3, n_test: int = 2,
                 n_products: int = 3) -> dict:
    """A complete tiny LPR4M root; returns the ids it holds and the counts stats must report."""
    products = [uid(100 + i) for i in range(n_products)]
    train_live, test_live = uid(1), uid(2)
    clips = []
    for c in range(n_train):
        video_id = f"{train_live}-{c * 10000}-{c * 10000 + 5000}"
        frames = [f"{video_id}-{k:04d}" for k in range(frames_per_clip)]
        boxes = [[[0.1, 0.1, 0.6, 0.7]] if k % 2 == 0 else [] for k in range(frames_per_clip)]
        clips.append(ann.TrainingClip(video_id, frames, boxes, products[c % n_products], f"product {c}", "3",
                                      "drinks", "asr text"))
        for k, f in enumerate(frames):
            _jpeg(root / "training_video" / video_id / f"{f}.jpg", c * 100 + k)
    for i, p in enumerate(products):
        _jpeg(root / "training_image" / f"{p}.jpg", 1000 + i)
    ann.write_training_videoinfo(root / "annotations" / "training_videoinfo.txt", clips)

    gt, gtbox, test_ids = {}, {}, []
    for c in range(n_test):
        video_id = f"{test_live}-{c * 30000}-{c * 30000 + 9000}"
        test_ids.append(video_id)
        gt[video_id] = [products[c % n_products]]
        for k in range(3):
            fid = f"{video_id}-{k:04d}"
            _jpeg(root / "query" / video_id / f"{fid}.jpg", 2000 + c * 10 + k)
            gtbox[fid] = [[0.2, 0.2, 0.5, 0.5]] if k else []
    for i, p in enumerate(products):
        _jpeg(root / "gallery" / test_live / f"{p}-0.jpg", 3000 + i)
    _jpeg(root / "gallery" / test_live / f"{products[0]}-1.jpg", 3100)
    a = root / "annotations"
    ann.write_id_map(a / "test_videoid_to_gtimage.json", gt)
    ann.write_id_map(a / "test_liveid_to_gallery.json", {test_live: products})
    ann.write_id_map(a / "test_frameid2gtbox.json", gtbox)
    ann.write_id_text(a / "test_videoid_asr.txt", {v: "hello" for v in test_ids})
    ann.write_id_text(a / "test_image_title.txt", {p: f"product {i}" for i, p in enumerate(products)})
    return dict(products=products, train_live=train_live, test_live=test_live, clips=clips, test_ids=test_ids,
                gt=gt, gtbox=gtbox, counts=dict(
                    training_clips=n_train, training_frames=n_train * frames_per_clip,
                    boxes=n_train * ((frames_per_clip + 1) // 2), training_images=min(n_train, n_products),
                    test_clips=n_test, query_frames=3 * n_test, gtbox_frames=3 * n_test, gallery_lives=1,
                    gallery_images=n_products))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    return root, make_dataset(root)


def test_training_side(tiny):
    root, made = tiny
    ds = Dataset(root)
    clips = list(ds.training_clips())
    assert clips == made["clips"]
    for clip in clips:
        for f in clip.frame_ids:
            assert ds.training_frame_path(f).is_file()
        assert ds.training_image_path(clip.image_id).is_file()
    assert ds.training_frame_path(clips[0].frame_ids[1]) == \
        root / "training_video" / clips[0].video_id / f"{clips[0].frame_ids[1]}.jpg"


def test_test_side(tiny):
    root, made = tiny
    ds = Dataset(root)
    test = ds.test_clips()
    assert [c.video_id for c in test] == made["test_ids"]
    c0 = test[0]
    assert c0.live_id == made["test_live"] and c0.gt_image_ids == made["gt"][c0.video_id]
    assert c0.frame_ids == [f"{c0.video_id}-{k:04d}" for k in range(3)]  # sorted, frame order
    assert c0.boxes == [made["gtbox"][f] for f in c0.frame_ids]
    assert ds.query_frame_path(c0.frame_ids[0]) == c0.frame_paths[0]
    assert load_rgb(c0.frame_paths[0]).shape == (16, 20, 3)
    assert ds.asr[c0.video_id] == "hello" and ds.titles[made["products"][0]] == "product 0"


def test_gallery_views_and_main_only(tiny):
    root, made = tiny
    ds = Dataset(root)
    live, products = made["test_live"], made["products"]
    full = ds.gallery(live)
    assert sorted((i, v) for i, v, _ in full) == sorted([(p, 0) for p in products] + [(products[0], 1)])
    assert sorted(i for i, _, _ in ds.gallery(live, main_only=True)) == sorted(products)
    assert ds.gallery_image_path(live, products[0], 1).is_file()
    assert ds.gallery(uid(999)) == []


def test_paths_refuse_unsafe_ids(tiny):
    ds = Dataset(tiny[0])
    for bad in ("..", "a/b", "x\0"):
        with pytest.raises(BadInput, match="unsafe"):
            ds.path("query", bad)
    with pytest.raises(BadInput):
        ds.training_frame_path("../../etc/passwd")
    with pytest.raises(BadInput):
        ds.gallery_image_path(uid(2), "../x")


def test_annotation_lookup(tmp_path):
    (tmp_path / "annotations").mkdir()
    for name in ("test_videoid_to_gtimage_v2.json", "test_videoid_to_gtimage.json"):
        ann.write_id_map(tmp_path / "annotations" / name, {})
    ds = Dataset(tmp_path)
    assert ds.annotation("gtimage").name == "test_videoid_to_gtimage.json"  # shortest name wins
    assert ds.annotation("gtbox", required=False) is None and ds.gt_boxes == {}
    with pytest.raises(BadInput, match="missing training_videoinfo"):
        ds.annotation("training_videoinfo")
    with pytest.raises(BadInput, match="dataset root not found"):
        Dataset(tmp_path / "nope")
