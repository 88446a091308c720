"""The synthetic LPR4M-mini: complete layout, exact boxes, determinism, split hygiene, decodable mp4s."""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from lpr4m import annotations as ann
from lpr4m import render as R
from lpr4m.cli import run_main
from lpr4m.ids import parse_video_id
from lpr4m.images import load_rgb
from lpr4m.layout import Dataset
from lpr4m.synth import Mp4Writer, main, synthesize

TINY = dict(train_lives=1, test_lives=1, products_per_live=2, test_products_per_live=2, clips_per_product=(1, 1),
            train_clip_s=2, test_clip_s=(3, 3), video_fps=2, frame_size=(128, 96), image_size=64)


def _annotation_bytes(root: Path) -> dict[str, bytes]:
    files = sorted((root / "annotations").iterdir()) + [root / "synth_manifest.json"]
    return {p.name: p.read_bytes() for p in files}


def test_layout_is_complete(lpr4m_mini):
    ds = Dataset(lpr4m_mini)
    clips = list(ds.training_clips())
    assert len(clips) >= 30
    for clip in clips:
        assert len(clip.frame_ids) == len(clip.boxes) == parse_video_id(clip.video_id).duration_s
        for frame_id in clip.frame_ids:
            assert ds.training_frame_path(frame_id).is_file(), frame_id
        assert ds.training_image_path(clip.image_id).is_file()
        assert clip.scale_type in ("small", "medium", "large")
        assert clip.duration_type in ("short", "medium", "long")
        assert clip.number_type in ("single", "multiple")
        assert clip.image_title and clip.asr and clip.category_name
    assert sum(c.has_boxes for c in clips) == len(clips)

    test_clips = ds.test_clips()
    assert len(test_clips) == 12
    for clip in test_clips:
        assert clip.frame_paths, clip.video_id
        assert len(clip.frame_paths) == parse_video_id(clip.video_id).duration_s // 3
        assert all(b is not None for b in clip.boxes), "every query frame has a box entry ([] if not visible)"
        assert any(clip.boxes), "each query shows its product in at least one frame"
        assert (lpr4m_mini / "clips" / f"{clip.video_id}.mp4").is_file()
        assert set(clip.gt_image_ids) <= set(ds.live_galleries[clip.live_id])
        assert clip.video_id in ds.asr
    assert set(ds.gt_boxes) == {f for c in test_clips for f in c.frame_ids}
    for live_id, image_ids in ds.live_galleries.items():
        assert image_ids
        on_disk = {i for i, _, _ in ds.gallery(live_id)}
        assert on_disk == set(image_ids)
        for image_id in image_ids:
            assert ds.gallery_image_path(live_id, image_id, 0).is_file(), "main image -0 exists"
            assert image_id in ds.titles
    img = load_rgb(ds.gallery_image_path(*next((lv, ids[0]) for lv, ids in ds.live_galleries.items())))
    assert img.shape == (224, 224, 3)
    assert np.median(img[:8].reshape(-1, 3), axis=0).min() >= 235, "main shop image is on a white background"


def test_boxes_are_valid(lpr4m_mini):
    ds = Dataset(lpr4m_mini)
    boxes = [b for c in ds.training_clips() for frame in c.boxes for b in frame]
    boxes += [b for frame in ds.gt_boxes.values() for b in frame]
    arr = np.asarray(boxes)
    assert len(arr) > 200
    assert (arr >= 0).all() and (arr <= 1).all()
    assert (arr[:, 2] > arr[:, 0]).all() and (arr[:, 3] > arr[:, 1]).all()
    empty = [f for f, b in ds.gt_boxes.items() if not b] + \
        [f for c in ds.training_clips() for f, b in zip(c.frame_ids, c.boxes) if not b]
    assert empty, "some frames show no product (partial visible duration)"


def test_test_products_never_in_training(lpr4m_mini):
    ds = Dataset(lpr4m_mini)
    train_ids = {c.image_id for c in ds.training_clips()}
    gallery_ids = {i for ids in ds.live_galleries.values() for i in ids}
    assert train_ids and gallery_ids and not train_ids & gallery_ids
    train_lives = {c.live_id for c in ds.training_clips()}
    assert not train_lives & set(ds.live_galleries)
    manifest = json.loads((lpr4m_mini / "synth_manifest.json").read_text())
    specs = {p["image_id"]: p["spec"] for p in manifest["products"]}
    train_specs = {json.dumps(specs[i], sort_keys=True) for i in train_ids}
    assert not any(json.dumps(specs[i], sort_keys=True) in train_specs for i in gallery_ids)
    # hard negatives: some test products are look-alikes of another product of the same live
    assert any(p["lookalike_of"] for p in manifest["products"] if p["split"] == "test")


def test_same_seed_same_bytes(tmp_path):
    """Two runs in one process (so with different heap contents) give the same bytes, mp4 files included."""
    small = dict(TINY, frame_size=(320, 240), test_clip_s=(15, 15), video_fps=4)
    a, b = tmp_path / "a", tmp_path / "b"
    synthesize(a, seed=0, progress_bar=False, **small)
    junk = [np.random.default_rng(i).integers(0, 255, (240, 320, 3), dtype=np.uint8) for i in range(20)]
    synthesize(b, seed=0, progress_bar=False, **small)
    del junk
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert any(p.suffix == ".mp4" for p in files)
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_other_seed_differs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synthesize(a, seed=1, progress_bar=False, **TINY)
    synthesize(b, seed=2, progress_bar=False, **TINY)
    assert _annotation_bytes(a)["test_liveid_to_gallery.json"] != _annotation_bytes(b)["test_liveid_to_gallery.json"]


def test_mp4_decodes_and_matches_query_frames(lpr4m_mini):
    ds = Dataset(lpr4m_mini)
    for clip in ds.test_clips()[:4]:
        path = lpr4m_mini / "clips" / f"{clip.video_id}.mp4"
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            fps = float(stream.average_rate)
        assert fps == 4
        assert len(frames) == parse_video_id(clip.video_id).duration_s * fps
        assert frames[0].shape == (240, 320, 3)
        step = int(3 * fps)
        for k, frame_path in enumerate(clip.frame_paths):
            query = load_rgb(frame_path).astype(np.float32)
            same = np.abs(query - frames[k * step]).mean()
            other = np.abs(query - frames[(k * step + step // 2) % len(frames)]).mean()
            assert same < 8 and same < other, (clip.video_id, k, same, other)


def test_annotations_round_trip(lpr4m_mini, tmp_path):
    src = lpr4m_mini / "annotations"
    clips = list(ann.read_training_videoinfo(src / "training_videoinfo.txt"))
    ann.write_training_videoinfo(tmp_path / "training_videoinfo.txt", clips)
    ann.write_id_map(tmp_path / "test_videoid_to_gtimage.json", ann.read_videoid_to_gtimage(
        src / "test_videoid_to_gtimage.json"))
    ann.write_id_map(tmp_path / "test_liveid_to_gallery.json", ann.read_liveid_to_gallery(
        src / "test_liveid_to_gallery.json"))
    ann.write_id_map(tmp_path / "test_frameid2gtbox.json", ann.read_frameid_to_gtbox(src / "test_frameid2gtbox.json"))
    ann.write_id_text(tmp_path / "test_videoid_asr.txt", ann.read_asr(src / "test_videoid_asr.txt"))
    ann.write_id_text(tmp_path / "test_image_title.txt", ann.read_titles(src / "test_image_title.txt"))
    for p in sorted(tmp_path.iterdir()):
        assert p.read_bytes() == (src / p.name).read_bytes(), p.name


def _flat_scene(colour, **kw) -> R.ClipScene:
    """A scene without noise or lighting whose product is one flat colour (to find it in the pixels)."""
    W, H = 160, 120
    rng = np.random.default_rng(3)
    spec = R.random_spec(rng)
    base = R.draw_product(spec, 80)
    sprite = R.Sprite(base.alpha[..., None] * np.asarray(colour, np.float32), base.alpha)
    m = 6
    bg = np.full((H + 2 * m, W + 2 * m, 3), 128, np.float32)
    const = R.Track(np.ones(8), 5.0)
    args = dict(background=bg, margin=m, size_wh=(W, H), presenter=R.random_presenter(rng), sprite=sprite,
                hand_side=-1, grip="side", scale=R.Track(np.full(8, 0.5), 5.0), cx=R.Track(np.full(8, 0.45), 5.0),
                cy=R.Track(np.full(8, 0.5), 5.0), yaw=R.Track(np.linspace(-40, 40, 8), 2.0),
                pitch=R.Track(np.full(8, 10.0), 5.0), roll=R.Track(np.linspace(20, -20, 8), 2.0),
                cam_x=R.Track(np.zeros(8), 5.0), cam_y=R.Track(np.zeros(8), 5.0), light=const, absent=[(6.0, 8.0)],
                occluder=(2.0, 4.0), blur=0.0, light_map=np.ones((H, W, 3), np.float32), noise=np.zeros((H, W, 3),
                                                                                                         np.float32),
                noise_sigma=0.0, extras={"occ_y": 0.5, "occ_r": 0.4})
    args.update(kw)
    return R.ClipScene(**args)


@pytest.mark.parametrize("t", [0.0, 1.0, 2.5, 3.5, 5.0])
def test_box_matches_rendered_pixels(t):
    """Independent reference: render the product in two colours; where the frames differ is the product."""
    a = _flat_scene((255, 0, 255)).render(t)
    b = _flat_scene((0, 255, 0)).render(t)
    visible = np.abs(a.rgb[..., 1].astype(int) - b.rgb[..., 1].astype(int)) / 255.0 >= 0.5
    ys, xs = np.nonzero(visible)
    assert a.box == b.box and a.box is not None
    H, W = visible.shape
    x1, y1, x2, y2 = a.box
    assert abs(x1 * W - xs.min()) <= 1 and abs(x2 * W - (xs.max() + 1)) <= 1
    assert abs(y1 * H - ys.min()) <= 1 and abs(y2 * H - (ys.max() + 1)) <= 1


def test_box_clipped_occluded_and_absent():
    # product half outside the frame: box is clipped at the edge
    res = _flat_scene((255, 0, 255), cx=R.Track(np.full(8, 0.0), 5.0), occluder=None).render(0.0)
    assert res.box is not None and res.box[0] == 0.0
    # put away: no product, no box
    assert _flat_scene((255, 0, 255)).render(7.0).box is None
    # fully hidden behind the other hand: no box
    hidden = _flat_scene((255, 0, 255), extras={"occ_y": 0.5, "occ_r": 4.0}).render(3.0)
    assert hidden.box is None and hidden.visible_fraction == 0.0


def test_cli_writes_json_and_refuses_non_empty(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main([str(out), "--seed", "4", "--lives", "1", "--train-lives", "1", "--products", "2",
                 "--test-products", "2", "--clips-per-product", "1", "--train-clip-s", "2", "--test-clip-s", "3",
                 "--fps", "2", "--frame-size", "128x96", "--image-size", "64"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["products"] == 2 and summary["test"]["clips"] == 2
    assert summary["test"]["video_frames"] == 2 * 3 * 2
    assert Dataset(out).test_clips()[0].frame_paths
    assert not list(tmp_path.glob(".*partial")), "staging folder removed"
    before = _annotation_bytes(out)
    assert run_main(main, [str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert _annotation_bytes(out) == before, "nothing already written is lost"
    assert run_main(main, [str(tmp_path / "x"), "--frame-size", "129x96"]) == 2
    assert run_main(main, [str(tmp_path / "y"), "--backgrounds", str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def test_real_backgrounds(tmp_path):
    """Images and videos from --backgrounds become rooms; an unreadable file is skipped and counted."""
    bg = tmp_path / "bg"
    bg.mkdir()
    rng = np.random.default_rng(0)
    from lpr4m.images import save_jpeg
    save_jpeg(bg / "room.jpg", rng.integers(0, 255, (90, 160, 3), dtype=np.uint8))
    writer = Mp4Writer(bg / "street.mp4", (96, 64), 10)
    for i in range(12):
        writer.write(np.full((64, 96, 3), 20 * i, np.uint8))
    writer.close()
    (bg / "broken.mp4").write_bytes(b"not a video")
    summary = synthesize(tmp_path / "ds", seed=5, progress_bar=False, background_dir=str(bg),
                         real_background_share=1.0, **TINY)
    assert summary["backgrounds"]["frames"] >= 2
    assert summary["backgrounds"]["problems"]["by_kind"] == {"bad_background": 1}
    assert Dataset(tmp_path / "ds").test_clips()


def test_shared_videos_as_backgrounds(shared_data, tmp_path):
    videos = shared_data / "videos"
    if not (videos / "carphone_pristine.mp4").is_file():
        pytest.skip("carphone_pristine.mp4 not in shared data")
    bg = tmp_path / "bg"
    bg.mkdir()
    (bg / "carphone_pristine.mp4").symlink_to(videos / "carphone_pristine.mp4")
    summary = synthesize(tmp_path / "ds", seed=6, progress_bar=False, background_dir=str(bg),
                         real_background_share=1.0, **TINY)
    assert summary["backgrounds"]["frames"] >= 1 and summary["backgrounds"]["problems"] is None
