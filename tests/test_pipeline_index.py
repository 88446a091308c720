"""Gallery index: faiss search vs brute force, add/remove without rebuild, atomic save, embedder mismatch, CLI.

Models are made inside the session (a small real embedder, an untrained YOLO), so nothing here depends on the
bundled weights being good. Helpers ``tiny_embedder_weights`` / ``untrained_detector_weights`` are reused by
tests/test_pipeline_run.py.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from lpr4m.errors import BadInput

pytestmark = pytest.mark.usefixtures("one_torch_thread", "isolated_cache")


# -- shared model helpers (memoised on disk under the session's base temp dir) -------------------------------
def tiny_embedder_weights(base: Path, seed: int = 0, embed_dim: int = 32) -> Path:
    """A real retriever embedder (EfficientNet-Lite0 trunk, random projection) at 64 px: fast, deterministic."""
    path = base / f"emb-{seed}-{embed_dim}" / "retriever.safetensors"
    if path.is_file():
        return path
    import torch
    from retriever.config import EmbedderConfig
    from retriever.embedder import save_checkpoint
    from retriever.models import create_embedder
    torch.manual_seed(seed)
    model, _ = create_embedder("efficientnet_lite0", pretrained=False, embed_dim=embed_dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, EmbedderConfig(backbone="efficientnet_lite0", embed_dim=embed_dim, input_size=64,
                                          training_command="tests: untrained"), path)
    return path


def untrained_detector_weights(base: Path) -> Path:
    """An untrained YOLO11n at 160 px in the detector's own format (its scores are a constant ~0.012)."""
    path = base / "det" / "detector.safetensors"
    if path.is_file():
        return path
    from safetensors.torch import save_file
    from detector import yolo
    from detector.config import DetectorConfig
    y = yolo.model_yaml("yolo11n.yaml", 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(yolo.state_dict_for_saving(yolo.build_model(y, 1)), str(path))
    DetectorConfig(model="yolo11n.yaml", model_yaml=y, imgsz=160, sha256=yolo.sha256_file(path),
                   made_by="tests: untrained").save(path.with_suffix(".json"))
    return path


@pytest.fixture(scope="session")
def emb_weights(tmp_path_factory) -> Path:
    return tiny_embedder_weights(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def other_emb_weights(tmp_path_factory) -> Path:
    return tiny_embedder_weights(tmp_path_factory.getbasetemp(), seed=1)


@pytest.fixture(scope="session")
def embedder(emb_weights):
    from retriever.embedder import load_embedder
    return load_embedder(emb_weights)


# -- pure index behaviour on raw vectors ---------------------------------------------------------------------
def _items(n, views=2, lives=("liveA", "liveB")):
    from pipeline.gallery import GalleryItem
    return [GalleryItem(f"img{i // views}", i % views, lives[(i // views) % len(lives)], f"title {i // views}",
                        f"p{i}.jpg") for i in range(n)]


def _clustered(n, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 2), d))
    x = centres[np.arange(n) // 2] + 0.05 * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def _brute(x, items, q, k, live=None):
    """Reference: cosine to every view, best view per image id, ranked (ties by id order)."""
    s = q @ x.T
    best = {}
    for j, it in enumerate(items):
        if live is not None and it.live_id != live:
            continue
        if it.image_id not in best or s[j] > best[it.image_id]:
            best[it.image_id] = float(s[j])
    return sorted(best.items(), key=lambda kv: -kv[1])[:k]


def test_flat_search_matches_brute_force():
    from pipeline.gallery import GalleryIndex
    x = _clustered(40)
    items = _items(40)
    gi = GalleryIndex.from_vectors(x, items, {"fingerprint": "fp", "name": "t"})
    q = _clustered(6, seed=3)
    for live in (None, "liveA", "liveB"):
        for row, qq in zip(gi.search(q, 5, live_id=live), q):
            ref = _brute(x, items, qq, 5, live)
            assert [m.image_id for m in row] == [i for i, _ in ref]
            np.testing.assert_allclose([m.score for m in row], [s for _, s in ref], atol=1e-5)
            assert len({m.image_id for m in row}) == len(row)  # one hit per product, best view
            assert live is None or all(m.live_id == live for m in row)
    assert gi.search(q[:1], 3, live_id="nope") == [[]]


def test_ivfpq_trains_or_falls_back_and_hnsw_agrees(caplog):
    from pipeline.gallery import MIN_IVFPQ_TRAIN, GalleryIndex
    small = GalleryIndex.from_vectors(_clustered(20), _items(20), {"fingerprint": "fp"}, index_type="ivfpq")
    assert small.index_type == "flat" and small.meta["requested_type"] == "ivfpq"
    assert "IVF needs at least" in caplog.text
    n = MIN_IVFPQ_TRAIN + 200
    x = _clustered(n, d=32)
    items = _items(n)
    ivf = GalleryIndex.from_vectors(x, items, {"fingerprint": "fp"}, index_type="ivfpq")
    assert ivf.index_type == "ivfpq" and ivf.meta["factory"].startswith("IVF")
    hn = GalleryIndex.from_vectors(x, items, {"fingerprint": "fp"}, index_type="hnsw")
    q = x[::50]  # every query's own product is its nearest neighbour
    truth = [items[i].image_id for i in range(0, n, 50)]
    ivf_hits = np.mean([r[0].image_id == t for r, t in zip(ivf.search(q, 1), truth)])
    hn_hits = np.mean([r[0].image_id == t for r, t in zip(hn.search(q, 1), truth)])
    assert hn_hits == 1.0
    assert ivf_hits >= 0.8  # approximate by design (PQ codes)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq", "ivfsq"])
def test_remove_add_save_load(tmp_path, kind):
    from pipeline.gallery import MIN_IVFPQ_TRAIN, GalleryIndex
    n = MIN_IVFPQ_TRAIN + 40 if kind.startswith("ivf") else 40
    x = _clustered(n)
    items = _items(n)
    gi = GalleryIndex.from_vectors(x, items, {"fingerprint": "fp"}, index_type=kind)
    removed, unknown = gi.remove(["img3", "img5-1", "nope"])
    assert (removed, unknown) == (3, ["nope"])
    assert gi.ntotal == n - 3 == len(gi.meta["ids"])
    hits = gi.search(x[6:8], 3)  # img3's own vectors: img3 must be gone
    assert all(m.image_id != "img3" for row in hits for m in row)
    assert "img3" not in gi.image_ids and "img3" not in gi.meta["titles"]
    gi.save(tmp_path / "idx")
    back = GalleryIndex.load(tmp_path / "idx")
    assert back.ntotal == gi.ntotal and back.index_type == kind
    assert [m.image_id for m in back.search(x[:1], 3)[0]] == [m.image_id for m in gi.search(x[:1], 3)[0]]
    # re-adding replaces nothing else and gets fresh ids
    back.add_vectors(x[6:8], items[6:8])
    assert back.search(x[6:7], 1)[0][0].image_id == "img3"
    assert len(set(back.meta["ids"])) == back.ntotal == n - 1
    back.add_vectors(x[6:8], items[6:8])  # same keys again: replaced, not duplicated
    assert back.ntotal == n - 1


def test_save_is_atomic_and_load_checks_integrity(tmp_path, monkeypatch):
    from pipeline import gallery as G
    gi = G.GalleryIndex.from_vectors(_clustered(10), _items(10), {"fingerprint": "fp"})
    out = gi.save(tmp_path / "idx")
    before = (out / "meta.json").read_bytes()
    gi.remove(["img0"])

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(G, "write_json", boom)
    with pytest.raises(OSError):
        gi.save(out)
    monkeypatch.undo()
    assert (out / "meta.json").read_bytes() == before  # old pair intact
    index_file = json.loads(before)["index_file"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp folders left
    assert sorted(p.name for p in out.iterdir()) == sorted([".lock", index_file, "meta.json"])
    assert G.GalleryIndex.load(out).ntotal == 10
    # a changed index file is caught by its sha256
    (out / index_file).write_bytes((out / index_file).read_bytes()[:-8])
    with pytest.raises(BadInput, match="does not match its meta.json"):
        G.GalleryIndex.load(out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput, match="exists and is not a folder"):
        gi.save(tmp_path / "file")
    with pytest.raises(BadInput, match="index not found"):
        G.GalleryIndex.load(tmp_path / "missing")


def test_index_folder_is_ours_or_refused_and_updates_touch_only_our_files(tmp_path):
    from pipeline import gallery as G
    gi = G.GalleryIndex.from_vectors(_clustered(10), _items(10), {"fingerprint": "fp"})
    project = tmp_path / "project"  # a user's folder that happens to hold a meta.json
    (project / "src").mkdir(parents=True)
    (project / "meta.json").write_text('{"name": "my thesis"}')
    (project / "thesis.tex").write_text("years of work")
    with pytest.raises(BadInput, match="not a gallery index"):
        gi.save(project)
    assert sorted(p.name for p in project.iterdir()) == ["meta.json", "src", "thesis.tex"]
    out = gi.save(tmp_path / "idx")
    (out / "NOTES.txt").write_text("mine")
    (out / "old_backup").mkdir()
    (out / "old_backup" / "x").write_text("mine too")
    # what a killed writer of this or an older version leaves: temp files inside, swap folders beside
    (out / ".meta.json.k1ll3d.tmp").write_text("{")
    (out / "index-0123456789abcdef.faiss").write_bytes(b"IxM2 cut short")  # a killed writer's index file
    (out / "index-fedcba9876543210.faiss").write_text("a user's notes that happen to carry an index name")
    (tmp_path / ".idx.abc123.tmp").mkdir()
    (tmp_path / ".idx.old-1-2").mkdir()
    (tmp_path / ".idx.old-1-2" / "index.faiss").write_bytes(b"IxM2")
    (tmp_path / ".idx.user.tmp").mkdir()  # a user's folder that only looks like ours
    (tmp_path / ".idx.user.tmp" / "draft.txt").write_text("mine")
    gi.remove(["img0"])
    gi.save(out)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([".lock", "NOTES.txt", "old_backup", "meta.json", gi.meta["index_file"],
                            "index-fedcba9876543210.faiss"])
    assert (out / "old_backup" / "x").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.user.tmp", "idx", "project"]
    assert G.GalleryIndex.load(out).ntotal == 8


def test_a_kill_between_the_two_writes_leaves_the_old_pair_and_the_next_save_cleans_up(tmp_path, monkeypatch):
    from pipeline import gallery as G
    gi = G.GalleryIndex.from_vectors(_clustered(10), _items(10), {"fingerprint": "fp"})
    out = gi.save(tmp_path / "idx")
    gi.remove(["img1"])

    class Killed(BaseException):
        """Stands in for SIGKILL after the new index file is written, before meta.json is switched."""

    def killed(*a, **k):
        raise Killed()

    with monkeypatch.context() as m:
        m.setattr(G, "write_json", killed)
        m.setattr(Path, "unlink", lambda *a, **k: None)  # a kill runs no clean-up
        with pytest.raises(Killed):
            gi.save(out)
    assert len(list(out.glob("index-*.faiss"))) == 2  # the new file is orphaned, the old pair untouched
    assert G.GalleryIndex.load(out).ntotal == 10
    gi.save(out)
    assert len(list(out.glob("index-*.faiss"))) == 1 and G.GalleryIndex.load(out).ntotal == 8


_WRITER = """
import sys, time
from pipeline import gallery as G
import numpy as np
out, key = sys.argv[1], sys.argv[2]
with G.index_lock(out):
    gi = G.GalleryIndex.load(out)
    time.sleep(1.0)  # both processes would read the same state here without the lock
    x = np.random.default_rng(len(key)).standard_normal((1, 32)).astype(np.float32)
    gi.add_vectors(x / np.linalg.norm(x), [G.GalleryItem(key, 0, "liveA", key, key + ".jpg")])
    gi.save(out)
"""


def test_two_writer_processes_never_lose_an_update(tmp_path):
    import subprocess
    import sys
    from pipeline import gallery as G
    out = G.GalleryIndex.from_vectors(_clustered(10), _items(10), {"fingerprint": "fp"}).save(tmp_path / "idx")
    repo = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(out), key], cwd=repo, stderr=subprocess.PIPE,
                              text=True) for key in ("new-a", "new-bb")]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert "another writer holds it (pid" in "".join(errs)  # the second one waited, and said for whom
    gi = G.GalleryIndex.load(out)
    assert gi.ntotal == 12 and {"new-a", "new-bb"} <= set(gi.image_ids)


_SAVER = """
import sys
import numpy as np
from pipeline import gallery as G
out = sys.argv[1]
base = G.GalleryIndex.load(out)
x = base.vectors()
items = [G.GalleryItem(i, v, lv, "", p) for i, v, lv, p in zip(base.meta["image_ids"], base.meta["views"],
                                                                  base.meta["live_ids"], base.meta["paths"])]
small = G.GalleryIndex.from_vectors(x[:8], items[:8], base.meta["embedder"])
print("ready", flush=True)
while True:  # the old pair and a new pair, saved over each other until killed
    small.save(out)
    base.save(out)
"""


def test_kill_9_at_any_moment_of_a_save_leaves_a_whole_index(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pipeline import gallery as G
    out = G.GalleryIndex.from_vectors(_clustered(10), _items(10), {"fingerprint": "fp"}).save(tmp_path / "idx")
    repo = Path(__file__).resolve().parents[1]
    rng = np.random.default_rng(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(out)], cwd=repo, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert G.GalleryIndex.load(out).ntotal in (8, 10)  # the old pair or the new one, never neither
    G.GalleryIndex.load(out).save(out)
    assert len(list(out.glob("index-*.faiss"))) == 1 and not list(out.glob(".*.tmp")) + list(out.glob(".*.faiss"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_load_refuses_meta_rows_that_do_not_match_the_index(tmp_path):
    from pipeline import gallery as G
    out = G.GalleryIndex.from_vectors(_clustered(10), _items(10), {"fingerprint": "fp"}).save(tmp_path / "idx")
    meta = json.loads((out / "meta.json").read_text())
    meta["image_ids"] = meta["image_ids"][1:] + meta["image_ids"][:1]  # shifted by one row: same length
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BadInput, match=r"meta\.json: .*do not match the index") as exc:
        G.GalleryIndex.load(out)
    assert "\n" not in str(exc.value)
    del meta["rows_sha256"]  # a meta without its checksums is refused, not trusted
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BadInput, match=r"incomplete index meta \(missing rows_sha256\)"):
        G.GalleryIndex.load(out)


# -- with a real embedder and the CLI --------------------------------------------------------------------------
def _run(main, argv, capsys):
    from lpr4m.cli import run_main
    code = run_main(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_index_cli_build_add_remove_mismatch(lpr4m_mini, emb_weights, other_emb_weights, embedder, tmp_path,
                                            capsys):
    from lpr4m.images import load_rgb
    from lpr4m.layout import Dataset
    from pipeline.gallery import GalleryIndex
    from pipeline.index import main
    ds = Dataset(lpr4m_mini)
    lives = sorted(ds.live_galleries)
    out = tmp_path / "idx"
    code, stdout, err = _run(main, ["--gallery", lpr4m_mini, "--live", lives[0], "--out", out,
                                    "--weights", emb_weights], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    first = ds.gallery(lives[0])
    assert summary["built"] == len(first) == summary["ntotal"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["embedder"]["fingerprint"] == embedder.fingerprint
    assert meta["embedder"]["sha256"] == embedder.config.sha256
    assert meta["dim"] == 32 and meta["metric"] == "inner_product" and meta["factory"] == "IDMap2,Flat"
    assert set(meta["live_ids"]) == {lives[0]} and all(not Path(p).is_absolute() for p in meta["paths"])
    assert meta["titles"] and set(meta["titles"]) <= set(ds.titles)

    # search == brute force over the same embedder's gallery vectors
    gi = GalleryIndex.load(out, embedder)
    gx = embedder.embed([load_rgb(p) for _, _, p in first])
    q = embedder.embed([load_rgb(ds.test_clips()[0].frame_paths[0])])[0]
    ref = _brute(gx, [type("I", (), {"image_id": i, "live_id": lives[0]}) for i, _, _ in first], q, 3)
    got = gi.search(q[None], 3)[0]
    assert [m.image_id for m in got] == [i for i, _ in ref]
    np.testing.assert_allclose([m.score for m in got], [s for _, s in ref], atol=1e-4)

    # --add the other live's gallery folder, then --remove one product
    code, stdout, err = _run(main, ["--add", lpr4m_mini / "gallery" / lives[1], "--out", out,
                                    "--weights", emb_weights], capsys)
    assert code == 0, err
    second = ds.gallery(lives[1])
    assert json.loads(stdout)["ntotal"] == len(first) + len(second)
    victim = second[0][0]
    code, stdout, err = _run(main, ["--remove", victim, "--out", out], capsys)
    assert code == 0, err
    n_views = sum(1 for i, _, _ in second if i == victim)
    assert json.loads(stdout)["removed"] == n_views
    assert victim not in GalleryIndex.load(out).image_ids
    code, _, err = _run(main, ["--remove", "no-such-id", "--out", out], capsys)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1

    # another embedder is refused, with a one-line message, and the index is left as it was
    before = (out / "meta.json").read_bytes()
    code, _, err = _run(main, ["--add", lpr4m_mini / "gallery" / lives[1], "--out", out,
                               "--weights", other_emb_weights], capsys)
    assert code == 2 and "index was built with embedder" in err and len(err.strip().splitlines()) == 1
    assert (out / "meta.json").read_bytes() == before


def test_index_cli_bad_galleries(tmp_path, emb_weights, lpr4m_mini, capsys):
    from pipeline.index import main
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(main, ["--gallery", empty, "--out", tmp_path / "o1", "--weights", emb_weights], capsys)
    assert code == 2 and "no shop images found" in err
    assert not (tmp_path / "o1").exists()
    twins = tmp_path / "twins"  # one product id from two files: which one an id means would be a guess
    twins.mkdir()
    one = next(p for p in sorted(next((lpr4m_mini / "gallery").iterdir()).iterdir()) if p.stem.endswith("-0"))
    shutil.copy(one, twins / one.name)
    shutil.copy(one, twins / (one.stem + ".png"))
    code, _, err = _run(main, ["--gallery", twins, "--out", tmp_path / "o0", "--weights", emb_weights], capsys)
    assert code == 2 and "the same shop image as" in err and not (tmp_path / "o0").exists()
    project = tmp_path / "project"  # not an index: refused before the embedder is even loaded
    project.mkdir()
    (project / "meta.json").write_text("{}")
    code, _, err = _run(main, ["--gallery", lpr4m_mini, "--out", project, "--weights", tmp_path / "nope"], capsys)
    assert code == 2 and "is a non-empty folder that is not a gallery index" in err
    assert [p.name for p in project.iterdir()] == ["meta.json"]
    # two good images, one corrupt and one empty file: skipped and listed; --strict makes it fatal
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    live = next((lpr4m_mini / "gallery").iterdir())
    for p in sorted(live.iterdir())[:2]:
        shutil.copy(p, mixed / p.name)
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (mixed / "empty.png").write_bytes(b"")
    code, stdout, err = _run(main, ["--gallery", mixed, "--out", tmp_path / "o2", "--weights", emb_weights],
                             capsys)
    assert code == 0, err
    res = json.loads(stdout)
    assert res["ntotal"] == 2 and res["problems"]["total"] == 2
    assert any("broken.jpg" in m for m in res["problems"]["messages"])
    assert any("empty.png" in m for m in res["problems"]["messages"])
    code, _, err = _run(main, ["--gallery", mixed, "--out", tmp_path / "o3", "--weights", emb_weights,
                               "--strict"], capsys)
    assert code == 2 and err.startswith("error:") and not (tmp_path / "o3").exists()
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"garbage")
    code, _, err = _run(main, ["--gallery", only_bad, "--out", tmp_path / "o4", "--weights", emb_weights], capsys)
    assert code == 2 and "could be read" in err and not (tmp_path / "o4").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    code, _, err = _run(main, ["--gallery", lpr4m_mini, "--live", "nonexistent", "--out", tmp_path / "o5",
                               "--weights", emb_weights], capsys)
    assert code == 2 and "'nonexistent' is not a live-stream id" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (lpr4m_mini / "gallery").iterdir())[0] in err  # lists the known ids
    odd = tmp_path / "odd"  # a name that is not UTF-8 cannot be recorded in meta.json
    odd.mkdir()
    shutil.copy(one, odd / os.fsdecode(b"\xffproduct-0.jpg"))
    code, _, err = _run(main, ["--gallery", odd, "--out", tmp_path / "o6", "--weights", emb_weights], capsys)
    assert code == 2 and "not valid UTF-8" in err and not (tmp_path / "o6").exists()


@pytest.mark.gpu
def test_gpu_faiss_search_matches_cpu():
    import faiss
    if faiss.get_num_gpus() == 0:
        pytest.skip("GPU faiss not available (needs faiss-gpu and a CUDA device: ./setup.sh --gpu)")
    from pipeline.gallery import GalleryIndex
    x = _clustered(200)
    gi = GalleryIndex.from_vectors(x, _items(200), {"fingerprint": "fp"})
    q = _clustered(10, seed=5)
    gpu = gi.search(q, 5)  # the GPU copy is used for unrestricted search
    assert gi._gpu_index is not None
    ref = [_brute(x, _items(200), qq, 5) for qq in q]
    assert [[m.image_id for m in row] for row in gpu] == [[i for i, _ in r] for r in ref]
