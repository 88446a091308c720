"""The recognition service as a real server process on 127.0.0.1 (uvicorn), the bundled ONNX weights and the
demo gallery: answers, auth, the bounded queue (429), bad uploads, gallery changes while queries run, metrics,
a live job's events over SSE, and the live page in headless Chromium (skipped where Chromium is absent)."""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"
KEY = "test-key-" + uuid.uuid4().hex[:8]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(base: str, path: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None,
             key: bool = True, timeout: float = 120) -> tuple[int, bytes]:
    h = dict(headers or {})
    if key:
        h["X-API-Key"] = KEY
    req = urllib.request.Request(base + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (name, body) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + body + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _recognize(base: str, clip: Path, name: str | None = None, key: bool = True) -> tuple[int, dict]:
    body, headers = _multipart({}, {"file": (name or clip.name, clip.read_bytes())})
    code, out = _request(base, "/v1/recognize", "POST", body, headers, key=key)
    return code, json.loads(out)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    port = _free_port()
    env = dict(os.environ, LPR_API_KEY=KEY, LPR_CACHE_DIR=str(tmp / "cache"))
    proc = subprocess.Popen([sys.executable, str(REPO / "pipeline" / "serve.py"), "--index", str(tmp / "index"),
                             "--gallery", str(DEMO / "gallery"), "--port", str(port), "--backend", "onnx",
                             "--workers", "1", "--queue", "1", "--max-upload-mb", "3", "--max-seconds", "60"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "w"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {(tmp / 'server.log').read_text()[-2000:]}")
        try:
            if _request(base, "/health", key=False, timeout=2)[0] == 200:
                break
        except OSError:
            time.sleep(0.5)
    yield {"base": base, "proc": proc, "tmp": tmp}
    proc.terminate()
    proc.wait(30)


def _answers() -> dict:
    return {c: v["image_ids"][0] for c, v in json.loads((DEMO / "answers.json").read_text())["clips"].items()}


def test_recognize_answers_like_run_py_and_needs_the_key(server):
    base = server["base"]
    code, out = _recognize(base, DEMO / "clips" / "demo-1.mp4", key=False)
    assert code == 401 and "API key" in out["error"]
    code, out = _recognize(base, DEMO / "clips" / "demo-1.mp4")
    assert code == 200, out
    assert out["products"][0]["image_id"] == _answers()["demo-1.mp4"] and out["clip"] == "demo-1.mp4"
    assert {"n_frames", "frames", "timings_ms_per_frame", "settings"} <= set(out)
    code, body = _request(base, "/health", key=False)
    assert code == 200 and json.loads(body)["gallery_images"] == 19
    code, body = _request(base, "/openapi.json", key=False)
    assert code == 200 and "/v1/recognize" in json.loads(body)["paths"]


def test_bad_uploads_get_a_clear_4xx_and_the_server_stays_up(server, tmp_path):
    base = server["base"]
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n")
    trunc = tmp_path / "trunc.mp4"
    trunc.write_bytes((DEMO / "clips" / "demo-1.mp4").read_bytes()[:20_000])
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(4 * 2**20))
    for clip, code_want, words in ((text, 400, "not a readable video"), (trunc, 400, ""), (big, 413, "3 MB")):
        code, out = _recognize(base, clip)
        assert code == code_want and words in out["error"], (clip.name, code, out)
        assert "Traceback" not in out["error"] and len(out["error"].splitlines()) == 1
    code, body = _request(base, "/v1/recognize", "POST", b"{}", {"Content-Type": "application/json"})
    assert code in (400, 422)
    assert _recognize(base, DEMO / "clips" / "demo-2.mp4")[0] == 200  # still serving
    assert server["proc"].poll() is None


def test_concurrent_clients_get_answers_or_429_and_none_is_lost(server):
    base = server["base"]
    answers = _answers()
    clips = sorted(answers) * 3  # 9 clients at once; 1 worker + 1 waiting
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        results = list(pool.map(lambda c: (c, *_recognize(base, DEMO / "clips" / c)), clips))
    codes = [code for _, code, _ in results]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 2, codes
    for clip, code, out in results:
        if code == 200:
            assert out["products"][0]["image_id"] == answers[clip]
        else:
            assert "busy" in out["error"]
    code, body = _request(base, "/metrics")
    text = body.decode()
    assert code == 200 and 'lpr_requests_total{route="/v1/recognize",status="429"}' in text
    assert "lpr_stage_seconds_per_frame_bucket" in text
    assert _request(base, "/metrics", key=False)[0] == 401


def test_gallery_remove_and_add_while_queries_run(server):
    base = server["base"]
    answer = _answers()["demo-1.mp4"]
    views = sorted((DEMO / "gallery").glob(f"{answer}-*.jpg"))
    stop, errors = threading.Event(), []

    def query_loop():
        while not stop.is_set():
            code, out = _recognize(base, DEMO / "clips" / "demo-3.mp4")
            if code not in (200, 429):
                errors.append((code, out))

    t = threading.Thread(target=query_loop)
    t.start()
    try:
        code, body = _request(base, f"/v1/gallery/{answer}", "DELETE")
        assert code == 200 and json.loads(body)["ntotal"] == 19 - len(views)
        code, out = _recognize(base, DEMO / "clips" / "demo-1.mp4")
        while code == 429:
            code, out = _recognize(base, DEMO / "clips" / "demo-1.mp4")
        assert code == 200 and answer not in [p["image_id"] for p in out["products"]]
        body, headers = _multipart({"image_id": answer, "title": "back again"},
                                   {"file": (views[0].name, views[0].read_bytes())})
        code, body = _request(base, "/v1/gallery", "POST", body, headers)
        assert code == 200 and json.loads(body)["ntotal"] == 19 - len(views) + 1, body
        code, out = _recognize(base, DEMO / "clips" / "demo-1.mp4")
        while code == 429:
            code, out = _recognize(base, DEMO / "clips" / "demo-1.mp4")
        assert out["products"][0]["image_id"] == answer and out["products"][0]["title"] == "back again"
        assert _request(base, "/v1/gallery/nope", "DELETE")[0] == 404
        body, headers = _multipart({"image_id": "../evil"}, {"file": ("x.jpg", b"jpeg")})
        assert _request(base, "/v1/gallery", "POST", body, headers)[0] == 400
    finally:
        stop.set()
        t.join(120)
    assert not errors


def _start_live_job(base: str, folder: Path):
    """A live HLS stream of demo-2 on a local HTTP server, and a service job reading it."""
    from test_live import _Server, _write_hls
    folder.mkdir()
    http = _Server(folder)
    writer = threading.Thread(target=_write_hls, args=(folder, [DEMO / "clips" / "demo-2.mp4"], 2.0), daemon=True)
    writer.start()
    while not (folder / "live.m3u8").exists():
        time.sleep(0.1)
    code, body = _request(base, "/v1/live", "POST",
                          json.dumps({"source": f"http://127.0.0.1:{http.port}/live.m3u8"}).encode(),
                          {"Content-Type": "application/json"})
    assert code == 200, body
    return json.loads(body), http


def test_live_job_events_over_sse(server, tmp_path):
    base = server["base"]
    assert _request(base, "/v1/live", "POST", json.dumps({"source": "/etc/passwd"}).encode(),
                    {"Content-Type": "application/json"})[0] == 400  # no local files unless allowed
    job, http = _start_live_job(base, tmp_path / "hls")
    events = []
    req = urllib.request.Request(base + job["events"], headers={"X-API-Key": KEY})
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["event"] == "stopped":
                    break
    http.stop()
    kinds = [e["event"] for e in events]
    assert "products" in kinds and kinds[-1] == "stopped", kinds
    ends = [e for e in events if e["event"] == "segment_end"]
    assert ends and ends[-1]["products"][0]["image_id"] == _answers()["demo-2.mp4"]
    code, body = _request(base, "/v1/live")
    assert code == 200 and job["id"] in [j["id"] for j in json.loads(body)]
    code, page = _request(base, job["page"], key=False)
    assert code == 200 and b"EventSource" in page


def test_live_page_in_headless_chromium(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium not installed (Debian package 'chromium')")
    job, http = _start_live_job(server["base"], tmp_path / "hls")
    time.sleep(8)  # a few windows into the stream
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", f"{server['base']}{job['page']}?key={KEY}"], capture_output=True,
                         text=True, timeout=60).stdout
    http.stop()
    assert "Lulo zero gold" in dom  # the product presented now, from the job's events
