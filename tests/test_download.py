"""download (real img2dataset against a local HTTP server) + regroup into the LPR4M layout.

The server listens on 127.0.0.1 only, serves generated JPEGs under LPR4M-style URLs, answers 404 for some and
counts every request, so the test can see that a re-run of the download fetches nothing twice.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lpr4m.cli import run_main
from lpr4m.download import download_main, read_url_list, regroup, regroup_main
from lpr4m.errors import BadInput, Problems

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 150


def _uuid(i: int) -> str:
    return str(uuid.UUID(int=0x5EED0000 + i))


LIVE = _uuid(1)
VIDEO = f"{LIVE}-1000-61000"
QVIDEO = f"{_uuid(2)}-0-30000"
IMG_A, IMG_B, IMG_T = _uuid(10), _uuid(11), _uuid(12)

# served path -> (layout relpath or None when the URL carries no LPR4M id, (width, height), RGB colour)
SERVED = {
    f"/lpr4m/training_video/{VIDEO}/{VIDEO}-0000.jpg": (f"training_video/{VIDEO}/{VIDEO}-0000.jpg", (320, 180),
                                                          (200, 30, 30)),
    f"/lpr4m/training_video/{VIDEO}/{VIDEO}-0001.jpg": (f"training_video/{VIDEO}/{VIDEO}-0001.jpg", (640, 360),
                                                          (30, 200, 30)),
    f"/lpr4m/query/{QVIDEO}/{QVIDEO}-0000.jpg": (f"query/{QVIDEO}/{QVIDEO}-0000.jpg", (180, 320), (30, 30, 200)),
    f"/lpr4m/gallery/{LIVE}/{IMG_A}-0.jpg": (f"gallery/{LIVE}/{IMG_A}-0.jpg", (400, 400), (200, 200, 30)),
    f"/lpr4m/gallery/{LIVE}/{IMG_A}-1.jpg": (f"gallery/{LIVE}/{IMG_A}-1.jpg", (100, 150), (200, 30, 200)),
    f"/lpr4m/gallery/{LIVE}/{IMG_B}-0.jpg": (f"gallery/{LIVE}/{IMG_B}-0.jpg", (500, 300), (30, 200, 200)),
    f"/lpr4m/training_image/{IMG_T}.jpg": (f"training_image/{IMG_T}.jpg", (300, 500), (120, 120, 120)),
    "/lpr4m/misc/banner.jpg": (None, (64, 64), (250, 250, 250)),  # downloads, but names no id
}
MISSING = [f"/lpr4m/gallery/{LIVE}/{_uuid(20)}-0.jpg", f"/lpr4m/training_video/{VIDEO}/{VIDEO}-0002.jpg"]
N_PLACED = sum(rel is not None for rel, _, _ in SERVED.values())


def _jpeg(size, colour) -> bytes:
    w, h = size
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = colour
    rgb[: h // 4, : w // 4] = 255 - np.array(colour, np.uint8)  # a corner mark: orientation survives resizing
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95)
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    images: dict[str, bytes] = {}
    hits: Counter = Counter()
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802  (http.server API)
        with self.lock:
            self.hits[self.path] += 1
        body = self.images.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def server():
    _Handler.images = {path: _jpeg(size, colour) for path, (_, size, colour) in SERVED.items()}
    _Handler.hits = Counter()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler.hits
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _cli(*args: str) -> tuple[int, str, str]:
    """``python -m lpr4m ...`` in its own process group, killed whole (img2dataset's workers too) on timeout."""
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lpr4m", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"lpr4m {args[0]} hung for {CLI_TIMEOUT_S} s; stderr tail:\n{err[-3000:]}")
    return proc.returncode, out, err


def _write_list(path: Path, base: str) -> None:
    lines = [
        "# LPR4M-style URL list",
        *(base + p for p in list(SERVED)[:4]),
        "",
        "ftp://127.0.0.1/lpr4m/training_image/x.jpg",  # not http(s)
        "not a url at all",
        *(base + p for p in list(SERVED)[4:]),
        base + list(SERVED)[0],  # duplicate
        *(base + p for p in MISSING),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _mean_colour(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"), np.float32)
    h, w = rgb.shape[:2]
    return rgb[h // 2:, w // 2:].reshape(-1, 3).mean(0)  # away from the corner mark


def _check_layout(root: Path) -> None:
    """Every served image sits at its layout path, resized like img2dataset keep_ratio, with its own pixels."""
    for _, (rel, (w, h), colour) in SERVED.items():
        if rel is None:
            continue
        dest = root / rel
        assert dest.is_file(), rel
        with Image.open(dest) as im:
            assert im.format == "JPEG"
            rw, rh = im.size
        # img2dataset keep_ratio: the SHORT side becomes image_size (256), the aspect ratio is kept
        assert min(rw, rh) == 256, (rel, im.size)
        assert abs(rw / rh - w / h) < 0.02, (rel, im.size, (w, h))
        assert np.abs(_mean_colour(dest) - np.array(colour)).max() < 12, rel
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == sorted(rel for rel, _, _ in SERVED.values() if rel is not None)


def test_download_then_regroup(server, tmp_path):
    base, hits = server
    url_list = tmp_path / "urls.txt"
    _write_list(url_list, base)
    shards, root = tmp_path / "shards", tmp_path / "lpr4m"
    common = ["--processes", "1", "--threads", "4", "--timeout", "5", "--samples-per-shard", "6"]

    t0 = time.perf_counter()
    rc, out, err = _cli("download", str(url_list), str(shards), *common)
    t_download = time.perf_counter() - t0
    assert rc == 0, err[-3000:]
    summary = json.loads(out)  # stdout holds only our JSON (img2dataset's chatter goes to stderr)
    n_urls = len(SERVED) + len(MISSING)
    assert summary["url_list"]["urls"] == n_urls
    assert summary["url_list"]["skipped"]["by_kind"] == {"not_http_url": 2}
    assert any(":7:" in m for m in summary["url_list"]["skipped"]["messages"])  # file:line of the ftp line
    assert summary["url_list"]["duplicate"] == 1 and summary["url_list"]["comment"] == 1
    assert summary["expected_shards"] == 2 and summary["unfinished_shards"] == []
    total = summary["total"]
    assert total["shards"] == 2 and total["samples"] == n_urls
    assert total["successes"] == len(SERVED)
    assert total["failures"] == {"failed_to_download": len(MISSING), "failed_to_resize": 0}
    assert sum(n for msg, n in total["errors"].items() if "404" in msg) == len(MISSING)
    assert all(hits[p] == 1 for p in list(SERVED) + MISSING), dict(hits)
    assert sorted(hits) == sorted(list(SERVED) + MISSING)

    # same command again: both shards are done, nothing is fetched
    rc, out, err = _cli("download", str(url_list), str(shards), *common)
    assert rc == 0, err[-3000:]
    again = json.loads(out)
    assert again["skipped_done_shards"] == 2 and again["this_run"]["shards"] == 0
    assert again["total"] == total
    assert all(n == 1 for n in hits.values()), dict(hits)

    t0 = time.perf_counter()
    report_path = tmp_path / "regroup.json"
    assert regroup_main([str(shards), str(root), "--out", str(report_path)]) == 0
    t_regroup = time.perf_counter() - t0
    report = json.loads(report_path.read_text())
    t = report["totals"]
    assert t["placed"] == N_PLACED and t.get("already", 0) == 0
    assert t["failed_to_download"] == len(MISSING) and t["unmapped_url"] == 1
    assert t.get("conflict", 0) == 0 and t.get("missing_file", 0) == 0
    assert report["placed_by_kind"] == {"gallery_image": 3, "query_frame": 1, "training_frame": 2,
                                        "training_image": 1}
    failed = [f for s in report["per_shard"] for f in s["failures"] if f["kind"] == "failed_to_download"]
    assert sorted(f["url"] for f in failed) == sorted(base + p for p in MISSING)
    assert all("404" in f["message"] for f in failed)
    _check_layout(root)
    # default mode hard-links (same filesystem): no second copy of the bytes
    shard_files = {p.read_bytes(): p for p in shards.glob("0000*/*.jpg")}
    for rel, _, _ in SERVED.values():
        if rel:
            assert os.path.samefile(root / rel, shard_files[(root / rel).read_bytes()])

    # idempotent: a second regroup places nothing and changes nothing
    snapshot = {p: p.read_bytes() for p in root.rglob("*.jpg")}
    again = regroup(shards, root)
    assert again["totals"].get("placed", 0) == 0
    assert again["totals"]["already"] == N_PLACED and "conflict" not in again["totals"]
    assert {p: p.read_bytes() for p in root.rglob("*.jpg")} == snapshot

    # a different file already at a target is kept and reported, and is fatal under --strict
    victim = root / SERVED[f"/lpr4m/training_image/{IMG_T}.jpg"][0]
    victim.unlink()
    victim.write_bytes(b"not the downloaded image")
    clash = regroup(shards, root)
    assert clash["totals"]["conflict"] == 1 and clash["problems"]["by_kind"]["conflict"] == 1
    assert victim.read_bytes() == b"not the downloaded image"
    assert run_main(regroup_main, [str(shards), str(root), "--strict"]) == 2

    # --copy: independent files with the same bytes
    copied = regroup(shards, tmp_path / "copied", mode="copy")
    assert copied["totals"]["placed"] == N_PLACED
    _check_layout(tmp_path / "copied")
    for rel, _, _ in SERVED.values():
        if rel:
            dest = tmp_path / "copied" / rel
            assert not os.path.samefile(dest, shard_files[dest.read_bytes()])

    # --move empties the shard folders; a re-run finds everything in place
    moving = tmp_path / "shards-copy"
    shutil.copytree(shards, moving)
    moved = regroup(moving, tmp_path / "moved", mode="move")
    assert moved["totals"]["placed"] == N_PLACED
    left = list(moving.glob("0000*/*.jpg"))  # only the banner (no id in its URL) stays
    assert len(left) == 1 and json.loads(left[0].with_suffix(".json").read_text())["url"].endswith("banner.jpg")
    _check_layout(tmp_path / "moved")
    assert regroup(moving, tmp_path / "moved", mode="move")["totals"]["already"] == N_PLACED

    print(f"\ndownload of {n_urls} URLs ({len(SERVED)} images): {t_download:.1f} s (first run, incl. "
          f"interpreter + img2dataset start); regroup: {t_regroup:.2f} s")


def test_unfinished_shard_is_downloaded_again(server, tmp_path):
    """A shard without its _stats.json (interrupted run) is fetched again; finished shards are not."""
    base, hits = server
    paths = list(SERVED)[:4]
    url_list = tmp_path / "urls.txt"
    url_list.write_text("".join(base + p + "\n" for p in paths))
    shards = tmp_path / "shards"
    before = Counter(hits)
    common = ["--processes", "1", "--threads", "2", "--timeout", "5", "--samples-per-shard", "2"]
    rc, out, err = _cli("download", str(url_list), str(shards), *common)
    assert rc == 0, err[-3000:]
    assert json.loads(out)["total"]["successes"] == 4
    (shards / "00001_stats.json").unlink()
    rc, out, err = _cli("download", str(url_list), str(shards), *common)
    assert rc == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["skipped_done_shards"] == 1 and summary["this_run"]["shards"] == 1
    assert [hits[p] - before[p] for p in paths] == [1, 1, 2, 2]

    # another list into the same folder: incremental mode would skip by shard number, so it is refused
    url_list.write_text("".join(base + p + "\n" for p in reversed(paths)))
    assert run_main(download_main, [str(url_list), str(shards), *common]) == 2


def test_url_list_validation(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("http://127.0.0.1:9/a,b.jpg\n\nhttps://h/x.jpg\nfile:///etc/passwd\n")
    urls, report = read_url_list(bad, Problems())
    assert urls == ["http://127.0.0.1:9/a%2Cb.jpg", "https://h/x.jpg"]  # comma: img2dataset reads txt as CSV
    assert report["percent_encoded"] == 1 and report["blank"] == 1 and report["skipped"]["total"] == 1
    with pytest.raises(BadInput, match=r"bad\.txt:4: not an http\(s\) URL"):
        read_url_list(bad, Problems(strict=True))

    out = tmp_path / "shards"
    assert run_main(download_main, [str(bad), str(out), "--strict"]) == 2
    assert "bad.txt:4:" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    assert run_main(download_main, [str(empty), str(out)]) == 2
    assert "no http(s) URLs" in capsys.readouterr().err
    assert run_main(download_main, [str(tmp_path / "absent.txt"), str(out)]) == 2
    assert "URL list not found" in capsys.readouterr().err
    assert not out.exists()  # nothing started

    # a folder that is not img2dataset output would crash img2dataset's incremental scan: refused up front
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    assert run_main(download_main, [str(tmp_path / "bad.txt"), str(foreign)]) == 2
    assert "_stats.json" in capsys.readouterr().err


def test_missing_distributor_package(tmp_path, capsys):
    import importlib.util
    missing = [d for d in ("pyspark", "ray") if importlib.util.find_spec(d) is None]
    if not missing:
        pytest.skip("pyspark and ray are both installed")
    urls = tmp_path / "u.txt"
    urls.write_text("http://127.0.0.1:9/x.jpg\n")
    assert run_main(download_main, [str(urls), str(tmp_path / "o"), "--distributor", missing[0]]) == 2
    assert f"pip install {missing[0]}" in capsys.readouterr().err


def test_regroup_bad_inputs(tmp_path, capsys):
    assert run_main(regroup_main, [str(tmp_path / "none"), str(tmp_path / "root")]) == 2
    assert "shards folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_main(regroup_main, [str(tmp_path / "empty"), str(tmp_path / "root")]) == 2
    # a sample whose URL would escape the root is refused by the id checks, never written
    shard = tmp_path / "s" / "00000"
    shard.mkdir(parents=True)
    (shard / "000000000.jpg").write_bytes(_jpeg((8, 8), (1, 2, 3)))
    (shard / "000000000.json").write_text(json.dumps({"url": "http://h/gallery/../../etc/x.jpg",
                                                       "status": "success"}))
    (shard / "000000001.json").write_text(json.dumps({"url": f"http://h/training_image/{IMG_T}.jpg",
                                                       "status": "success"}))  # its image is missing
    (shard / "000000002.json").write_text("{trunc")
    rep = regroup(tmp_path / "s", tmp_path / "root")
    assert rep["totals"]["unmapped_url"] == 1 and rep["totals"]["missing_file"] == 1
    assert rep["problems"]["by_kind"] == {"unmapped_url": 1, "missing_file": 1, "bad_json": 1}
    assert not any(p.is_file() for p in (tmp_path / "root").rglob("*"))
    assert run_main(regroup_main, [str(tmp_path / "s"), str(tmp_path / "root"), "--strict"]) == 2
