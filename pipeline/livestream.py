"""Recognition on a stream that is still running: a live source, online segmentation, product events.

``LiveSource`` reads any source FFmpeg opens (RTMP, HLS ``.m3u8``, SRT, RTSP, HTTP-FLV, a capture device such
as ``/dev/video0``, a file; ``follow`` reads a file that is still being written) in a thread, keeps one frame
per ``1/fps`` seconds of stream time and hands on the newest ones: when recognition falls behind, the oldest
waiting frames are dropped and counted rather than queued, so latency stays bounded (a file waits instead). A
dropped connection is reopened with exponential back-off, and said so in an event.

``LiveJob`` runs the recogniser on those frames, cuts them into windows, segments them online with the same
rules as ``pipeline/segments.py`` (``OnlineSegmenter``) and emits events as JSON-able dicts:

- ``source``: ``connected`` / ``dropped`` (with the reason and the retry delay) / ``ended`` / ``gave_up``;
- ``segment_start``, then ``products`` after every window (the segment's ranking so far: products with scores
  and the frame times that support them), then ``segment_end`` with the final ranking;
- ``stopped`` (frames read, processed and dropped, segments), always last.

Every segment and product event carries ``latency_s``: wall time from the arrival of the newest frame it is
based on to the event. A segment keeps at most ``max_segment_frames`` frame results (the newest), so memory is
flat however long the stream runs.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import queue
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from lpr4m.errors import BadInput

logger = logging.getLogger(__name__)

NETWORK_SCHEMES = ("rtmp", "rtmps", "rtsp", "rtsps", "srt", "http", "https", "udp", "tcp", "rtp")


@dataclass
class LiveFrame:
    index: int
    time_s: float  # stream time from the first frame read
    rgb: np.ndarray
    arrival: float  # time.monotonic() when it was decoded


def is_network(source: str) -> bool:
    return "://" in source and source.split("://", 1)[0].lower() in NETWORK_SCHEMES


class LiveSource:
    """Frames of a live source at ``fps`` frames per second of stream time, read in a thread (see module doc)."""

    def __init__(self, source: str, fps: float = 1.0, follow: bool = False, retries: int = 10,
                 backoff: tuple[float, float] = (1.0, 30.0), timeout_s: float = 10.0, depth: int = 4,
                 input_format: str | None = None, on_event: Callable[[dict], None] | None = None):
        if not (fps > 0 and math.isfinite(fps)):
            raise ValueError(f"fps must be > 0, got {fps}")
        self.source = str(source)
        self.network = is_network(self.source)
        if not self.network and not Path(self.source).exists():
            raise BadInput(self.source, "live source not found (expected a URL such as rtmp://, srt://, "
                                        "http(s)://...m3u8, a capture device or a file)")
        self.step = 1.0 / fps
        self.follow = follow
        self.retries = retries
        self.backoff = backoff
        self.timeout_s = timeout_s
        self.format = input_format or ("v4l2" if self.source.startswith("/dev/video") else None)
        self.realtime = self.network or self.format is not None  # frames arrive at the stream's own pace
        self.on_event = on_event or (lambda e: None)
        self.frames_read = self.frames_dropped = self.reconnects = 0
        self._buf: collections.deque = collections.deque()
        self._depth = max(1, depth)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._done = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- the reader thread ------------------------------------------------------------------------------------
    def _open(self):
        import av
        return av.open(self.source, format=self.format, timeout=(self.timeout_s, self.timeout_s),
                       metadata_errors="ignore")

    def _push(self, frame: LiveFrame) -> None:
        with self._cond:
            while not self.realtime and len(self._buf) >= self._depth and not self._stop.is_set():
                self._cond.wait(0.2)  # a file waits for recognition; only a real-time source cannot
            if len(self._buf) >= self._depth:
                self._buf.popleft()
                self.frames_dropped += 1
            self._buf.append(frame)
            self._cond.notify_all()

    def _read(self) -> None:
        import av
        failures, next_t, last_t, offset, first, index = 0, 0.0, None, 0.0, None, 0
        while not self._stop.is_set():
            reason, live = None, True
            try:
                container = self._open()
            except (av.FFmpegError, OSError) as e:
                container, reason = None, str(e).splitlines()[0][:200]
            if container is not None:
                failures = 0
                # a source with a known length (a file, an ended HLS playlist) is finite; a live one is not
                live = container.duration is None
                self.on_event({"event": "source", "state": "connected", "source": self.source, "live": live})
                try:
                    stream = container.streams.video[0]
                    stream.thread_type = "AUTO"
                    anchored = False
                    for frame in container.decode(stream):
                        if self._stop.is_set():
                            break
                        if frame.time is None:
                            continue
                        first = frame.time if first is None else first
                        t = frame.time - first + offset
                        if not anchored:
                            anchored = True
                            if live and last_t is not None and t < last_t - 1.0:
                                # a live source whose clock restarted on reconnecting: go on from where it was
                                offset += last_t + self.step - t
                                t = last_t + self.step
                        if last_t is not None and t <= last_t:
                            continue  # seen before the connection dropped (or the followed file was reopened)
                        last_t = t
                        if t + 1e-6 < next_t:
                            continue
                        next_t = max(next_t + self.step, t + self.step / 2)
                        self.frames_read += 1
                        self._push(LiveFrame(index, t, frame.to_ndarray(format="rgb24"), time.monotonic()))
                        index += 1
                except (av.FFmpegError, OSError, IndexError) as e:
                    reason = str(e).splitlines()[0][:200] or type(e).__name__
                finally:
                    container.close()
            if self._stop.is_set():
                return
            if container is not None and reason is None:  # a clean end of stream
                if self.follow and not self.network:
                    self._stop.wait(self.backoff[0])  # a file still being written: look again for more
                    continue
                if not live:
                    self.on_event({"event": "source", "state": "ended", "source": self.source})
                    return
            failures += 1
            if failures > self.retries:
                self.on_event({"event": "source", "state": "gave_up", "source": self.source, "reason": reason,
                               "attempts": failures})
                return
            delay = min(self.backoff[1], self.backoff[0] * 2 ** (failures - 1))
            self.reconnects += 1
            logger.warning("%s: source dropped (%s); reconnecting in %.1f s (attempt %d of %d)", self.source,
                           reason or "end of stream", delay, failures, self.retries)
            self.on_event({"event": "source", "state": "dropped", "source": self.source,
                           "reason": reason or "end of stream", "retry_in_s": delay, "attempt": failures})
            self._stop.wait(delay)

    def _run(self) -> None:
        try:
            self._read()
        except BaseException as e:  # handed to the consumer
            self._error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    # -- the consumer side ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[LiveFrame]:
        self._thread = threading.Thread(target=self._run, name="lpr-live-source", daemon=True)
        self._thread.start()
        while True:
            with self._cond:
                while not self._buf and not self._done:
                    self._cond.wait(0.2)
                if not self._buf:
                    break
                frame = self._buf.popleft()
                self._cond.notify_all()
            yield frame
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()


# -- event sinks --------------------------------------------------------------------------------------------------
class JsonLines:
    """Each event as one JSON line, flushed at once (stdout, or a file opened for appending)."""

    def __init__(self, stream):
        self.stream = stream

    def __call__(self, event: dict) -> None:
        self.stream.write(json.dumps(event, separators=(",", ":")) + "\n")
        self.stream.flush()


class Webhook:
    """POSTs each event as JSON to ``url`` from a thread; a slow or failing endpoint never blocks recognition
    (at most ``queue_size`` events wait, older ones are dropped and counted)."""

    def __init__(self, url: str, timeout_s: float = 5.0, queue_size: int = 1000):
        if not url.startswith(("http://", "https://")):
            raise BadInput(url, "webhook must be an http:// or https:// URL")
        self.url, self.timeout_s = url, timeout_s
        self.q: queue.Queue = queue.Queue(maxsize=queue_size)
        self.failed = self.dropped = 0
        self.thread = threading.Thread(target=self._work, name="lpr-webhook", daemon=True)
        self.thread.start()

    def __call__(self, event: dict) -> None:
        try:
            self.q.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def _work(self) -> None:
        while True:
            event = self.q.get()
            if event is None:
                return
            req = urllib.request.Request(self.url, data=json.dumps(event).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=self.timeout_s).close()
            except OSError as e:
                self.failed += 1
                logger.warning("webhook %s: %s", self.url, e)

    def close(self, wait_s: float = 5.0) -> None:
        self.q.put(None)
        self.thread.join(wait_s)


# -- the job ------------------------------------------------------------------------------------------------------
class LiveJob:
    """Recognise products on a ``LiveSource`` and emit events (see module doc) to ``emit``."""

    def __init__(self, source: LiveSource, embedder, gallery, detector=None, emit: Callable[[dict], None] = print,
                 window_s: float = 3.0, threshold: float = 0.7, hysteresis: int = 2, k: int = 5,
                 method: str | None = None, live_id: str | None = None, crop_policy: str = "fuse",
                 max_segment_frames: int = 600):
        from pipeline.recognize import Recognizer
        from pipeline.segments import OnlineSegmenter
        self.source, self.embedder, self.gallery = source, embedder, gallery
        self.emit_fn = emit
        self.window = max(1, round(window_s * (1.0 / source.step)))
        self.k, self.live_id = k, live_id
        self.method = method or getattr(getattr(embedder, "config", None), "aggregation", None) or "mean"
        self.rec = Recognizer(embedder, detector, batch=1, crop_policy=crop_policy)
        self.segmenter = OnlineSegmenter(threshold, hysteresis)
        self.max_segment_frames = max_segment_frames
        self.segment: dict | None = None  # {"n", "start_s", "frames": deque of FrameResult, "top"}
        self.unassigned: list[tuple[int, list]] = []  # (window index, frame results) not yet in a segment
        self.segments = 0
        self.latencies: collections.deque = collections.deque(maxlen=10_000)
        self._lock = threading.Lock()
        source.on_event = self.emit

    def emit(self, event: dict) -> None:
        event = {"time": round(time.time(), 3), **event}
        with self._lock:
            self.emit_fn(event)

    def _ranking(self) -> list[dict]:
        from pipeline.recognize import search_clip
        return search_clip(list(self.segment["frames"]), self.gallery, self.k, self.method, self.embedder,
                           self.live_id)

    def _segment_event(self, kind: str, newest_arrival: float, products: list[dict] | None = None) -> None:
        frames = self.segment["frames"]
        latency = time.monotonic() - newest_arrival
        self.latencies.append(latency)
        ev = {"event": kind, "segment": self.segment["n"], "start_s": round(self.segment["start_s"], 3),
              "latency_s": round(latency, 3)}
        if kind != "segment_start":
            ev["end_s"] = round(frames[-1].time_s + self.source.step, 3)
            ev["n_frames"] = self.segment["count"]
            ev["products"] = products if products is not None else self._ranking()
        self.emit(ev)

    def _open_segment(self, windows: list[tuple[int, list]], arrival: float) -> None:
        self.segments += 1
        frames = [r for _, rs in windows for r in rs]
        self.segment = {"n": self.segments, "start_s": frames[0].time_s,
                        "frames": collections.deque(maxlen=self.max_segment_frames), "count": 0}
        self._segment_event("segment_start", arrival)
        self._extend(frames)

    def _extend(self, frames: list) -> None:
        self.segment["frames"].extend(frames)
        self.segment["count"] += len(frames)

    def _close_segment(self, arrival: float) -> None:
        if self.segment is not None and self.segment["frames"]:
            self._segment_event("segment_end", arrival)
        self.segment = None

    def _on_window(self, j: int, results: list, arrival: float) -> None:
        from pipeline.recognize import frame_embedding
        w = np.mean([frame_embedding(r) for r in results], axis=0)
        w = w / max(float(np.linalg.norm(w)), 1e-12)
        top = self.gallery.search(w[None], 1, live_id=self.live_id)[0]
        self.unassigned.append((j, results))
        start = self.segmenter.push(w, top[0].image_id if top else None)
        if start is not None:
            before = [u for u in self.unassigned if u[0] < start]
            if self.segment is not None and before:
                self._extend([r for _, rs in before for r in rs])
            self._close_segment(arrival)
            self._open_segment([u for u in self.unassigned if u[0] >= start], arrival)
            self.unassigned = []
        else:
            pending = {p[0] for p in self.segmenter.pending}
            settled = [u for u in self.unassigned if u[0] not in pending]
            self.unassigned = [u for u in self.unassigned if u[0] in pending]
            if settled:
                self._extend([r for _, rs in settled for r in rs])
        if self.segment is not None:
            self._segment_event("products", arrival)

    def run(self) -> dict:
        """Until the source ends or ``stop()``; the open segment is closed (flushed) either way."""
        window: list = []
        arrivals: dict[int, float] = {}
        j, last_arrival = 0, time.monotonic()
        try:
            for r in self.rec.stream(self._frames(arrivals)):
                last_arrival = arrivals.pop(r.index, last_arrival)
                window.append(r)
                if len(window) >= self.window:
                    self._on_window(j, window, last_arrival)
                    window, j = [], j + 1
        finally:
            if window:
                self._on_window(j, window, last_arrival)
            if self.unassigned and self.segment is not None:
                self._extend([r for _, rs in self.unassigned for r in rs])
            self.unassigned = []
            self._close_segment(last_arrival)
            summary = self.summary()
            self.emit({"event": "stopped", **summary})
        return summary

    def _frames(self, arrivals: dict) -> Iterator:
        for f in self.source:
            arrivals[f.index] = f.arrival
            yield f

    def stop(self) -> None:
        self.source.stop()

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        return {"frames_read": self.source.frames_read, "frames_processed": self.rec.n_frames,
                "frames_dropped": self.source.frames_dropped, "reconnects": self.source.reconnects,
                "segments": self.segments,
                "latency_s_median": round(lat[len(lat) // 2], 3) if lat else None,
                "latency_s_p95": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None}
