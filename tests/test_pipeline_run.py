"""run.py end to end on generated clips (JSON, HTML, segments, detector on/off), bad inputs, evaluate.py vs the
retriever's evaluation, and the pure parts (segmentation, streaming, timing line)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from test_pipeline_index import tiny_embedder_weights, untrained_detector_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread", "isolated_cache")


@pytest.fixture(scope="module")
def emb_weights(tmp_path_factory) -> Path:
    return tiny_embedder_weights(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def other_emb_weights(tmp_path_factory) -> Path:
    return tiny_embedder_weights(tmp_path_factory.getbasetemp(), seed=1)


@pytest.fixture(scope="module")
def det_weights(tmp_path_factory) -> Path:
    return untrained_detector_weights(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def clip_and_gallery(lpr4m_mini):
    from lpr4m.layout import Dataset
    ds = Dataset(lpr4m_mini)
    clip = ds.test_clips()[0]
    return lpr4m_mini / "clips" / f"{clip.video_id}.mp4", lpr4m_mini / "gallery" / clip.live_id, clip


def _run(argv, capsys):
    from lpr4m.cli import run_main
    from pipeline.run import main
    code = run_main(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_run_full_frames_json_html_match_brute_force(clip_and_gallery, emb_weights, tmp_path, capsys):
    from lpr4m.frames import sample_frames
    from lpr4m.images import load_rgb
    from retriever.embedder import load_embedder
    clip, gallery, tc = clip_and_gallery
    js, page = tmp_path / "out" / "r.json", tmp_path / "r.html"
    code, out, err = _run(["--clip", clip, "--gallery", gallery, "--weights", emb_weights, "--no-detector",
                           "--topk", "3", "--json", js, "--html", page], capsys)
    assert code == 0, err
    res = json.loads(js.read_text())
    assert res["n_frames"] == 15 == len(res["frames"])  # 15 s clip at 1 frame/s
    assert all(f["full_frame"] for f in res["frames"])
    # independent reference: embed the same frames, mean, cosine to every view, best view per product
    emb = load_embedder(emb_weights)
    frames = [f.rgb for f in sample_frames(clip, fps=1.0)]
    q = emb.embed(frames).mean(0)
    q /= np.linalg.norm(q)
    files = sorted(gallery.glob("*.jpg"))
    g = emb.embed([load_rgb(p) for p in files])
    best = {}
    for p, s in zip(files, g @ q):
        iid = p.stem.rsplit("-", 1)[0]
        best[iid] = max(best.get(iid, -2), float(s))
    ref = sorted(best.items(), key=lambda kv: -kv[1])[:3]
    assert [p["image_id"] for p in res["products"]] == [i for i, _ in ref]
    np.testing.assert_allclose([p["score"] for p in res["products"]], [s for _, s in ref], atol=1e-4)
    assert all(p["support"] and p["support"][0]["box"] is None for p in res["products"])
    # printed: top-k with ids and titles, and the ultralytics-style speed line
    for p in res["products"]:
        assert p["image_id"] in out and p["title"] and p["title"] in out  # titles from the root's annotations
    assert re.search(r"Speed: [\d.]+ ms decode, .*[\d.]+ ms embed, .*[\d.]+ ms search per frame", out)
    # HTML: self-contained (inline JPEGs only), shop images + frames, same products
    html = page.read_text()
    assert html.count("data:image/jpeg;base64,") >= 15 + 3
    assert not re.search(r"(src|href)=[\"'](?!data:)", html) and "<link" not in html and "<script" not in html
    for p in res["products"]:
        assert p["image_id"] in html
    assert tc.gt_image_ids[0] in best  # the clip's product is in the gallery it was ranked in


def test_run_with_detector_crops(clip_and_gallery, emb_weights, det_weights, tmp_path, capsys):
    clip, gallery, _ = clip_and_gallery
    # the untrained detector scores every box ~0.012: conf 0.01 crops its best box
    js = tmp_path / "crops.json"
    code, out, err = _run(["--clip", clip, "--gallery", gallery, "--weights", emb_weights, "--detector-weights",
                           det_weights, "--conf", "0.01", "--max-frames", "4", "--json", js, "--html",
                           tmp_path / "c.html"], capsys)
    assert code == 0, err
    res = json.loads(js.read_text())
    assert res["n_frames"] == 4 and res["settings"]["detector"]
    for f in res["frames"]:
        assert f["boxes"] and not f["full_frame"] and f["used"] == [0]
        w, h = f["size"]
        assert all(0 <= b[0] <= b[2] <= w and 0 <= b[1] <= b[3] <= h for b in f["boxes"])
    assert res["products"][0]["support"][0]["box"] is not None
    assert "ms detect" in res["speed"]
    # fused by default: an unsure detection (~0.012) counts for nothing against its full frame...
    assert res["settings"]["crop_policy"] == "fuse" and all(f["crop_weights"] == [0.0] for f in res["frames"])
    code, _, err = _run(["--clip", clip, "--gallery", gallery, "--weights", emb_weights, "--detector-weights",
                         det_weights, "--conf", "0.01", "--max-frames", "4", "--json", js, "--no-detector"], capsys)
    full = json.loads(js.read_text())["products"]
    assert [p["score"] for p in res["products"]] == pytest.approx([p["score"] for p in full], abs=1e-5)
    # ...and counts alone under --crop-policy crop
    code, _, err = _run(["--clip", clip, "--gallery", gallery, "--weights", emb_weights, "--detector-weights",
                         det_weights, "--conf", "0.01", "--max-frames", "4", "--json", js, "--crop-policy", "crop"],
                        capsys)
    assert code == 0, err
    assert all(f["crop_weights"] == [1.0] for f in json.loads(js.read_text())["frames"])
    # (the full-frame fallback when nothing passes --conf is checked in the evaluate test)


def test_run_index_and_cached_gallery(clip_and_gallery, emb_weights, other_emb_weights, tmp_path, capsys):
    from lpr4m.cli import run_main
    from pipeline.gallery import cache_dir
    from pipeline.index import main as index_main
    clip, gallery, _ = clip_and_gallery
    base = ["--clip", clip, "--no-detector", "--max-frames", "3", "--topk", "2"]
    code, out1, err = _run(base + ["--gallery", gallery, "--weights", emb_weights], capsys)
    assert code == 0, err
    cached = list(cache_dir().iterdir())
    assert len(cached) == 1 and (cached[0] / "meta.json").is_file()
    code, out2, err = _run(base + ["--gallery", gallery, "--weights", emb_weights], capsys)
    assert code == 0 and len(list(cache_dir().iterdir())) == 1  # reused, not rebuilt
    assert out1.splitlines()[:4] == out2.splitlines()[:4]
    assert run_main(index_main, ["--gallery", str(gallery), "--out", str(tmp_path / "idx"), "--weights",
                                 str(emb_weights)]) == 0
    capsys.readouterr()
    code, out3, err = _run(base + ["--index", tmp_path / "idx", "--weights", emb_weights], capsys)
    assert code == 0 and out3.splitlines()[:4] == out1.splitlines()[:4]
    js = tmp_path / "never.json"
    code, _, err = _run(base + ["--index", tmp_path / "idx", "--weights", other_emb_weights, "--json", js], capsys)
    assert code == 2 and "index was built with embedder" in err and len(err.strip().splitlines()) == 1
    assert not js.exists()


def test_cached_index_keeps_its_skipped_images(clip_and_gallery, emb_weights, tmp_path, capsys, caplog):
    """A cache hit re-logs the skipped shop images and fails under --strict, exactly as a fresh build."""
    import shutil
    clip, gallery, _ = clip_and_gallery
    bad = tmp_path / "gal_bad"
    bad.mkdir()
    for p in sorted(gallery.glob("*.jpg"))[:2]:
        shutil.copy(p, bad / p.name)
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    base = ["--clip", clip, "--gallery", bad, "--weights", emb_weights, "--no-detector", "--max-frames", "1"]
    for _ in range(2):  # fresh build, then cache hit
        caplog.clear()
        code, _, err = _run(base, capsys)
        assert code == 0, err
        assert "skipped 1 unreadable shop image(s)" in caplog.text and "broken.jpg" in caplog.text
    code, _, err = _run(base + ["--strict"], capsys)
    assert code == 2 and "broken.jpg" in err and len(err.strip().splitlines()) == 1


def test_unknown_live_id_is_an_error(clip_and_gallery, emb_weights, lpr4m_mini, capsys):
    clip, gallery, tc = clip_and_gallery
    code, out, err = _run(["--clip", clip, "--gallery", lpr4m_mini, "--weights", emb_weights, "--no-detector",
                           "--max-frames", "1", "--live", "nonexistent"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out
    assert "'nonexistent' is not a live-stream id" in err and tc.live_id in err


def test_onnx_backend_uses_an_index_built_with_torch(clip_and_gallery, emb_weights, tmp_path, capsys):
    """An ONNX export of the same checkpoint (it records the source sha256) may query a torch-built index."""
    from lpr4m.cli import run_main
    from pipeline.index import main as index_main
    from retriever.exporting import export_onnx
    clip, gallery, _ = clip_and_gallery
    onnx = Path(export_onnx(emb_weights, tmp_path / "retriever.onnx")["path"])
    assert run_main(index_main, ["--gallery", str(gallery), "--out", str(tmp_path / "idx"), "--weights",
                                 str(emb_weights)]) == 0
    capsys.readouterr()
    base = ["--clip", clip, "--index", tmp_path / "idx", "--no-detector", "--max-frames", "5"]
    code, _, err = _run(base + ["--weights", emb_weights, "--json", tmp_path / "t.json"], capsys)
    assert code == 0, err
    code, _, err = _run(base + ["--backend", "onnx", "--weights", onnx, "--json", tmp_path / "o.json"], capsys)
    assert code == 0, err
    t, o = (json.loads((tmp_path / n).read_text()) for n in ("t.json", "o.json"))
    assert [p["image_id"] for p in t["products"]] == [p["image_id"] for p in o["products"]]
    np.testing.assert_allclose([p["score"] for p in t["products"]], [p["score"] for p in o["products"]], atol=1e-3)
    assert o["settings"]["backend"] == "onnx"
    # every product removed: nothing to rank against is an error, not an empty answer
    ids = sorted({p.stem.rsplit("-", 1)[0] for p in Path(gallery).iterdir()})
    assert run_main(index_main, ["--out", str(tmp_path / "idx"), "--remove", *ids]) == 0
    capsys.readouterr()
    code, _, err = _run(base + ["--weights", emb_weights], capsys)
    assert code == 2 and "the index holds no shop images" in err


def test_run_on_real_videos_odd_codecs(shared_data, emb_weights, clip_and_gallery, tmp_path, capsys):
    """Real files: MPEG-1 in .mpg, and an AVI whose seeking fails (read in order instead)."""
    _, gallery, _ = clip_and_gallery
    for name in ("cityCC0.mpg", "tree.avi"):
        js = tmp_path / f"{name}.json"
        code, _, err = _run(["--clip", shared_data / "videos" / name, "--gallery", gallery, "--weights",
                             emb_weights, "--no-detector", "--max-frames", "4", "--json", js], capsys)
        assert code == 0, err
        res = json.loads(js.read_text())
        times = [f["time_s"] for f in res["frames"]]
        assert res["n_frames"] == 4 and times == sorted(times) and times == pytest.approx([0, 1, 2, 3], abs=0.5)


def _bad_clips(tmp_path: Path, good: Path) -> dict[str, Path]:
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "trunc.mp4").write_bytes(good.read_bytes()[:1500])
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 50)
    return {"missing": tmp_path / "nope.mp4", "empty": tmp_path / "empty.mp4", "truncated": tmp_path / "trunc.mp4",
            "text": tmp_path / "notes.mp4", "folder": tmp_path}


def test_run_bad_inputs_exit_2_and_leave_nothing(clip_and_gallery, emb_weights, tmp_path, capsys):
    clip, gallery, _ = clip_and_gallery
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for name, bad in _bad_clips(bad_dir, clip).items():
        js, page = tmp_path / f"{name}.json", tmp_path / f"{name}.html"
        code, out, err = _run(["--clip", bad, "--gallery", gallery, "--weights", emb_weights, "--no-detector",
                               "--json", js, "--html", page], capsys)
        assert code == 2, (name, err)
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1, (name, err)
        assert "Traceback" not in err and not js.exists() and not page.exists()
    empty = tmp_path / "empty-gallery"
    empty.mkdir()
    code, _, err = _run(["--clip", clip, "--gallery", empty, "--weights", emb_weights, "--no-detector"], capsys)
    assert code == 2 and "no shop images found" in err
    code, _, err = _run(["--clip", clip, "--gallery", gallery, "--weights", tmp_path / "nope.safetensors",
                         "--no-detector"], capsys)
    assert code == 2 and err.startswith("error:")
    code, _, err = _run(["--clip", clip, "--gallery", gallery, "--backend", "onnx", "--weights",
                         tmp_path / "missing.onnx", "--no-detector"], capsys)
    assert code == 2 and err.startswith("error:")
    assert [p for p in tmp_path.rglob(".*") if p.is_file()] == []


def test_readme_command_on_the_bundled_demo(tmp_path, capsys):
    """``python pipeline/run.py --clip demo/clips/demo-1.mp4``: defaults only (bundled weights + demo gallery).
    Checks that it runs and lists demo products, not how good the bundled weights are."""
    from pipeline.backends import DEMO_DIR, WEIGHTS_DIR
    clip = DEMO_DIR / "clips" / "demo-1.mp4"
    if not clip.is_file() or not (WEIGHTS_DIR / "retriever.safetensors").is_file() or \
            not any(WEIGHTS_DIR.glob("detector.*")):
        pytest.skip("bundled demo or weights missing")
    code, out, err = _run(["--clip", clip, "--max-frames", "4"], capsys)
    assert code == 0, err
    titles = dict(line.split("\t", 1) for line in (DEMO_DIR / "gallery" / "titles.txt").read_text().splitlines())
    ranked = [line.split()[2] for line in out.splitlines() if re.match(r"\s+\d+\s+-?[\d.]+\s+\S+-", line)]
    assert len(ranked) == 5 and set(ranked) <= set(titles)
    assert "Speed:" in out


def test_backend_auto(tmp_path):
    from pipeline.backends import resolve_backend
    assert resolve_backend("auto", "w/retriever.onnx") == "onnx"
    assert resolve_backend("auto", None, "w/detector.safetensors") == "torch"
    assert resolve_backend("auto", None, "w/detector.engine") == "tensorrt"
    assert resolve_backend("auto", weights_dir=tmp_path) == "torch"  # no (fresh) ONNX exports
    assert resolve_backend("onnx", "w/retriever.safetensors") == "onnx"  # explicit wins


def test_missing_export_names_the_command(tmp_path):
    from lpr4m.errors import BadInput
    from pipeline.backends import default_weights
    (tmp_path / "retriever.safetensors").write_bytes(b"x")
    with pytest.raises(BadInput, match=r"python retriever/export.py --weights .*retriever.safetensors --format onnx"):
        default_weights("retriever", "onnx", tmp_path)
    with pytest.raises(BadInput, match=r"detector/export.py .*--format engine"):
        default_weights("detector", "tensorrt", tmp_path)


def test_segment_timeline_on_concatenated_clips(lpr4m_mini, emb_weights, tmp_path, capsys):
    from lpr4m.frames import sample_frames, write_video
    from lpr4m.layout import Dataset
    ds = Dataset(lpr4m_mini)
    clips = [c for c in ds.test_clips() if c.live_id == ds.test_clips()[0].live_id][:2]
    long_clip = tmp_path / "long.mp4"

    def frames():
        for c in clips:
            for f in sample_frames(lpr4m_mini / "clips" / f"{c.video_id}.mp4", fps=4.0):
                yield f.rgb

    write_video(long_clip, frames(), fps=4)
    js = tmp_path / "seg.json"
    code, out, err = _run(["--clip", long_clip, "--gallery", lpr4m_mini / "gallery" / clips[0].live_id,
                           "--weights", emb_weights, "--no-detector", "--segment", "--seg-window", "3",
                           "--json", js], capsys)
    assert code == 0, err
    res = json.loads(js.read_text())
    segs = res["segments"]
    assert segs and segs[0]["frames"][0] == 0 and segs[-1]["frames"][1] == res["n_frames"] == 30
    assert all(a["frames"][1] == b["frames"][0] for a, b in zip(segs, segs[1:]))  # contiguous cover
    assert all(s["products"] and s["start_s"] < s["end_s"] for s in segs)
    assert all(a["products"][0]["image_id"] != b["products"][0]["image_id"] for a, b in zip(segs, segs[1:]))
    assert "timeline (" in out and out.count("00:00:") >= len(segs)


# -- pure parts --------------------------------------------------------------------------------------------------
def test_change_points_hand_made():
    from pipeline.segments import change_points, segment_spans, window_embeddings
    e = np.eye(4, dtype=np.float32)
    w = np.stack([e[0]] * 4 + [e[1]] + [e[0]] * 3 + [e[2]] * 4)  # one odd window (index 4), then a real change
    assert change_points(w, threshold=0.7, hysteresis=2) == [0, 8]
    assert change_points(w, threshold=0.7, hysteresis=1) == [0, 4, 5, 8]
    labels = ["a"] * 4 + ["b"] * 4 + ["a"] * 4  # same look, different top-1: labels alone cut
    assert change_points(np.stack([e[0]] * 12), labels, 0.7, 2) == [0, 4, 8]
    fe = np.repeat(w, 3, axis=0)
    wemb, spans = window_embeddings(fe, 3)
    np.testing.assert_allclose(wemb, w, atol=1e-6)
    assert segment_spans(len(fe), 3, [0, 8]) == [(0, 24), (24, 36)]


def test_stream_is_lazy_and_thumbnails_bounded(emb_weights):
    from pipeline.recognize import ImageFrame, Recognizer, ThumbKeeper
    from retriever.embedder import load_embedder
    pulled = []

    def frames():
        for i in range(10):
            pulled.append(i)
            yield ImageFrame(i, float(i), np.full((48, 64, 3), 20 * i, np.uint8))

    rec = Recognizer(load_embedder(emb_weights), None, batch=3, thumbs=4)
    it = rec.stream(frames())
    first = next(it)
    assert first.index == 0 and len(pulled) == 3  # one batch decoded, not the whole clip
    rest = list(it)
    assert len(rest) == 9 and rec.n_frames == 10 and first.embs.shape == (1, 32)
    assert len(rec.thumbs.kept) <= 4 and 0 in rec.thumbs.kept
    k = ThumbKeeper(8)
    for n in range(1000):
        if k.wants(n):
            k.add(n, b"x")
    assert len(k.kept) <= 8 and min(k.kept) == 0 and max(k.kept) >= 500  # spread over the whole stream


def test_prefetch_thread_same_results_and_errors_surface(emb_weights):
    from lpr4m.errors import BadInput
    from pipeline.recognize import ImageFrame, Recognizer
    from retriever.embedder import load_embedder
    emb = load_embedder(emb_weights)

    def frames(fail_at=None):
        for i in range(7):
            if i == fail_at:
                raise BadInput("clip.mp4", "truncated or corrupt video")
            yield ImageFrame(i, float(i), np.full((40, 40, 3), 30 * i, np.uint8))

    plain = list(Recognizer(emb, batch=2).stream(frames()))
    threaded = list(Recognizer(emb, batch=2, prefetch=3).stream(frames()))
    assert [r.index for r in threaded] == list(range(7))
    np.testing.assert_allclose(np.concatenate([r.embs for r in plain]),
                               np.concatenate([r.embs for r in threaded]), atol=1e-6)
    with pytest.raises(BadInput, match="truncated"):
        list(Recognizer(emb, batch=2, prefetch=3).stream(frames(fail_at=5)))
    it = Recognizer(emb, batch=2, prefetch=3).stream(frames())
    next(it)
    it.close()  # stops the decoder thread without hanging


# -- evaluate ----------------------------------------------------------------------------------------------------
def test_evaluate_matches_retriever_and_reports_box_ap(lpr4m_mini, emb_weights, det_weights, tmp_path, capsys):
    from lpr4m.cli import run_main
    from lpr4m.layout import Dataset
    from pipeline.evaluate import main
    from retriever.embedder import load_embedder
    from retriever.evaluation import evaluate as retriever_evaluate
    out, rk = tmp_path / "ev.json", tmp_path / "rk.jsonl"
    code = run_main(main, ["--data", str(lpr4m_mini), "--weights", str(emb_weights), "--detector-weights",
                           str(det_weights), "--save-rankings", str(rk), "--out", str(out), "--limit", "4",
                           "--frames", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"detector", "full_frames"}
    ref = retriever_evaluate(Dataset(lpr4m_mini), load_embedder(emb_weights), "none", ("mean",), ("live",),
                             n_frames=2, ks=(1, 5, 10), limit=4)["results"]["live/mean"]
    for k in ("R1", "R5", "R10", "n_queries"):
        assert res["results"]["full_frames"][k] == pytest.approx(ref[k])  # same protocol, independent code
    ap = res["box_ap"]
    assert ap is not None and ap["images"] > 0 and ap["gt_boxes"] > 0 and 0.0 <= ap["ap"] <= 1.0
    for name in ("detector", "full_frames"):
        t = res["timings_ms_per_frame"][name]
        assert {"decode", "embed", "search"} <= set(t)
    assert "detect" in res["timings_ms_per_frame"]["detector"]
    # the untrained detector's boxes (~0.012) never pass --conf 0.25: every frame falls back to the full frame,
    # so detector-on must rank exactly as full frames
    assert res["results"]["detector"]["hits"] == res["results"]["full_frames"]["hits"]
    assert "R1" in err and "box AP" in err  # the printed table
    lines = [json.loads(line) for line in rk.read_text().splitlines()]
    assert res["n_queries"] == 4 and len(lines) == 2 * 4
    assert {line["setting"] for line in lines} == {"detector/mean", "full_frames/mean"}
    assert all(len(line["image_ids"]) == len(line["scores"]) > 0 for line in lines)
    by = {}
    for line in lines:
        by.setdefault(line["setting"], []).append(line["image_ids"])
    assert by["detector/mean"] == by["full_frames/mean"]  # the fallback, query by query
