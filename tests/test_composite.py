"""Catalogue composites (``python -m lpr4m composite``): cut-outs, exact boxes, splits by product, determinism and
bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lpr4m import render as R
from lpr4m.cli import run_main
from lpr4m.composite import _present, cut_out, main
from lpr4m.layout import Dataset


def _packshot(size=(160, 200)) -> tuple[np.ndarray, np.ndarray]:
    """A drawn product on white, and its silhouette."""
    sprite = R.draw_product(R.random_spec(np.random.default_rng(3)), height=size[1] - 40)
    w, h = sprite.size
    img = np.full((size[1], size[0], 3), 255.0, np.float32)
    R.over(img, sprite.rgb, sprite.alpha, (size[0] - w) // 2, 20)
    mask = np.zeros(img.shape[:2], bool)
    mask[20:20 + h, (size[0] - w) // 2:(size[0] - w) // 2 + w] = sprite.alpha >= 0.5
    return img.astype(np.uint8), mask


def test_cut_out_follows_the_outline_of_a_packshot_and_keeps_a_photo_whole():
    img, mask = _packshot()
    sprite, kind = cut_out(img)
    assert kind == "cutout"
    ys, xs = np.nonzero(mask)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    assert 0 <= sprite.size[0] - w <= 2 and 0 <= sprite.size[1] - h <= 2  # the anti-aliased rim at most
    cut = sprite.alpha >= 0.5
    inside = np.zeros(cut.shape, bool)
    inside[:h, :w] = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    dy, dx = np.nonzero(cut)[0].min(), np.nonzero(cut)[1].min()
    inside = np.roll(inside, (dy, dx), axis=(0, 1))
    assert (cut & inside).sum() / (cut | inside).sum() > 0.9  # IoU with the drawn silhouette
    photo = np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    sprite, kind = cut_out(photo)
    assert kind == "card" and sprite.size == (90, 120) and sprite.alpha.min() == 1


@pytest.mark.parametrize("seed", range(12))
def test_box_is_the_extent_of_the_visible_product(seed):
    """A pure green card on grey: the box must be exactly where green pixels are (hand, arm and shadow are not
    green: skin has red above green)."""
    card = R.Sprite(np.zeros((120, 80, 3), np.float32) + np.array([0, 255, 0], np.float32), np.ones((120, 80),
                                                                                                    np.float32))
    canvas = np.full((240, 320, 3), 128, np.float32)
    rng = np.random.default_rng(seed)
    box = _present(canvas, card, rng)
    green = (canvas[..., 1] > 140) & (canvas[..., 0] < 90) & (canvas[..., 2] < 90)
    if box is None:
        assert green.sum() == 0
        return
    ys, xs = np.nonzero(green)
    got = np.array(box) * [320, 240, 320, 240]
    want = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert np.abs(got - want).max() <= 3, (got, want)


def _inputs(tmp_path, lpr4m_mini):
    products = tmp_path / "products"
    products.mkdir()
    for i in range(4):
        img, _ = _packshot((120 + 10 * i, 160))
        Image.fromarray(img).save(products / f"item {i}.png")
    (products / "broken.jpg").write_bytes(b"not a jpeg")
    (products / "notes.txt").write_text("ignored")
    backgrounds = tmp_path / "bgs"
    backgrounds.mkdir()
    Image.fromarray(np.full((200, 300, 3), 90, np.uint8)).save(backgrounds / "wall.jpg")
    (backgrounds / "bad.mp4").write_bytes(b"\0" * 64)
    video = sorted((lpr4m_mini / "clips").glob("*.mp4"))[0]
    return products, backgrounds, video


def test_composite_layout_splits_and_determinism(lpr4m_mini, tmp_path):
    products, backgrounds, video = _inputs(tmp_path, lpr4m_mini)
    args = ["--products", str(products), "--backgrounds", str(backgrounds), "--test-backgrounds", str(video),
            "--clips", "8", "--frames-per-clip", "3", "--frame-size", "160x120", "--per-video", "2",
            "--test-products", "0.5"]
    out = tmp_path / "a.json"
    assert run_main(main, [str(tmp_path / "a"), *args, "--workers", "2", "--out-json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["products"] == {"cutout": 4, "card": 0, "total": 4}
    assert summary["problems"]["by_kind"] == {"bad_product_image": 1, "bad_background": 1}
    assert summary["train"]["products"] == summary["test"]["products"] == 2
    ds = Dataset(tmp_path / "a")
    clips = list(ds.training_clips())
    train_ids = {c.image_id for c in clips}
    test_ids = {i for ids in ds.gt_images.values() for i in ids}
    assert len(train_ids) == 2 and train_ids.isdisjoint(test_ids)  # split by product
    from lpr4m.composite import _STATE, ClipJob, render_clip, load_products
    from lpr4m.errors import Problems
    products = load_products([products], Problems())
    shown, other = [i for i, p in enumerate(products) if p.image_id in train_ids]
    held_out = [i for i, p in enumerate(products) if p.image_id in test_ids]
    drawn = []
    _STATE.update(seed=0, products=products, splits={"train": [shown, other], "test": held_out}, root=str(tmp_path),
                  backgrounds={"train": [np.zeros((150, 200, 3), np.uint8)]}, size_wh=(160, 120),
                  frames_per_clip=1, empty=0.0)
    import lpr4m.composite as comp
    real = comp._sprite
    try:
        comp._sprite = lambda path: drawn.append(path) or real(path)
        for k in range(12):  # distractors come from the clip's own split only
            render_clip(ClipJob(k, "train", f"x-{k}", shown, "frames"))
    finally:
        comp._sprite = real
        _STATE.clear()
    assert products[other].source in drawn and not {products[i].source for i in held_out} & set(drawn)
    assert sum(len(c.frame_ids) for c in clips) == summary["train"]["frames"]
    for c in clips:
        assert all(ds.training_frame_path(f).is_file() for f in c.frame_ids)
        assert ds.training_image_path(c.image_id).is_file()
        for boxes in c.boxes:
            for x1, y1, x2, y2 in boxes:
                assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
    assert len(ds.gt_boxes) == summary["test"]["frames"]
    assert sum(bool(b) for b in ds.gt_boxes.values()) == summary["test"]["boxes"]
    for clip in ds.test_clips():
        assert {i for i, _, _ in ds.gallery(clip.live_id)} >= set(ds.gt_images[clip.video_id])
    # the same seed gives the same frames and boxes, whatever the number of workers
    assert run_main(main, [str(tmp_path / "b"), *args, "--workers", "1", "--out-json", str(tmp_path / "b.json")]) == 0
    for a in sorted((tmp_path / "a").rglob("*")):
        b = tmp_path / "b" / a.relative_to(tmp_path / "a")
        if a.is_file() and a.name != "composite_manifest.json":
            assert a.read_bytes() == b.read_bytes(), a


def test_composite_trains_unchanged_and_refuses_bad_input(mini_composite, lpr4m_mini, tmp_path, capsys):
    from detector.dataset import build_yolo_dataset
    data = build_yolo_dataset(Dataset(mini_composite), tmp_path / "cache", workers=1)
    assert data.manifest["train"]["frames"] > 0 and data.manifest["val"]["frames"] > 0
    products, backgrounds, video = _inputs(tmp_path, lpr4m_mini)
    (tmp_path / "empty").mkdir()
    common = ["--backgrounds", str(video), "--clips", "2", "--frame-size", "160x120"]
    cases = {
        "no shop images found": ["--products", str(tmp_path / "empty"), *common],
        "products folder not found": ["--products", str(tmp_path / "nope"), *common],
        "broken.jpg": ["--products", str(products), "--strict", *common],
        "no readable background": ["--products", str(products), "--backgrounds", str(tmp_path / "empty"),
                                   "--clips", "2"],
        "already exists": ["--products", str(products), *common],
    }
    (tmp_path / "out-existing").mkdir()
    (tmp_path / "out-existing" / "keep.txt").write_text("mine")
    for expected, argv in cases.items():
        out = tmp_path / ("out-existing" if expected == "already exists" else "out")
        assert run_main(main, [str(out), *argv]) == 2, expected
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) >= 1 and expected in err[-1], (expected, err)
        assert "Traceback" not in "".join(err)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial"))  # nothing half-written
    assert (tmp_path / "out-existing" / "keep.txt").read_text() == "mine"


def test_distractors_and_empty_frames_carry_no_box():
    """Products standing in the scene are drawn but never boxed; only the presented one is."""
    from lpr4m.composite import compose_frame
    rng = np.random.default_rng(0)
    background = np.full((144, 192, 3), 60, np.uint8)
    sprite = R.Sprite(np.full((50, 30, 3), 250, np.float32), np.ones((50, 30), np.float32))
    drawn = 0
    for _ in range(6):
        rgb, box = compose_frame(rng, background, None, [sprite, sprite], (160, 120))
        assert box is None and rgb.shape == (120, 160, 3)
        drawn += int((rgb > 140).any())
    assert drawn >= 3  # the distractors are there (bright on a dark wall)
    boxes = [compose_frame(rng, background, sprite, [], (160, 120))[1] for _ in range(6)]
    assert sum(b is not None for b in boxes) >= 4


def test_background_frames_stay_bounded(lpr4m_mini):
    """However many recordings are given, at most max_frames frames are held: files spread over, fewer per file."""
    from lpr4m.composite import load_backgrounds
    from lpr4m.errors import Problems
    videos = sorted((lpr4m_mini / "clips").glob("*.mp4"))
    assert len(videos) >= 3
    frames = load_backgrounds(videos, (64, 48), per_video=5, problems=Problems(), max_frames=2)
    assert len(frames) == 2 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    assert len(load_backgrounds(videos[:2], (64, 48), per_video=3, problems=Problems(), max_frames=100)) == 6


def test_a_dataset_inside_a_products_folder_is_not_read_as_products(tmp_path, caplog):
    """An earlier composite moved into the shop-image folder once turned its frames into 16 extra 'products'."""
    from lpr4m.composite import find_product_files
    products = tmp_path / "shop"
    products.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(products / "red.jpg")
    nested = products / "old-composite"
    (nested / "annotations").mkdir(parents=True)
    (nested / "query" / "v1").mkdir(parents=True)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(nested / "query" / "v1" / "0.jpg")
    assert [title for _, title, _ in find_product_files([products])] == ["red"]
    assert "skipping" in caplog.text and "old-composite" in caplog.text
