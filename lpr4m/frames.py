"""Frame sampling from video files: a few upright RGB frames per clip, streamed, whatever the container.

Why it looks like this:
- Timestamps come from each frame's pts x time_base (variable frame rate safe), relative to the first frame.
- A target time ``t`` picks the first frame whose time is >= ``t - tol`` (``tol`` = half a nominal frame
  interval, so on constant-rate video it is the nearest frame); a frame is never returned twice.
- Sparse targets seek (to the keyframe before ``t``, then decode forward); dense ones decode in order and
  convert only the chosen frames to RGB. A seek that lands after its target (imprecise containers, broken
  indexes such as OpenCV's ``tree.avi``) turns seeking off and the clip is read in order instead.
- PyAV first; OpenCV (``cv2.VideoCapture``, read in order) when PyAV cannot open or decode the file.
- Rotation (display matrix or the legacy ``rotate`` tag) is applied, so frames come upright.
- Memory stays flat: one decoded frame at a time, nothing collected.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from lpr4m.errors import BadInput

logger = logging.getLogger(__name__)

MODES = ("fps", "even", "every")
SEEK_GAP_S = 2.0  # without a keyframe index, seek only past gaps this long
SEEK_MIN_SKIP_S = 0.5  # with one, seek only when it skips at least this much decoding
_MAX_BAD_PACKETS = 100  # consecutive undecodable packets before a stream counts as corrupt


class VideoInfo(NamedTuple):
    """What a video header (plus its first decoded frame) says. ``width``/``height`` are upright (after
    rotation); ``rotation`` is the clockwise turn applied to show frames upright (0/90/180/270);
    ``duration_s``/``fps``/``n_frames`` are None when the file does not say (``n_frames`` may be an estimate
    from duration x fps)."""

    duration_s: float | None
    fps: float | None
    width: int
    height: int
    rotation: int
    n_frames: int | None
    codec: str
    backend: str = "pyav"


class Frame(NamedTuple):
    """A sampled frame: ``index`` counts the samples of one call (0, 1, ...); ``time_s`` is its time from the
    clip's first frame; ``rgb`` is HxWx3 uint8, upright."""

    index: int
    time_s: float
    rgb: np.ndarray


class StillImage(BadInput):
    """A file that holds one picture (a JPEG or PNG named .mp4), refused rather than read as a 1-frame video."""


# -- shared helpers -------------------------------------------------------------------------------------------
def _check_file(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        if re.match(r"^[a-z][a-z0-9+.-]*:/", str(path), re.IGNORECASE):  # Path() folded "rtmp://" to "rtmp:/"
            raise BadInput(str(path).replace(":/", "://", 1), "a URL, not a video file: download the video first "
                                                              "(streams and URLs are not read here)") from None
        raise BadInput(path, "video not found") from None
    except OSError as e:
        raise BadInput(path, f"cannot read video ({e.strerror})") from None
    if path.is_dir():
        raise BadInput(path, "is a folder (expected a video file)")
    if size == 0:
        raise BadInput(path, "empty file (expected a video)")


def _rotate(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Turn ``rotation`` degrees clockwise (np.rot90 turns counter-clockwise for positive k)."""
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=-k)) if k else rgb


def _norm_rotation(deg: float) -> int:
    return int(round(deg / 90.0)) * 90 % 360


def _targets(mode: str, duration: float | None, fps: float, n: int, every_s: float) -> Iterator[float]:
    """Target times in seconds from the first frame, ascending (endless for fps/every when length is unknown)."""
    if mode == "even":
        if duration is None:
            raise ValueError("even sampling needs the duration")
        if duration <= 0:
            yield 0.0
            return
        for k in range(n):
            yield (k + 0.5) * duration / n  # centre of each of n equal segments: skips fade-in/out frames
        return
    step = 1.0 / fps if mode == "fps" else every_s
    for k in itertools.count():  # endless: reading stops at the last frame (headers may understate the length)
        yield k * step


def _check_args(mode: str, fps: float, n: int, every_s: float, max_frames: int | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "fps" and not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be > 0, got {fps}")
    if mode == "every" and not (every_s > 0 and math.isfinite(every_s)):
        raise ValueError(f"every_s must be > 0, got {every_s}")
    if mode == "even" and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")


class _Selector:
    """Maps a stream of (time, frame) to the frames to keep; shared by both backends."""

    def __init__(self, targets: Iterator[float], tol: float):
        self.targets = targets
        self.tol = tol
        self.target: float | None = next(targets, None)
        self.last_time = -math.inf  # time of the last kept frame: never keep a frame twice

    def wants(self, t: float) -> bool:
        """True when the frame at time ``t`` is the next one to keep (and moves past the targets it covers)."""
        if self.target is None or t < self.target - self.tol or t <= self.last_time:
            return False
        while self.target is not None and self.target - self.tol <= t:
            self.target = next(self.targets, None)
        self.last_time = t
        return True


# -- PyAV -----------------------------------------------------------------------------------------------------
def _av():
    import av
    return av


class _PyAV:
    """An open PyAV container positioned on its video stream."""

    def __init__(self, path: Path):
        av = _av()
        self.path = path
        try:
            self.container = av.open(str(path), metadata_errors="ignore")
        except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
            raise BadInput(path, f"not a readable video ({_short(e)})") from None
        if not self.container.streams.video:
            self.close()
            raise BadInput(path, "no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.tb = self.stream.time_base or Fraction(1, 90000)
        self.bad_packets = 0

    def close(self) -> None:
        try:
            self.container.close()
        except Exception:  # closing a half-broken container must not hide the real error
            pass

    def frames(self) -> Iterator:
        """Decoded frames from the current position; undecodable packets are skipped (and counted)."""
        av = _av()
        bad_run = 0
        try:
            for packet in self.container.demux(self.stream):
                try:
                    decoded = packet.decode()
                except (av.FFmpegError, ValueError) as e:  # a corrupt packet: skip it, like ffmpeg does
                    self.bad_packets += 1
                    bad_run += 1
                    if bad_run >= _MAX_BAD_PACKETS:
                        raise BadInput(self.path, f"corrupt video: {bad_run} undecodable packets in a row "
                                                  f"({_short(e)})") from None
                    continue
                bad_run = 0
                yield from decoded
        except av.FFmpegError as e:  # demuxing failed: truncated or corrupt container
            raise BadInput(self.path, f"truncated or corrupt video ({_short(e)})") from None

    def time_of(self, frame, prev: float | None, step: float) -> float:
        pts = frame.pts if frame.pts is not None else frame.dts
        if pts is None:
            return (prev + step) if prev is not None else 0.0
        t = float(pts * (frame.time_base or self.tb))
        return t if prev is None or t > prev else prev + 1e-6  # keep times increasing on broken pts

    def seek(self, t_abs: float) -> bool:
        try:
            self.container.seek(int(t_abs / self.tb), stream=self.stream, backward=True, any_frame=False)
            return True
        except (_av().FFmpegError, OverflowError, ValueError) as e:
            logger.debug("%s: seek to %.3fs failed (%s)", self.path, t_abs, e)
            return False


def _short(e: BaseException) -> str:
    """FFmpeg's reason without the errno and file name (the BadInput already names the file)."""
    text = getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return text[:120]


def _stream_rotation(reader: _PyAV, first_frame) -> int:
    rot = getattr(first_frame, "rotation", 0) or 0  # display matrix: counter-clockwise degrees
    if rot:
        return _norm_rotation(-rot)
    tag = reader.stream.metadata.get("rotate")  # legacy tag: clockwise degrees
    try:
        return _norm_rotation(float(tag)) if tag else 0
    except ValueError:
        return 0


def _probe_pyav(path: Path) -> tuple[VideoInfo, float, list[float]]:
    """(info, time of the first frame, sorted keyframe times from the index)."""
    r = _PyAV(path)
    try:
        s = r.stream
        if r.container.format.name.endswith("_pipe") or r.container.format.name == "image2":
            raise StillImage(path, f"a still image ({r.container.format.name.removesuffix('_pipe')}), not a video")
        first = next(r.frames(), None)
        if first is None:
            raise BadInput(path, "no decodable video frames")
        t0 = r.time_of(first, None, 0.0)
        rate = s.average_rate or s.guessed_rate or s.base_rate
        fps = float(rate) if rate and 0 < float(rate) < 1000 else None
        duration = None
        if s.duration:
            duration = float(s.duration * r.tb)
        elif r.container.duration:
            duration = r.container.duration / 1_000_000
        if duration is not None and duration <= 0:
            duration = None
        n_frames = s.frames or (int(round(duration * fps)) if duration and fps else None)
        rotation = _stream_rotation(r, first)
        w, h = first.width, first.height
        if rotation in (90, 270):
            w, h = h, w
        keys = []
        try:
            keys = sorted(float(e.timestamp * r.tb) for e in (s.index_entries or []) if e.is_keyframe)
        except (AttributeError, TypeError):
            pass
        info = VideoInfo(duration, fps, w, h, rotation, n_frames, s.codec_context.name, "pyav")
        return info, t0, keys
    finally:
        r.close()


def _scan_duration_pyav(path: Path, t0: float) -> float | None:
    """Length of a clip whose header does not say: read packet timestamps (no decoding)."""
    r = _PyAV(path)
    try:
        end = None
        for p in r.container.demux(r.stream):
            if p.pts is None:
                continue
            t = float((p.pts + (p.duration or 0)) * r.tb)
            end = t if end is None else max(end, t)
        return None if end is None else max(0.0, end - t0)
    except _av().FFmpegError:
        return None
    finally:
        r.close()


def _sample_pyav(path: Path, info: VideoInfo, t0: float, keys: list[float], sel: _Selector,
                 allow_seek: bool) -> Iterator[tuple[float, np.ndarray]]:
    step = 1.0 / (info.fps or 25.0)
    # index times are decode times: with B-frames a keyframe is shown this much later than its index entry says
    delay = t0 - keys[0] if keys and keys[0] < t0 else 0.0
    r = _PyAV(path)
    try:
        it = r.frames()
        prev = None  # time (from the first frame) of the last decoded frame
        seeking = allow_seek
        just_seeked = False
        seek_target = None
        while sel.target is not None:
            point = _seek_point(prev, sel.target, sel.tol, t0, keys, delay) \
                if seeking and sel.target != seek_target else None
            if point is not None:
                seek_target = sel.target
                if r.seek(point):
                    it, just_seeked, prev = r.frames(), True, None
                else:
                    seeking = False
                    r.close()
                    r = _PyAV(path)
                    it, prev = r.frames(), None
            frame = next(it, None)
            if frame is None:
                break
            t = r.time_of(frame, None if prev is None else prev + t0, step) - t0
            if just_seeked:
                just_seeked = False
                if t > sel.target + sel.tol + 1e-6:  # landed after the target: seeking is unreliable here
                    logger.info("%s: seek to %.2fs landed at %.2fs; reading in order", path, sel.target, t)
                    seeking = False
                    r.close()
                    r = _PyAV(path)
                    it, prev = r.frames(), None
                    continue
            prev = t
            if sel.wants(t):
                yield t, _rotate(frame.to_ndarray(format="rgb24"), info.rotation)
        if r.bad_packets:
            logger.warning("%s: skipped %d undecodable packets", path, r.bad_packets)
        if sel.target is not None and prev is not None and info.duration_s and prev < 0.9 * info.duration_s - 1:
            logger.warning("%s: frames end at %.1fs of %.1fs (truncated file?)", path, prev, info.duration_s)
    finally:
        r.close()


def _seek_point(prev: float | None, target: float, tol: float, t0: float, keys: list[float],
                delay: float) -> float | None:
    """Where to seek for ``target`` (a stream time), or None to decode on. With a keyframe index: the last
    keyframe shown by ``target + tol``, when it lies more than SEEK_MIN_SKIP_S beyond what has been decoded
    (decoding forward is cheaper otherwise); a keyframe at the target itself is landed on exactly. Without an
    index: ``target - tol``, past gaps of SEEK_GAP_S."""
    pos = 0.0 if prev is None else prev
    if keys:
        i = bisect.bisect_right(keys, t0 + target + tol - delay) - 1
        # seek to the target itself: a keyframe's own display delay may exceed the first one's
        return t0 + target + tol if i >= 0 and keys[i] + delay - t0 > pos + SEEK_MIN_SKIP_S else None
    return t0 + max(0.0, target - tol) if target - tol - pos > SEEK_GAP_S else None


# -- OpenCV fallback ------------------------------------------------------------------------------------------
def _open_cv2(path: Path):
    # OpenCV's FFmpeg backend logs its own "[mov @ 0x..] moov atom not found" lines on a bad file; we already
    # report the failure as one BadInput line (read when the backend first opens a file, so set before that)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise BadInput(path, "not a readable video (neither PyAV nor OpenCV can open it)")
    return cv2, cap


def _probe_cv2(path: Path) -> VideoInfo:
    cv2, cap = _open_cv2(path)
    try:
        ok, bgr = cap.read()
        if not ok or bgr is None:
            raise BadInput(path, "no decodable video frames")
        fps = cap.get(cv2.CAP_PROP_FPS) or None
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        rot = _norm_rotation(cap.get(cv2.CAP_PROP_ORIENTATION_META) or 0)
        h, w = bgr.shape[:2]  # OpenCV already applies the orientation (CAP_PROP_ORIENTATION_AUTO)
        duration = n / fps if n and fps else None
        codec = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode("latin-1").strip("\0 ") or "?"
        return VideoInfo(duration, fps, w, h, rot, n, codec, "opencv")
    finally:
        cap.release()


def _sample_cv2(path: Path, info: VideoInfo, sel: _Selector) -> Iterator[tuple[float, np.ndarray]]:
    cv2, cap = _open_cv2(path)
    step = 1.0 / (info.fps or 25.0)
    try:
        i = 0
        while sel.target is not None and cap.grab():
            ms = cap.get(cv2.CAP_PROP_POS_MSEC)
            t = ms / 1000.0 if ms > 0 or i == 0 else i * step
            i += 1
            if sel.wants(t):
                ok, bgr = cap.retrieve()
                if ok and bgr is not None:
                    yield t, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


# -- public API -----------------------------------------------------------------------------------------------
BACKENDS = ("auto", "pyav", "opencv")


def _probe(path: Path, backend: str = "auto") -> tuple[VideoInfo, float, list[float]]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_file(path)
    if backend == "opencv":
        return _probe_cv2(path), 0.0, []
    try:
        return _probe_pyav(path)
    except BadInput as err:
        if backend == "pyav" or isinstance(err, StillImage):  # OpenCV would read an image as a 1-frame video
            raise
        try:
            info = _probe_cv2(path)
        except BadInput:
            raise err from None
        logger.info("%s: PyAV failed (%s); using OpenCV", path, err.message)
        return info, 0.0, []


def probe_video(path, backend: str = "auto") -> VideoInfo:
    """Header facts of a video (decodes its first frame, so an undecodable file raises BadInput here)."""
    return _probe(Path(path), backend)[0]


def sample_frames(path, mode: str = "fps", fps: float = 1.0, n: int = 10, every_s: float = 3.0,
                  max_frames: int | None = None, seek: bool = True, backend: str = "auto") -> Iterator[Frame]:
    """Stream frames of a clip: ``mode="fps"`` (``fps`` frames a second), ``"even"`` (``n`` frames spread evenly:
    the centres of ``n`` equal segments; fewer when the clip has fewer frames), ``"every"`` (one frame every
    ``every_s`` seconds). ``max_frames`` caps the count; ``seek=False`` forces reading in order; ``backend``
    "auto" (PyAV, OpenCV when PyAV fails), "pyav" or "opencv"."""
    _check_args(mode, fps, n, every_s, max_frames)
    path = Path(path)
    info, t0, keys = _probe(path, backend)  # BadInput raised here, before the first frame is asked for
    return _sample(path, info, t0, keys, mode, fps, n, every_s, max_frames, seek)


def _sample(path, info, t0, keys, mode, fps, n, every_s, max_frames, seek) -> Iterator[Frame]:
    duration = info.duration_s
    if mode == "even" and duration is None:
        duration = _scan_duration_pyav(path, t0) if info.backend == "pyav" else None
        if duration is None:  # count frames the slow way (decode, no RGB conversion)
            duration = _count_duration(path, info, t0)
    # half a frame (nearest frame on constant-rate video), never more than half the spacing of the targets
    spacing = {"fps": 1.0 / fps, "every": every_s, "even": (duration or 0.0) / n or math.inf}[mode]
    tol = 0.5 * min(1.0 / info.fps if info.fps else 0.04, spacing)
    sel = _Selector(_targets(mode, duration, fps, n, every_s), tol)
    if info.backend == "pyav":
        source = _sample_pyav(path, info, t0, keys, sel, allow_seek=seek)
    else:
        source = _sample_cv2(path, info, sel)
    if max_frames == 0:
        return
    count = 0
    try:
        for t, rgb in source:
            yield Frame(count, t, rgb)
            count += 1
            if max_frames is not None and count >= max_frames:
                return
    finally:
        source.close()  # closes the container now, not at garbage collection
    if count == 0:
        raise BadInput(path, "no decodable video frames")


def _count_duration(path: Path, info: VideoInfo, t0: float) -> float:
    step = 1.0 / (info.fps or 25.0)
    last, count = 0.0, 0
    if info.backend == "pyav":
        r = _PyAV(path)
        try:
            prev = None
            for frame in r.frames():
                prev = r.time_of(frame, prev, step)
                count += 1
            last = (prev or t0) - t0
        finally:
            r.close()
    else:
        cv2, cap = _open_cv2(path)
        try:
            while cap.grab():
                count += 1
        finally:
            cap.release()
        last = (count - 1) * step
    return max(last + step, count * step if info.backend != "pyav" else 0.0)


def write_video(path, frames: Iterable[np.ndarray], fps: float = 10.0, codec: str = "libx264",
                rotation: int = 0, crf: int = 23, options: dict[str, str] | None = None) -> int:
    """Encode RGB frames (HxWx3 uint8, even sizes for yuv420p) to a video, atomically; ``rotation`` (clockwise
    degrees) is stored as display metadata, as phones do; ``options`` go to the encoder (e.g. ``{"g": "10"}`` for
    a keyframe every 10 frames). Returns the number of frames written."""
    av = _av()
    from lpr4m.io import atomic_path
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    count = 0
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format=_format_for(path)) as out:
            stream = out.add_stream(codec, rate=rate)
            stream.pix_fmt = "yuv420p"
            if codec in ("libx264", "h264"):
                stream.options = {"crf": str(crf), "preset": "veryfast", **(options or {})}
            elif options:
                stream.options = dict(options)
            for rgb in frames:
                rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
                if count == 0:
                    stream.height, stream.width = rgb.shape[:2]
                    if rotation % 360:
                        stream.set_display_rotation(-(rotation % 360))  # PyAV takes counter-clockwise degrees
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    out.mux(packet)
                count += 1
            if count == 0:
                raise ValueError("write_video needs at least one frame")
            for packet in stream.encode():
                out.mux(packet)
    return count


def _format_for(path: Path) -> str | None:
    return {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi", ".webm": "webm", ".h264": "h264",
            ".ts": "mpegts"}.get(
        path.suffix.lower())
