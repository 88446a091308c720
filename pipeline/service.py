"""The recognition service behind ``python pipeline/serve.py``: a FastAPI app over one loaded pipeline.

- ``POST /v1/recognize``: a clip (multipart ``file``, or form field ``url``) -> the JSON of ``run.py --json``.
  Work runs in ``workers`` threads; at most ``queue`` more requests wait, the next is answered 429. Uploads over
  ``max_upload_mb`` get 413, clips longer than ``max_seconds`` 422, anything that is not a readable video 400.
- ``POST /v1/live`` ``{"source": URL}``, ``GET /v1/live``, ``DELETE /v1/live/{id}``: live jobs
  (``pipeline/livestream.py``); ``GET /v1/live/{id}/events``: their events as Server-Sent Events.
- ``GET/POST /v1/gallery``, ``DELETE /v1/gallery/{image_id}``, ``GET /v1/gallery/{image_id}/image``: the shop
  images. A change is made on a copy of the index, saved, then swapped in: queries running meanwhile finish on
  the old one; the index still refuses an embedder other than its own.
- ``/health``, Prometheus ``/metrics``, OpenAPI docs at ``/docs``, and a page per live job at ``/live/{id}``.
- With an API key, every ``/v1`` route and ``/metrics`` need ``X-API-Key`` (or ``?key=`` for the page's
  event stream).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import html
import json
import logging
import os
import secrets
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse

from lpr4m.errors import BadInput
from lpr4m.ids import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclass
class ServiceConfig:
    index: Path
    backend: str = "onnx"
    device: str = "cpu"
    weights: str | None = None
    detector_weights: str | None = None
    detector: bool = True
    fps: float = 1.0
    topk: int = 5
    workers: int = 1
    queue: int = 4
    max_upload_mb: float = 200.0
    max_seconds: float = 600.0
    max_live_jobs: int = 4
    api_key: str | None = None
    allow_file_sources: bool = False
    uploads: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "lpr-serve-uploads")


class _Busy(Exception):
    pass


class _Slots:
    """``workers`` running + ``queue`` waiting; one more is refused at once (429), never queued unbounded."""

    def __init__(self, workers: int, queue: int):
        self.sem = threading.BoundedSemaphore(workers + queue)
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="lpr-work")
        self.waiting = 0
        self.lock = threading.Lock()

    async def run(self, fn, *args):
        if not self.sem.acquire(blocking=False):
            raise _Busy()
        with self.lock:
            self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            with self.lock:
                self.waiting -= 1
            self.sem.release()


class _Job:
    """A live job in a thread, its recent events kept for late subscribers, pushed to SSE subscribers."""

    def __init__(self, job_id: str, source: str, make_job):
        self.id, self.source, self.created = job_id, source, time.time()
        self.events: collections.deque = collections.deque(maxlen=500)
        self.subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self.lock = threading.Lock()
        self.state = "running"
        self.job = make_job(self.emit)
        self.thread = threading.Thread(target=self._run, name=f"lpr-live-{job_id}", daemon=True)
        self.thread.start()

    def emit(self, event: dict) -> None:
        with self.lock:
            self.events.append(event)
            subs = list(self.subscribers)
        for loop, q in subs:
            loop.call_soon_threadsafe(q.put_nowait, event)

    def _run(self) -> None:
        try:
            self.job.run()
            self.state = "ended"
        except Exception as e:  # a bad source: the job ends, the service does not
            self.state = "failed"
            self.emit({"event": "error", "message": str(e)[:300]})
        finally:
            for loop, q in list(self.subscribers):
                loop.call_soon_threadsafe(q.put_nowait, None)

    def summary(self) -> dict:
        return {"id": self.id, "source": self.source, "state": self.state, "created": self.created,
                **self.job.summary()}


def create_app(cfg: ServiceConfig, embedder=None, detector=None):
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from pipeline import backends
    from pipeline.gallery import GalleryIndex, index_lock

    if embedder is None:
        embedder = backends.load_embedder(cfg.weights, cfg.backend, cfg.device)
    if detector is None and cfg.detector:
        detector = backends.load_detector(cfg.detector_weights, cfg.backend, cfg.device)
    state = {"gallery": GalleryIndex.load(cfg.index, embedder)}
    write_lock = threading.Lock()
    slots = _Slots(cfg.workers, cfg.queue)
    jobs: dict[str, _Job] = {}
    cfg.uploads.mkdir(parents=True, exist_ok=True)

    registry = CollectorRegistry()
    m_requests = Counter("lpr_requests", "HTTP requests", ["route", "status"], registry=registry)
    m_latency = Histogram("lpr_request_seconds", "request latency", ["route"], registry=registry,
                          buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64))
    m_stage = Histogram("lpr_stage_seconds_per_frame", "pipeline stage time per frame", ["stage"],
                        registry=registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))
    m_live = Gauge("lpr_live_jobs", "running live jobs", registry=registry)
    m_waiting = Gauge("lpr_work_in_progress", "recognition requests running or queued", registry=registry)
    m_gallery = Gauge("lpr_gallery_images", "shop images in the index", registry=registry)

    app = FastAPI(title="lpr: livestreaming product recognition", version="1",
                  description="Clip in, ranked shop products out; live streams as events.")

    def check_key(request: Request) -> None:
        if not cfg.api_key:
            return
        given = request.headers.get("x-api-key") or request.query_params.get("key") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = given or auth[7:]
        if not secrets.compare_digest(given.encode(), cfg.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (X-API-Key header)")

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "other")
        m_requests.labels(name, str(response.status_code)).inc()
        m_latency.labels(name).observe(time.perf_counter() - t0)
        return response

    # -- recognition -------------------------------------------------------------------------------------------
    async def save_upload(upload: UploadFile, dest: Path) -> None:
        limit, n = cfg.max_upload_mb * 2**20, 0
        with open(dest, "wb") as f:
            while chunk := await upload.read(CHUNK):
                n += len(chunk)
                if n > limit:
                    raise HTTPException(413, f"upload larger than {cfg.max_upload_mb:g} MB")
                f.write(chunk)

    def download(url: str, dest: Path) -> None:
        if not url.startswith(("http://", "https://")):
            raise HTTPException(400, "url must be http:// or https://")
        limit, n = cfg.max_upload_mb * 2**20, 0
        try:
            with urllib.request.urlopen(url, timeout=30) as r, open(dest, "wb") as f:
                while chunk := r.read(CHUNK):
                    n += len(chunk)
                    if n > limit:
                        raise HTTPException(413, f"clip at url larger than {cfg.max_upload_mb:g} MB")
                    f.write(chunk)
        except OSError as e:
            raise HTTPException(400, f"could not fetch url ({e})") from None

    def recognise(path: Path, live_id: str | None, name: str) -> dict:
        from lpr4m.frames import probe_video
        from pipeline.recognize import recognize_video
        info = probe_video(path)
        if info.duration_s and info.duration_s > cfg.max_seconds:
            raise HTTPException(422, f"clip is {info.duration_s:.0f} s long; this service takes at most "
                                     f"{cfg.max_seconds:g} s")
        gallery = state["gallery"]  # the index of this moment; a swap meanwhile does not touch it
        result, _ = recognize_video(path, embedder, gallery, detector, fps=cfg.fps, k=cfg.topk, live_id=live_id,
                                    max_frames=int(cfg.max_seconds * cfg.fps) + 1, prefetch=4,
                                    settings={"backend": cfg.backend, "service": True})
        result["clip"] = name
        for stage, ms in result["timings_ms_per_frame"].items():
            m_stage.labels(stage).observe(ms / 1000.0)
        return result

    @app.post("/v1/recognize", dependencies=[Depends(check_key)])
    async def recognize(file: UploadFile | None = File(None), url: str | None = Form(None),
                        live_id: str | None = Form(None)):
        """A clip (upload or URL) -> ranked products, as ``pipeline/run.py --json``."""
        if (file is None) == (url is None):
            raise HTTPException(400, "send exactly one of: a file (multipart field 'file') or a 'url'")
        fd, name = tempfile.mkstemp(suffix=".clip", dir=cfg.uploads)
        os.close(fd)
        path = Path(name)
        m_waiting.inc()
        try:
            if file is not None:
                await save_upload(file, path)
            else:
                await asyncio.get_running_loop().run_in_executor(None, download, url, path)
            return await slots.run(recognise, path, live_id, file.filename if file is not None else url)
        except _Busy:
            raise HTTPException(429, "busy: the work queue is full, retry later") from None
        except BadInput as e:
            raise HTTPException(400, e.message) from None
        finally:
            m_waiting.dec()
            path.unlink(missing_ok=True)

    # -- gallery -----------------------------------------------------------------------------------------------
    def swap(change) -> dict:
        """Apply ``change`` to a fresh copy of the index, save it, swap it in (one writer at a time)."""
        with write_lock, index_lock(cfg.index):
            gi = GalleryIndex.load(cfg.index, embedder)
            out = change(gi)
            gi.save(cfg.index)
            state["gallery"] = gi
            m_gallery.set(gi.ntotal)
            return out

    @app.get("/v1/gallery", dependencies=[Depends(check_key)])
    async def gallery_list():
        gi = state["gallery"]
        items = [{"image_id": it.image_id, "view": it.view, "title": it.title, "live_id": it.live_id}
                 for it in gi.items.values()]
        return {**gi.summary(), "items": items}

    @app.post("/v1/gallery", dependencies=[Depends(check_key)])
    async def gallery_add(file: UploadFile = File(...), image_id: str = Form(...), title: str = Form(""),
                          live_id: str = Form("")):
        """Add (or replace) one shop image."""
        from lpr4m.ids import check_safe_name
        try:
            check_safe_name(image_id, "image_id")
            if live_id:
                check_safe_name(live_id, "live_id")
        except BadInput as e:
            raise HTTPException(400, str(e)) from None
        suffix = Path(file.filename or "").suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            raise HTTPException(400, f"shop image must be one of {' '.join(sorted(IMAGE_SUFFIXES))}")
        folder = cfg.index / "shop-images" / (live_id or "_")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{image_id}{suffix}.partial"
        await save_upload(file, tmp)
        dest = folder / f"{image_id}{suffix}"
        os.replace(tmp, dest)
        from pipeline.gallery import GalleryItem

        def change(gi):
            from lpr4m.errors import Problems
            problems = Problems()
            item = GalleryItem(image_id, 0, live_id, title, dest.name)
            n = gi.add(embedder, folder, [item], problems, show_progress=False)
            if not n:
                dest.unlink(missing_ok=True)
                raise HTTPException(400, f"not a readable image: {'; '.join(problems.messages)[:200]}")
            return {"added": n, "ntotal": gi.ntotal}
        return await asyncio.get_running_loop().run_in_executor(None, swap, change)

    @app.delete("/v1/gallery/{image_id}", dependencies=[Depends(check_key)])
    async def gallery_remove(image_id: str):
        def change(gi):
            n, unknown = gi.remove([image_id])
            if not n:
                raise HTTPException(404, f"no shop image {image_id!r} in the index")
            return {"removed": n, "ntotal": gi.ntotal}
        return await asyncio.get_running_loop().run_in_executor(None, swap, change)

    @app.get("/v1/gallery/{image_id}/image", dependencies=[Depends(check_key)])
    async def gallery_image(image_id: str):
        gi = state["gallery"]
        for it in gi.items.values():
            if it.image_id == image_id and it.view == 0:
                path = gi.item_path(it)
                if path is not None and path.is_file():
                    return FileResponse(path)
        raise HTTPException(404, f"no shop image {image_id!r}")

    # -- live jobs ---------------------------------------------------------------------------------------------
    @app.post("/v1/live", dependencies=[Depends(check_key)])
    async def live_start(request: Request):
        from pipeline.livestream import LiveJob, LiveSource, is_network
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "expected a JSON body {\"source\": URL}") from None
        source = body.get("source") if isinstance(body, dict) else None
        if not isinstance(source, str) or not source:
            raise HTTPException(400, "expected a JSON body {\"source\": URL}")
        if not is_network(source) and not cfg.allow_file_sources:
            raise HTTPException(400, "source must be a stream URL (rtmp, srt, rtsp, http(s), ...); local files "
                                     "and devices need serve.py --allow-file-sources")
        if sum(j.state == "running" for j in jobs.values()) >= cfg.max_live_jobs:
            raise HTTPException(429, f"already {cfg.max_live_jobs} live jobs running")
        try:
            fps = float(body.get("fps", cfg.fps))
            src = LiveSource(source, fps=fps, retries=int(body.get("retries", 10)))
        except (BadInput, ValueError, TypeError) as e:
            raise HTTPException(400, str(e)) from None
        job_id = uuid.uuid4().hex[:12]

        def make(emit):
            return LiveJob(src, embedder, state["gallery"], detector, lambda e: emit({"job": job_id, **e}),
                           k=cfg.topk, live_id=body.get("live_id"))
        jobs[job_id] = _Job(job_id, source, make)
        m_live.set(sum(j.state == "running" for j in jobs.values()))
        return {"id": job_id, "events": f"/v1/live/{job_id}/events", "page": f"/live/{job_id}"}

    @app.get("/v1/live", dependencies=[Depends(check_key)])
    async def live_list():
        return [j.summary() for j in jobs.values()]

    def get_job(job_id: str) -> _Job:
        if job_id not in jobs:
            raise HTTPException(404, f"no live job {job_id!r}")
        return jobs[job_id]

    @app.delete("/v1/live/{job_id}", dependencies=[Depends(check_key)])
    async def live_stop(job_id: str):
        job = get_job(job_id)
        job.job.stop()
        await asyncio.get_running_loop().run_in_executor(None, job.thread.join, 30)
        m_live.set(sum(j.state == "running" for j in jobs.values()))
        return job.summary()

    @app.get("/v1/live/{job_id}/events", dependencies=[Depends(check_key)])
    async def live_events(job_id: str, request: Request):
        job = get_job(job_id)
        q: asyncio.Queue = asyncio.Queue()
        with job.lock:
            backlog = list(job.events)
            job.subscribers.append((asyncio.get_running_loop(), q))
        ended = job.state != "running"

        async def stream():
            try:
                for e in backlog:
                    yield f"data: {json.dumps(e)}\n\n"
                while not ended:
                    try:
                        e = await asyncio.wait_for(q.get(), 15)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if e is None or await request.is_disconnected():
                        break
                    yield f"data: {json.dumps(e)}\n\n"
            finally:
                with job.lock:
                    job.subscribers = [s for s in job.subscribers if s[1] is not q]
        return StreamingResponse(stream(), media_type="text/event-stream")

    # -- health, metrics, page ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        gi = state["gallery"]
        return {"status": "ok", "gallery_images": gi.ntotal, "embedder": gi.meta["embedder"].get("fingerprint"),
                "detector": detector is not None, "work_in_progress": slots.waiting,
                "live_jobs": sum(j.state == "running" for j in jobs.values())}

    @app.get("/metrics", dependencies=[Depends(check_key)])
    async def metrics():
        m_gallery.set(state["gallery"].ntotal)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/live/{job_id}", response_class=HTMLResponse)
    async def live_page(job_id: str):
        get_job(job_id)
        return HTMLResponse(LIVE_PAGE.replace("__JOB__", html.escape(job_id)))

    @app.exception_handler(HTTPException)
    async def one_line_errors(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    app.state.jobs = jobs
    return app


def stop_jobs(app) -> None:
    for job in list(app.state.jobs.values()):
        job.job.stop()
    for job in list(app.state.jobs.values()):
        job.thread.join(10)


def copy_gallery_into_index(gallery: Path, index: Path, embedder) -> None:
    """First start with ``--gallery DIR``: embed it into the service's own index folder."""
    from lpr4m.errors import Problems
    from pipeline.gallery import GalleryIndex, collect, report_skipped
    root, items = collect(gallery)
    problems = Problems()
    gi = GalleryIndex.build(embedder, root, items, "auto", problems)
    gi.save(index)
    report_skipped(problems.messages, problems.total)


LIVE_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>lpr live __JOB__</title>
<style>body{font-family:sans-serif;margin:2em;max-width:60em}#now{display:flex;gap:1em;align-items:center}
#now img{max-height:12em;border:1px solid #ccc}li{margin:.2em 0}.score{color:#666}</style></head>
<body><h1>Live job <code>__JOB__</code></h1>
<div id="now"><img id="shop" alt=""><div><div>Presented now:</div><h2 id="title">waiting for the stream...</h2>
<div id="meta" class="score"></div></div></div>
<h3>History</h3><ol id="history"></ol>
<script>
const key = new URLSearchParams(location.search).get("key");
const q = key ? "?key=" + encodeURIComponent(key) : "";
const es = new EventSource("/v1/live/__JOB__/events" + q);
function fmt(t){return new Date(t*1000).toISOString().substr(11,8);}
es.onmessage = (m) => {
  const e = JSON.parse(m.data);
  if ((e.event === "products" || e.event === "segment_end") && e.products && e.products.length) {
    const p = e.products[0];
    if (e.event === "products") {
      document.getElementById("title").textContent = p.title || p.image_id;
      document.getElementById("meta").textContent = "segment " + e.segment + ", score " + p.score.toFixed(3) +
        ", " + e.start_s.toFixed(0) + "-" + e.end_s.toFixed(0) + " s, latency " + e.latency_s.toFixed(2) + " s";
      document.getElementById("shop").src = "/v1/gallery/" + encodeURIComponent(p.image_id) + "/image" + q;
    } else {
      const li = document.createElement("li");
      li.textContent = fmt(e.time) + "  " + (p.title || p.image_id) + "  (" + e.start_s.toFixed(0) + "-" +
        e.end_s.toFixed(0) + " s)";
      document.getElementById("history").prepend(li);
    }
  } else if (e.event === "stopped") {
    document.getElementById("meta").textContent += " - stream stopped";
  }
};
</script></body></html>
"""
