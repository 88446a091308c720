"""Frame sampling on generated videos (known frame count, rate, rotation, variable rate) and on the real files in
../shared/data/videos (skipped when absent).

Each generated frame i is a flat grey of level 20 + 7*i, so the mean of a decoded frame says which frame it is.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from lpr4m.frames import Frame, probe_video, sample_frames, write_video

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VIDEOS = SHARED / "videos"
needs_videos = pytest.mark.skipif(not VIDEOS.is_dir(), reason=f"{VIDEOS} absent (shared real data)")


def level(i: int) -> int:
    return 20 + 7 * i


def which(frame: Frame) -> int:
    """The generated frame index a decoded frame shows (from its grey level)."""
    return int(round((float(frame.rgb[8:-8, 8:-8].mean()) - 20) / 7))


def flat(i: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.full((h, w, 3), level(i), np.uint8)


@pytest.fixture(scope="module")
def cfr(tmp_path_factory) -> Path:
    """3 s at 10 fps, a keyframe every 10 frames (so seeking has somewhere to land)."""
    path = tmp_path_factory.mktemp("v") / "cfr.mp4"
    assert write_video(path, (flat(i) for i in range(30)), fps=10, crf=10, options={"g": "10"}) == 30
    return path


def test_probe(cfr):
    info = probe_video(cfr)
    assert (info.width, info.height, info.rotation, info.codec) == (64, 48, 0, "h264")
    assert info.fps == pytest.approx(10.0) and info.duration_s == pytest.approx(3.0, abs=0.05)
    assert info.n_frames == 30 and info.backend == "pyav"


@pytest.mark.parametrize("seek", [True, False])
def test_modes_counts_times_and_frames(cfr, seek):
    got = list(sample_frames(cfr, "fps", fps=1.0, seek=seek))
    assert [f.index for f in got] == [0, 1, 2]
    assert [f.time_s for f in got] == pytest.approx([0.0, 1.0, 2.0])
    assert [which(f) for f in got] == [0, 10, 20]
    assert got[0].rgb.shape == (48, 64, 3) and got[0].rgb.dtype == np.uint8

    got = list(sample_frames(cfr, "fps", fps=5.0, seek=seek))
    assert [which(f) for f in got] == list(range(0, 30, 2))

    got = list(sample_frames(cfr, "every", every_s=1.5, seek=seek))
    assert [f.time_s for f in got] == pytest.approx([0.0, 1.5]) and [which(f) for f in got] == [0, 15]

    got = list(sample_frames(cfr, "even", n=3, seek=seek))  # centres of 3 equal segments
    assert [f.time_s for f in got] == pytest.approx([0.5, 1.5, 2.5]) and [which(f) for f in got] == [5, 15, 25]


def test_more_samples_than_frames_gives_each_frame_once(cfr):
    assert [which(f) for f in sample_frames(cfr, "even", n=100)] == list(range(30))
    assert [which(f) for f in sample_frames(cfr, "fps", fps=50)] == list(range(30))


def test_max_frames_and_laziness(cfr):
    assert [which(f) for f in sample_frames(cfr, "fps", fps=10, max_frames=4)] == [0, 1, 2, 3]
    assert list(sample_frames(cfr, "fps", max_frames=0)) == []
    it = sample_frames(cfr, "fps", fps=10)
    assert which(next(it)) == 0  # a generator: frames come one at a time
    it.close()


def test_bad_arguments(cfr):
    for kw in (dict(mode="nope"), dict(mode="fps", fps=0), dict(mode="every", every_s=-1), dict(mode="even", n=0)):
        with pytest.raises(ValueError):
            sample_frames(cfr, **kw)


def test_opencv_backend_agrees(cfr):
    a = [(round(f.time_s, 3), which(f)) for f in sample_frames(cfr, "fps", fps=2, backend="opencv")]
    b = [(round(f.time_s, 3), which(f)) for f in sample_frames(cfr, "fps", fps=2, backend="pyav")]
    assert a == b and len(a) == 6
    assert probe_video(cfr, backend="opencv")[:4] == pytest.approx(probe_video(cfr)[:4])


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_metadata_is_applied(tmp_path, rotation):
    """A frame stored landscape with a white top band and display rotation r comes out turned r clockwise."""
    img = np.zeros((48, 64, 3), np.uint8)
    img[:12] = 255
    path = tmp_path / f"rot{rotation}.mp4"
    write_video(path, [img] * 4, fps=4, rotation=rotation)
    info = probe_video(path)
    assert info.rotation == rotation
    expect = np.rot90(img, k=-rotation // 90)  # clockwise
    assert (info.height, info.width) == expect.shape[:2]
    for backend in ("pyav", "opencv"):
        (f, *_) = sample_frames(path, "fps", fps=1, backend=backend)
        assert f.rgb.shape == expect.shape
        assert np.abs(f.rgb.astype(int) - expect).mean() < 10, backend


def _write_vfr(path: Path, times_ms: list[int]) -> None:
    import av
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(flat(i), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def test_variable_frame_rate_uses_timestamps(tmp_path):
    times = [0, 100, 200, 300, 1500, 1600, 3000, 3033, 3066, 5000]
    path = tmp_path / "vfr.mp4"
    _write_vfr(path, times)
    got = list(sample_frames(path, "fps", fps=100))  # every frame: times are the written pts, not i / rate
    assert [f.time_s for f in got] == pytest.approx([t / 1000 for t in times], abs=1e-3)
    assert [which(f) for f in got] == list(range(10))
    # 1 fps: first frame at or after each second (a frame held over a gap is not repeated)
    got = list(sample_frames(path, "fps", fps=1))
    assert [f.time_s for f in got] == pytest.approx([0.0, 1.5, 3.0, 5.0], abs=1e-3)


def test_unknown_duration_raw_stream(tmp_path):
    """A raw H.264 stream has no duration in any header: "even" must still spread its frames."""
    path = tmp_path / "raw.h264"
    write_video(path, (flat(i) for i in range(30)), fps=10, options={"g": "10"})
    assert probe_video(path).duration_s is None
    assert [which(f) for f in sample_frames(path, "even", n=3)] == [5, 15, 25]
    assert len(list(sample_frames(path, "fps", fps=1000))) == 30


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc for resident memory")
def test_memory_stays_flat(tmp_path):
    """Streaming keeps a frame or two alive: resident memory grows by far less than the frames would take."""
    path = tmp_path / "long.mp4"
    n, h, w = 90, 480, 640
    write_video(path, (flat(i % 30, h, w) for i in range(n)), fps=30)
    all_frames = n * h * w * 3  # 83 MB
    for _ in sample_frames(path, "fps", fps=30, max_frames=5):  # warm up decoder pools and imports
        pass
    before = _rss_bytes()
    peak, count = before, 0
    for _ in sample_frames(path, "fps", fps=30):
        count += 1
        peak = max(peak, _rss_bytes())
    assert count == n
    assert peak - before < all_frames / 4


# -- real files ------------------------------------------------------------------------------------------------
REAL = {  # name: (duration_s, frames at fps=1)
    "bikes.mp4": (10.0, 10), "carphone_pristine.mp4": (4.0, 4), "cityCC0.mpg": (7.6, 8), "tree.avi": (29.6, 30),
    "vtest.avi": (79.5, 80),
}


@needs_videos
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_videos(name):
    path = VIDEOS / name
    if not path.exists():
        pytest.skip(f"{path} absent")
    duration, n_fps1 = REAL[name]
    info = probe_video(path)
    assert info.duration_s == pytest.approx(duration, abs=0.1)
    got = list(sample_frames(path, "fps", fps=1.0))
    times = [f.time_s for f in got]
    assert len(got) == n_fps1 and times[0] == 0.0 and all(b > a for a, b in zip(times, times[1:]))
    assert all(f.rgb.shape == (info.height, info.width, 3) for f in got)
    if name != "tree.avi":  # constant rate: each sample is the frame nearest its target
        assert times == pytest.approx(list(range(n_fps1)), abs=0.5 / info.fps)
    even = list(sample_frames(path, "even", n=10, max_frames=10))
    assert len(even) == 10


@needs_videos
@pytest.mark.parametrize("name", ["bikes.mp4", "cityCC0.mpg", "tree.avi", "vtest.avi"])
def test_seeking_matches_reading_in_order(name):
    """Seeking (or its fallback when a seek lands late, as on cityCC0.mpg) gives the very frames that reading in
    order gives; tree.avi is variable rate with 3 keyframes (OpenCV cannot seek in it)."""
    path = VIDEOS / name
    if not path.exists():
        pytest.skip(f"{path} absent")
    a = list(sample_frames(path, "every", every_s=3.0, seek=True))
    b = list(sample_frames(path, "every", every_s=3.0, seek=False))
    assert [f.time_s for f in a] == [f.time_s for f in b]
    assert all(np.array_equal(x.rgb, y.rgb) for x, y in zip(a, b))


def test_seeking_lands_on_keyframes_of_a_b_frame_stream(tmp_path, monkeypatch):
    """H.264 with B-frames indexes its keyframes by decode time, a few frames before they are shown: a target on
    a keyframe is reached by one seek (not by decoding the keyframe interval before it), with the very frames
    reading in order gives."""
    import lpr4m.frames as F
    path = tmp_path / "b.mp4"
    frames = [np.full((48, 64, 3), 0, np.uint8) for _ in range(160)]  # 6.4 s
    for i, f in enumerate(frames):
        f[:, : 2 + (i % 60)] = level(i % 30)  # moving edges: the encoder uses B-frames
    write_video(path, frames, fps=25, crf=18, options={"g": "50", "keyint_min": "50", "sc_threshold": "0", "bf": "3"})
    # a keyframe every 2 s exactly
    decoded = {"n": 0}
    frames_of = F._PyAV.frames

    def counting(self):
        for fr in frames_of(self):
            decoded["n"] += 1
            yield fr

    monkeypatch.setattr(F._PyAV, "frames", counting)
    a = list(sample_frames(path, "fps", fps=0.5, seek=True))  # targets 0, 2, 4, 6 s: all on keyframes
    n_seek = decoded["n"]
    b = list(sample_frames(path, "fps", fps=0.5, seek=False))
    assert [f.time_s for f in a] == [f.time_s for f in b] == [0.0, 2.0, 4.0, 6.0]
    assert all(np.array_equal(x.rgb, y.rgb) for x, y in zip(a, b))
    assert n_seek < 30 < decoded["n"] - n_seek  # a few frames per seek against the whole clip in order
