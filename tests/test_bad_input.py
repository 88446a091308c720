"""Bad input: each case gives one line naming the file (and line), is skipped and counted by ``stats``, is fatal
with ``--strict``, and the CLI exits 2 without a traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from lpr4m.cli import run_main
from lpr4m.errors import BadInput, Problems
from lpr4m.frames import probe_video, sample_frames, write_video
from lpr4m.images import load_rgb
from lpr4m.io import read_json
from lpr4m.stats import dataset_stats, main
from test_layout import make_dataset

REPO = Path(__file__).resolve().parents[1]
ANN = "annotations"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pristine") / "ds"
    made = make_dataset(root)
    write_video(root / "clips" / f"{made['test_ids'][0]}.mp4", [np.full((32, 32, 3), 90, np.uint8)] * 3, fps=3)
    return root, made


@pytest.fixture
def ds(pristine, tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "ds"
    shutil.copytree(pristine[0], root)
    return root, pristine[1]


def _rewrite_row(root: Path, index: int, edit: Callable[[list[str]], list[str]]) -> None:
    path = root / ANN / "training_videoinfo.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[index] = "\t".join(edit(lines[index].split("\t")))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _set(cells: list[str], i: int, value: str) -> list[str]:
    cells[i] = value
    return cells


def _edit_json(root: Path, name: str, edit: Callable[[dict], None]) -> None:
    path = root / ANN / name
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _first(d: dict):
    return next(iter(d))


# each case: (corrupt the dataset) -> (problem kind, text that names the file, needs --verify)
CASES = {
    "tsv_too_few_columns": (lambda r, m: _rewrite_row(r, 1, lambda c: c[:5]),
                            "malformed_row", "training_videoinfo.txt:2: expected 11", False),
    "tsv_bad_list": (lambda r, m: _rewrite_row(r, 0, lambda c: _set(c, 1, "[unclosed")),
                     "malformed_row", "training_videoinfo.txt:1: frame list is neither", False),
    "box_outside_unit": (lambda r, m: _rewrite_row(r, 2, lambda c: _set(c, 2, "[[[0.1, 0.1, 1.5, 0.5]], [], []]")),
                         "malformed_row", "training_videoinfo.txt:3: box", False),
    "box_x2_lt_x1": (lambda r, m: _rewrite_row(r, 0, lambda c: _set(c, 2, "[[[0.6, 0.1, 0.2, 0.5]], [], []]")),
                     "malformed_row", "x2 < x1", False),
    "frame_of_other_clip": (lambda r, m: _rewrite_row(r, 0, lambda c: _set(c, 1, json.dumps(
        [m["clips"][1].frame_ids[0]] * 3))), "malformed_row", "does not belong to clip", False),
    "unsafe_id": (lambda r, m: _rewrite_row(r, 0, lambda c: _set(c, 3, "../../etc/passwd")),
                  "malformed_row", "unsafe image_id", False),
    "empty_training_clip": (lambda r, m: _rewrite_row(r, 0, lambda c: _set(_set(c, 1, "[]"), 2, "[]")),
                            "empty_clip", "training_videoinfo.txt:1: clip", False),
    "missing_training_frame": (lambda r, m: (r / "training_video" / m["clips"][0].video_id /
                                             f"{m['clips'][0].frame_ids[1]}.jpg").unlink(),
                               "missing_file", "-0001.jpg: frame missing (listed at training_videoinfo.txt:1)", False),
    "missing_clip_folder": (lambda r, m: shutil.rmtree(r / "training_video" / m["clips"][2].video_id),
                            "missing_file", "folder missing (3 frames listed at training_videoinfo.txt:3)", False),
    "missing_training_image": (lambda r, m: (r / "training_image" / f"{m['products'][1]}.jpg").unlink(),
                               "missing_file", "shop image missing", False),
    "zero_byte_frame": (lambda r, m: (r / "training_video" / m["clips"][0].video_id /
                                      f"{m['clips'][0].frame_ids[0]}.jpg").write_bytes(b""),
                        "empty_file", "-0000.jpg: empty file", False),
    "corrupt_gallery_image": (lambda r, m: (r / "gallery" / m["test_live"] / f"{m['products'][0]}-0.jpg")
                              .write_bytes(b"\xff\xd8\xff\xe0garbage" * 10),
                              "corrupt_file", "-0.jpg: corrupt or unreadable image", True),
    "truncated_query_frame": (lambda r, m: _truncate(next((r / "query" / m["test_ids"][0]).iterdir())),
                              "corrupt_file", "corrupt or unreadable image", True),
    "missing_gallery_image": (lambda r, m: (r / "gallery" / m["test_live"] / f"{m['products'][2]}-0.jpg").unlink(),
                              "missing_file", "gallery image missing", False),
    "test_clip_without_frames": (lambda r, m: shutil.rmtree(r / "query" / m["test_ids"][1]),
                                 "missing_file", "test clip has no frames", False),
    "truncated_json": (lambda r, m: (r / ANN / "test_videoid_to_gtimage.json").write_text('{"a": ["b"'),
                       "bad_annotation", "test_videoid_to_gtimage.json:1: invalid JSON", False),
    "json_duplicate_key": (lambda r, m: _duplicate_first_key(r / ANN / "test_videoid_to_gtimage.json"),
                           "bad_annotation", "test_videoid_to_gtimage.json:2: key", False),
    "json_wrong_type": (lambda r, m: (r / ANN / "test_liveid_to_gallery.json").write_text("[1, 2]"),
                        "bad_annotation", "test_liveid_to_gallery.json: expected a JSON dict", False),
    "answer_not_in_gallery": (lambda r, m: _edit_json(r, "test_videoid_to_gtimage.json",
                                                      lambda d: d[_first(d)].append(m["clips"][0].video_id[:36])),
                              "unknown_id", "is not in the gallery of live", False),
    "live_without_gallery": (lambda r, m: _edit_json(r, "test_liveid_to_gallery.json", lambda d: d.clear()),
                             "unknown_id", "has no gallery", False),
    "gtbox_unknown_frame": (lambda r, m: _edit_json(r, "test_frameid2gtbox.json", lambda d: d.update(
        {f"{m['test_ids'][0]}-0099": [[0.1, 0.1, 0.2, 0.2]]})), "unknown_id", "-0099 has boxes but is not", False),
    "gtbox_bad_box": (lambda r, m: _edit_json(r, "test_frameid2gtbox.json", lambda d: d.update(
        {_first(d): [[0.5, 0.5, 0.4, 0.9]]})), "malformed_row", "test_frameid2gtbox.json:1: frame", False),
    "malformed_gallery_id": (lambda r, m: _edit_json(r, "test_liveid_to_gallery.json",
                                                     lambda d: d[_first(d)].append("not-an-id")),
                             "malformed_row", "malformed image_id", False),
    "bad_asr_row": (lambda r, m: (r / ANN / "test_videoid_asr.txt").open("a").write("nonsense\thi\n"),
                    "malformed_row", "test_videoid_asr.txt:3: malformed video_id", False),
    "zero_byte_clip_video": (lambda r, m: next((r / "clips").iterdir()).write_bytes(b""),
                             "empty_file", ".mp4: empty file", False),
    "text_clip_video": (lambda r, m: next((r / "clips").iterdir()).write_text("not a video\n" * 20),
                        "corrupt_file", ".mp4: not a readable video", True),
    "clip_video_of_unknown_id": (lambda r, m: shutil.copy(next((r / "clips").iterdir()),
                                                          r / "clips" / f"{m['clips'][0].video_id}.mp4"),
                                 "unknown_id", "not in the test annotations", False),
}


def _duplicate_first_key(path: Path) -> None:
    """The first key again on a second line, with another answer: ``json`` alone would keep the last silently."""
    obj = json.loads(path.read_text())
    key = next(iter(obj))
    path.write_text(json.dumps(obj)[:-1] + f',\n{json.dumps(key)}: []}}')


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case", sorted(CASES))
def test_stats_skips_counts_and_strict_fails(ds, case, capsys):
    root, made = ds
    corrupt, kind, text, verify = CASES[case]
    corrupt(root, made)
    flags = ["--verify"] if verify else []

    problems = Problems()
    s = dataset_stats(root, problems, verify=verify)  # skip-and-count: the rest is still counted
    assert problems.counts.get(kind, 0) >= 1, (kind, problems.messages)
    hits = [m for m in problems.messages if text in m]
    assert hits, (text, problems.messages)
    assert all("\n" not in m and str(root) in m for m in problems.messages)
    assert s["problems"]["total"] == problems.total
    if kind != "bad_annotation" and "json" not in case:
        assert s["test"]["clips"] == made["counts"]["test_clips"]

    capsys.readouterr()
    assert run_main(main, [str(root), *flags]) == 0  # not strict: a report, exit 0
    assert json.loads(capsys.readouterr().out)["problems"]["by_kind"].get(kind, 0) >= 1
    assert run_main(main, [str(root), "--strict", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and str(root) in err[-1]
    assert not any("Traceback" in line for line in err)


def test_clean_dataset_has_no_problems(pristine):
    assert dataset_stats(pristine[0], verify=True)["problems"]["total"] == 0


def test_a_byte_order_mark_is_read_the_same_by_every_reader(ds):
    """Editors on Windows write a BOM: JSON maps and id<TAB>text files read exactly as without it."""
    from lpr4m.layout import Dataset
    root, _ = ds
    before = dataset_stats(root, verify=True)
    plain = Dataset(root)
    expect = (plain.gt_images, plain.live_galleries, plain.titles, plain.asr)
    for name in ("test_videoid_to_gtimage.json", "test_liveid_to_gallery.json", "test_image_title.txt",
                 "test_videoid_asr.txt"):
        path = root / ANN / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    bom = Dataset(root)
    assert (bom.gt_images, bom.live_galleries, bom.titles, bom.asr) == expect
    after = dataset_stats(root, verify=True)
    assert after["problems"]["total"] == 0 and after["test"] == before["test"]


def test_cli_subprocess_exit_code_and_one_line(ds):
    root, made = ds
    CASES["tsv_too_few_columns"][0](root, made)
    proc = subprocess.run([sys.executable, "-m", "lpr4m", "stats", str(root), "--strict"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: {root / ANN / 'training_videoinfo.txt'}:2: expected 11 tab-separated columns " \
                   "(or 12 with spu_id), got 5"
    assert proc.stdout == ""


def test_cli_missing_root_and_non_dataset(tmp_path, capsys):
    assert run_main(main, [str(tmp_path / "nope")]) == 2
    assert "dataset root not found" in capsys.readouterr().err
    assert run_main(main, [str(tmp_path)]) == 2
    assert "no annotations/ folder" in capsys.readouterr().err


# -- command-line values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("module, argv", [
    ("detector.training", ["--imgsz", "33"]), ("detector.training", ["--imgsz", "-64"]),
    ("detector.training", ["--batch", "0"]), ("detector.training", ["--hours", "nan"]),
    ("detector.training", ["--device", "bogus"]), ("detector.training", ["--epochs", "0"]),
    ("detector.training", ["--name", "a/b"]), ("retriever.training", ["--name", "../x"]),
    ("detector.evaluation", ["--data", "x", "--conf", "2"]), ("detector.evaluation", ["--data", "x", "--limit", "0"]),
    ("detector.evaluation", ["--data", "x", "--batch", "-1"]), ("detector.exporting", ["--opset", "3"]),
    ("detector.benchmark", ["--threads", "0"]), ("lpr4m.synth", ["out", "--frame-size", "100000x100000"]),
    ("lpr4m.synth", ["out", "--seed", "-1"]), ("lpr4m.synth", ["out", "--lives", "0"]),
    ("lpr4m.synth", ["out", "--fps", "0"]), ("lpr4m.download", ["urls.txt", "out", "--timeout", "inf"]),
])
def test_out_of_range_flags_are_refused_by_argparse(module, argv, capsys):
    import importlib
    mod = importlib.import_module(module)
    parser = mod.build_download_parser() if module == "lpr4m.download" else mod.build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {argv[-2]}" in err
    assert err.count("\n") == 1 and err.startswith("error: ") and f"(see {parser.prog} --help)" in err  # one line


def test_output_paths_are_checked_before_work_and_os_errors_are_one_line(tmp_path, capsys):
    from lpr4m.cli import output_file
    from lpr4m.io import write_json
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    for bad, msg in ((tmp_path, "is a folder"), (a_file / "x.json", "is a file, not a folder")):
        with pytest.raises(BadInput, match=msg):
            write_json(bad, {})
        with pytest.raises(Exception, match=msg):  # argparse.ArgumentTypeError
            output_file(str(bad))
    assert output_file(str(tmp_path / "new" / "x.json"))
    from lpr4m.cli import output_dir
    with pytest.raises(Exception, match=f"{a_file} is a file, not a folder"):
        output_dir(str(a_file))
    assert output_dir(str(tmp_path / "new"))

    def fails(argv):
        open(tmp_path / "missing" / "x.txt")  # an OSError that names its file

    assert run_main(fails) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'missing' / 'x.txt'}: No such file or directory"


def test_atomic_outputs_get_the_usual_mode_whoever_writes_them(tmp_path):
    """safetensors creates its file 0600: published weights must be readable as any file the user writes."""
    import torch
    from safetensors.torch import save_file

    from lpr4m.io import atomic_path
    umask = os.umask(0)
    os.umask(umask)
    with atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_torch_device_refuses_a_gpu_that_is_not_there():
    torch = pytest.importorskip("torch")
    from lpr4m.cli import torch_device
    assert torch_device("cpu") == "cpu" and torch_device("auto") in ("cpu", "cuda")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for asked in ("0", "cuda", "cuda:1", "0,1"):
        with pytest.raises(BadInput, match=f"--device {asked}: torch sees no CUDA GPU"):
            torch_device(asked, several=True)
    with pytest.raises(BadInput, match="runs on one device"):
        torch_device("0,1")
    if not torch.backends.mps.is_available():
        with pytest.raises(BadInput, match="--device mps"):
            torch_device("mps")


def test_one_undecodable_training_row_is_skipped_not_the_file(tmp_path):
    from lpr4m import annotations as ann
    import uuid
    a, b = f"{uuid.UUID(int=1)}-1000-9000", f"{uuid.UUID(int=2)}-1000-9000"
    img1, img2 = str(uuid.UUID(int=3)), str(uuid.UUID(int=4))
    path = tmp_path / "training_videoinfo.txt"
    ann.write_training_videoinfo(path, [ann.TrainingClip(a, [f"{a}-0000"], [[[0.1, 0.1, 0.5, 0.5]]], img1),
                                        ann.TrainingClip(b, [f"{b}-0000"], [[]], img2)])
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\xef\xbb\xbf" + lines[0] + b"\n" + lines[1].replace(b"\t\t", b"\t\xe9\t", 1) + b"\n")
    problems = Problems()
    assert [c.video_id for c in ann.read_training_videoinfo(path, problems)] == [a]  # the BOM row parses
    assert problems.counts["malformed_row"] == 1 and problems.messages[0].startswith(f"{path}:2: not UTF-8")


# -- single files ----------------------------------------------------------------------------------------------
def test_images(tmp_path):
    """``load_rgb`` and the fast pre-flight ``check_image`` refuse the same files with the same one line."""
    from lpr4m.images import check_image, save_jpeg
    empty, junk, missing, cut = (tmp_path / f"{n}.jpg" for n in ("e", "j", "m", "t"))
    empty.write_bytes(b"")
    junk.write_text("hello")
    good = tmp_path / "good.jpg"
    save_jpeg(good, (np.random.default_rng(0).random((360, 640, 3)) * 255).astype(np.uint8))
    cut.write_bytes(good.read_bytes()[:good.stat().st_size // 2])  # a truncated JPEG with a valid header
    check_image(good)
    for path, msg in ((empty, "empty file"), (junk, "corrupt or unreadable image"), (missing, "image not found"),
                      (cut, "corrupt or unreadable image")):
        for read in (load_rgb, check_image):
            with pytest.raises(BadInput) as e:
                read(path)
            assert str(e.value) == f"{path}: {e.value.message}" and msg in e.value.message


def test_images_of_every_mode_read_as_what_they_show(tmp_path):
    """16-bit grey (PIL alone clips it to white), transparency (laid on white, a packshot's background), palette
    and CMYK all read as the 8-bit RGB a viewer would show."""
    from PIL import Image
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    got = load_rgb(tmp_path / "grey16.png")
    assert got.shape == (48, 64, 3) and got.dtype == np.uint8
    assert np.abs(got[..., 0].astype(int) - (ramp / 257).round()).max() <= 1 and (got[..., 0] == got[..., 2]).all()
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:5, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    got = load_rgb(tmp_path / "alpha.png")
    assert got[0, 0].tolist() == [200, 0, 0] and got[9, 9].tolist() == [255, 255, 255]
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgba[..., :3]).convert("CMYK").save(tmp_path / "cmyk.jpg")
    for name in ("palette.png", "cmyk.jpg"):  # the web palette holds 204, not 200
        assert np.abs(load_rgb(tmp_path / name)[0, 0].astype(int) - [200, 0, 0]).max() <= 4, name


def test_truncated_json_names_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{\n"a": [\n')
    with pytest.raises(BadInput) as e:
        read_json(path)
    assert e.value.line == 3 and str(e.value).startswith(f"{path}:3: invalid JSON")


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory) -> dict[str, Path]:
    import av
    d = tmp_path_factory.mktemp("badvid")
    good = d / "good.mp4"
    write_video(good, (np.full((48, 64, 3), 6 * i, np.uint8) for i in range(40)), fps=10)
    data = good.read_bytes()
    out = {"missing": d / "missing.mp4", "zero_byte": d / "zero.mp4", "text": d / "text.mp4",
           "truncated": d / "trunc.mp4", "audio_only": d / "audio.mp4", "folder": d / "dir.mp4"}
    out["zero_byte"].write_bytes(b"")
    out["text"].write_text("this is not a video\n" * 50)
    out["truncated"].write_bytes(data[: len(data) // 2])  # the mp4 index (moov) is at the end: gone
    out["folder"].mkdir()
    with av.open(str(out["audio_only"]), "w") as c:
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for i in range(4):
            frame.pts = i * 1024
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return out


@pytest.mark.parametrize("kind, msg", [("missing", "video not found"), ("zero_byte", "empty file"),
                                       ("text", "not a readable video"), ("truncated", "not a readable video"),
                                       ("audio_only", "no video stream"), ("folder", "is a folder")])
def test_bad_videos(bad_videos, kind, msg):
    path = bad_videos[kind]
    for call in (lambda: probe_video(path), lambda: sample_frames(path), lambda: sample_frames(path, "even")):
        with pytest.raises(BadInput) as e:
            call()
        assert str(e.value).startswith(f"{path}: ") and msg in str(e.value)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_an_image_renamed_to_mp4_is_not_a_one_frame_video(tmp_path, suffix):
    from PIL import Image
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / f"still{suffix}")
    (tmp_path / f"still{suffix}").rename(tmp_path / "clip.mp4")
    with pytest.raises(BadInput, match="a still image .*, not a video"):
        probe_video(tmp_path / "clip.mp4")


@pytest.mark.parametrize("url", ["https://example.com/clip.mp4", "rtmp://live.example.com/app/key"])
def test_a_url_is_named_as_a_url_not_a_missing_file(url):
    with pytest.raises(BadInput, match="a URL, not a video file") as e:
        probe_video(url)
    assert str(e.value).startswith(url + ": ")


def test_one_bad_test_annotation_entry_is_skipped_not_the_split(ds):
    """A malformed id in test_videoid_to_gtimage.json costs its query, counted with its line; --strict stops."""
    from lpr4m.layout import Dataset
    root, _ = ds
    good = len(Dataset(root).test_clips())
    _edit_json(root, "test_videoid_to_gtimage.json", lambda d: d.update({"../../etc/passwd": ["x"]}))
    problems = Problems()
    assert len(Dataset(root, problems).test_clips()) == good
    assert problems.counts["bad_annotation"] == 1 and "passwd" in problems.messages[0]
    assert problems.messages[0].startswith(str(root / ANN / "test_videoid_to_gtimage.json") + ":1: ")
    with pytest.raises(BadInput, match="unsafe"):
        Dataset(root, Problems(strict=True)).test_clips()


# -- outputs that would replace inputs -----------------------------------------------------------------------------
def _parse(module: str, argv: list[str]):
    import importlib
    return importlib.import_module(module).build_parser().parse_args(argv)


def test_an_output_never_replaces_an_input_or_another_output(ds, tmp_path, capsys):
    """Each case wrote over the clip, the weights, their config or an annotation file, or lost one of two outputs
    (a hostile walkthrough, 2026-12-07); now refused by the parser before any work, one line, exit 2."""
    root, _ = ds
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"a video")
    weights = tmp_path / "w" / "retriever.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    weights.with_suffix(".json").write_text("{}")
    annotation = root / ANN / "training_videoinfo.txt"
    index = tmp_path / "idx"
    cases = [
        ("pipeline.run", ["--clip", str(clip), "--html", str(clip)], "--html would overwrite the input of --clip"),
        ("pipeline.run", ["--clip", str(clip), "--json", str(clip)], "--json would overwrite the input of --clip"),
        ("retriever.evaluation", ["--data", str(root), "--weights", str(weights), "--out", str(weights)],
         "--out would overwrite the input of --weights"),
        ("retriever.evaluation", ["--data", str(root), "--weights", str(weights), "--out",
                                  str(weights.with_suffix(".json"))], "--out would overwrite the input of --weights"),
        ("retriever.exporting", ["--weights", str(weights), "--output", str(weights)], "would overwrite the input"),
        ("detector.evaluation", ["--data", str(root), "--out", str(annotation)], "lies inside the input folder"),
        ("lpr4m.split", [str(root), str(tmp_path / "s"), "--out", str(annotation)], "lies inside the input folder"),
        ("retriever.evaluation", ["--data", str(root), "--out", str(tmp_path / "r.json"), "--save-rankings",
                                  str(tmp_path / "r.json")], "name the same path"),
        ("pipeline.index", ["--out", str(index), "--summary", str(index / "meta.json")], f"inside {index}"),
        ("lpr4m.composite", [str(root / "more"), "--products", str(root), "--backgrounds", str(clip)],
         "lies inside the input folder"),
        ("detector.pseudo_labels", ["--data", str(root), "--weights", str(weights), "--out", str(root / "pl")],
         "lies inside the input folder"),
    ]
    for module, argv, says in cases:
        with pytest.raises(SystemExit) as e:
            _parse(module, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and err.count("\n") == 1, (module, argv, err)
    assert clip.read_bytes() == b"a video" and weights.read_bytes() == b"weights"
    # a new file inside an input folder is fine (nothing is replaced), and so is stdout
    assert _parse("retriever.evaluation", ["--data", str(root), "--out", str(root / "new.json")]).out
    assert _parse("pipeline.run", ["--clip", str(clip), "--json", "-"]).json == "-"


def test_a_device_is_not_an_output_file(tmp_path):
    from lpr4m.io import write_json
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null here")
    with pytest.raises(BadInput, match="not a regular file"):
        write_json("/dev/null", {})
    assert Path("/dev/null").is_char_device()


@pytest.mark.parametrize("text, says", [("[" * 200_000 + "]" * 200_000, "nested too deep"),
                                        ("{\"a\": " + "9" * 5001 + "}", "a number too long")])
def test_json_too_deep_or_too_long_is_one_line(tmp_path, text, says):
    path = tmp_path / "a.json"
    path.write_text(text)
    with pytest.raises(BadInput, match=says):
        read_json(path)


def test_an_image_too_large_to_decode_is_refused(tmp_path):
    from PIL import Image
    path = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(path)  # 400 Mpx, a few kB on disk
    with pytest.raises(BadInput, match="image too large"):
        load_rgb(path)


@pytest.mark.parametrize("value", ["0", "1", "1.5"])
def test_split_holds_out_some_products_and_trains_on_some(value, capsys):
    with pytest.raises(SystemExit):
        _parse("lpr4m.split", ["root", "out", "--holdout-products", value])
    assert "strictly between 0 and 1" in capsys.readouterr().err or value == "1.5"


def test_an_answer_missing_from_its_gallery_is_counted_not_silent(ds):
    from retriever.evaluation import QuerySet, count_unreachable_answers
    root, _ = ds
    qs = QuerySet(["v1", "v2"], ["L1", "L1"], [["a"], ["z"]], [None, None])
    problems = Problems()
    from lpr4m.layout import Dataset
    count_unreachable_answers(Dataset(root), qs, {"L1": (["a", "b"], None)}, problems)
    assert problems.counts == {"answer_not_in_gallery": 1} and "query v2" in problems.messages[0]
