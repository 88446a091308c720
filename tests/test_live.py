"""Live recognition on a stream made on the fly: PyAV writes HLS segments of the three demo clips into a folder
that a local HTTP server (loopback only) serves while ``pipeline/live.py`` reads it, with the bundled weights.
The server goes away for a while mid-stream and comes back. Plus the online segmenter against the batch one."""
from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"


class _Server:
    """``http.server`` on 127.0.0.1 over ``folder``; ``stop`` and ``start`` again on the same port."""

    def __init__(self, folder: Path):
        self.handler = functools.partial(_QuietHandler, directory=str(folder))
        self.port = None
        self.start()

    def start(self) -> None:
        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port or 0), self.handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _write_hls(folder: Path, clips: list[Path], speed: float, on_clip=None) -> list[tuple[float, float]]:
    """The clips one after another as a live HLS stream (2 s segments), written ``speed`` times faster than real
    time; returns each clip's (start, end) stream time."""
    import av
    from PIL import Image
    from lpr4m.frames import sample_frames
    fps, size = 10, (640, 360)
    out = av.open(str(folder / "live.m3u8"), "w", format="hls",
                  options={"hls_time": "2", "hls_list_size": "0", "hls_segment_type": "mpegts"})
    stream = out.add_stream("libx264", rate=fps)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.options = {"g": str(2 * fps), "keyint_min": str(2 * fps), "preset": "ultrafast"}
    spans, n = [], 0
    for c, clip in enumerate(clips):
        if on_clip is not None:
            on_clip(c)
        start = n / fps
        for f in sample_frames(clip, mode="fps", fps=fps):
            rgb = np.asarray(Image.fromarray(f.rgb).resize(size))
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = n
            for packet in stream.encode(frame):
                out.mux(packet)
            n += 1
            time.sleep(1.0 / fps / speed)
        spans.append((start, n / fps))
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return spans


def _read_events(proc, events: list, stamps: list) -> None:
    for line in proc.stdout:
        if line.startswith("{"):
            events.append(json.loads(line))
            stamps.append(time.monotonic())


@pytest.mark.timeout(240)
def test_live_hls_stream_events_while_written_and_reconnects(tmp_path):
    answers = json.loads((DEMO / "answers.json").read_text())["clips"]
    clips = sorted(answers)
    hls = tmp_path / "hls"
    hls.mkdir()
    server = _Server(hls)
    writer_done = []

    def outage(c: int) -> None:  # the server goes away for 2 s as the second clip starts
        if c == 1:
            server.stop()
            threading.Timer(2.0, server.start).start()

    writer = threading.Thread(target=lambda: writer_done.append((_write_hls(hls, [DEMO / "clips" / c for c in clips],
                                                                            speed=3.0, on_clip=outage),
                                                                 time.monotonic())), daemon=True)
    writer.start()
    while not (hls / "live.m3u8").exists():
        time.sleep(0.1)
    events_file = tmp_path / "events.jsonl"
    events_file.write_text('{"kept": "lines already in the file"}\n')
    proc = subprocess.Popen([sys.executable, str(REPO / "pipeline" / "live.py"), "--source",
                             f"http://127.0.0.1:{server.port}/live.m3u8", "--backend", "onnx", "--retries", "8",
                             "--timeout", "5", "--events", str(events_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(os.environ, LPR_CACHE_DIR=str(tmp_path / "cache")))
    events, stamps = [], []
    reader = threading.Thread(target=_read_events, args=(proc, events, stamps), daemon=True)
    reader.start()
    writer.join(120)
    try:
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    err = proc.stderr.read()
    assert proc.returncode == 0, err[-2000:]
    spans, written_at = writer_done[0]
    kinds = [e["event"] for e in events]
    # events arrived while the stream was still being written
    first_products = stamps[kinds.index("products")]
    assert first_products < written_at, "no product event before the stream ended"
    # the source dropped and the job reconnected and went on
    states = [e.get("state") for e in events if e["event"] == "source"]
    assert "dropped" in states and states.count("connected") >= 2, states
    assert "reconnecting in" in err
    # each demo clip's segment ranks its product first
    ends = [e for e in events if e["event"] == "segment_end"]
    tops = []
    for e in ends:
        top = e["products"][0]["image_id"]
        if not tops or tops[-1] != top:
            tops.append(top)
    assert tops == [answers[c]["image_ids"][0] for c in clips], [(e["start_s"], e["end_s"]) for e in ends]
    assert all(e["latency_s"] >= 0 for e in events if "latency_s" in e)
    assert kinds[-1] == "stopped" and events[-1]["segments"] >= 3
    lines = events_file.read_text().splitlines()
    assert lines[0] == '{"kept": "lines already in the file"}' and len(lines) == len(events) + 1


@pytest.mark.timeout(120)
def test_sigterm_closes_the_open_segment(tmp_path):
    hls = tmp_path / "hls"
    hls.mkdir()
    server = _Server(hls)
    clip = DEMO / "clips" / "demo-1.mp4"
    writer = threading.Thread(target=_write_hls, args=(hls, [clip, clip, clip], 1.0), daemon=True)
    writer.start()
    while not (hls / "live.m3u8").exists():
        time.sleep(0.1)
    proc = subprocess.Popen([sys.executable, str(REPO / "pipeline" / "live.py"), "--source",
                             f"http://127.0.0.1:{server.port}/live.m3u8", "--backend", "onnx", "--no-detector"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                            env=dict(os.environ, LPR_CACHE_DIR=str(tmp_path / "cache")))
    events, stamps = [], []
    reader = threading.Thread(target=_read_events, args=(proc, events, stamps), daemon=True)
    reader.start()
    deadline = time.monotonic() + 90
    while not any(e["event"] == "products" for e in events) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    reader.join(5)
    server.stop()
    kinds = [e["event"] for e in events]
    assert "segment_end" in kinds and kinds[-1] == "stopped"
    assert kinds.index("segment_end") > kinds.index("segment_start")


def test_online_segmenter_confirms_a_change_after_hysteresis_windows():
    from pipeline.segments import OnlineSegmenter, change_points
    e = np.eye(8)
    cases = [("AABBB", 2, [0, 2, None, None, None]),  # returns where the new segment starts, when confirmed
             ("AABAA", 2, [0]),                       # one odd window is absorbed
             ("AABCD", 2, [0]),                       # odd windows that disagree are not one new product
             ("AABCD", 1, [0, 2, 3, 4]),
             ("ABBAB", 3, [0])]
    for word, hyst, want in cases:
        seg = OnlineSegmenter(0.7, hyst)
        got = [seg.push(e["ABCD".index(c)], c) for c in word]
        starts = [s for s in got if s is not None]
        assert starts == [s for s in want if s is not None]
        assert change_points(np.stack([e["ABCD".index(c)] for c in word]), list(word), 0.7, hyst) == starts
    seg = OnlineSegmenter(0.7, 2)
    assert [seg.push(e[c], None) for c in (0, 0, 1, 1)] == [0, None, None, 2]  # embeddings alone, no labels


def test_live_source_refuses_a_missing_file_and_a_bad_webhook(tmp_path):
    from lpr4m.errors import BadInput
    from pipeline.livestream import LiveSource, Webhook
    with pytest.raises(BadInput, match="live source not found"):
        LiveSource(str(tmp_path / "nope.ts"))
    with pytest.raises(BadInput, match="http:// or https://"):
        Webhook("file:///etc/passwd")
