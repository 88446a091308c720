"""Every annotation reader/writer round-trips, and reads the authors' variants (spu_id column, frame paths,
Python-literal lists)."""
from __future__ import annotations

import json

import pytest

from lpr4m import annotations as ann
from lpr4m.errors import BadInput, Problems

LIVE = "9016ad55-b7c8-5601-865b-b98b515df41c"
LIVE2 = "11111111-2222-3333-4444-555555555555"
IMG = "264aabc1-5355-5b38-9d68-c7dbd7383315"
IMG2 = "453b05f5-1c85-50b9-9234-e114ea179a0a"
VID = f"{LIVE}-1000-4000"
VID2 = f"{LIVE2}-0-9000"
FRAMES = [f"{VID}-{i:04d}" for i in range(3)]


def _clip(**kw) -> ann.TrainingClip:
    base = dict(video_id=VID, frame_ids=list(FRAMES), boxes=[[[0.1, 0.2, 0.5, 0.6]], [], [[0.0, 0.0, 1.0, 1.0],
                                                                                       [0.3, 0.3, 0.4, 0.9]]],
                image_id=IMG, image_title="Oat milk 1 l", category_id="7", category_name="Drinks",
                asr="this one is great", scale_type="1", duration_type="2", number_type="0")
    base.update(kw)
    return ann.TrainingClip(**base)


def test_training_videoinfo_round_trip(tmp_path):
    clips = [_clip(), _clip(video_id=VID2, frame_ids=[f"{VID2}-0000"], boxes=[[]], image_id=IMG2, asr="")]
    path = tmp_path / "training_videoinfo.txt"
    assert ann.write_training_videoinfo(path, clips) == 2
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and all(len(line.split("\t")) == len(ann.README_COLUMNS) for line in lines)
    back = list(ann.read_training_videoinfo(path))
    assert back == clips
    assert [c.line for c in back] == [1, 2]
    assert back[0].has_boxes and not back[1].has_boxes and back[0].live_id == LIVE


def test_writer_keeps_rows_single_line(tmp_path):
    path = tmp_path / "t.txt"
    ann.write_training_videoinfo(path, [_clip(image_title="a\tb", asr="line1\nline2\r\n")])
    (row,) = ann.read_training_videoinfo(path)
    assert row.image_title == "a b" and row.asr == "line1 line2"


def _row(cells) -> str:
    return "\t".join(cells) + "\n"


def test_authors_variant_spu_id_frame_paths_python_literals(tmp_path):
    frame_paths = [f"/data/lpr4m/training_video/{VID}/{f}.jpg" for f in FRAMES]
    cells = [VID, repr(frame_paths), "[[(0.1, 0.2, 0.5, 0.6)], [], [[0, 0, 1, 1], [0.3, 0.3, 0.4, 0.9]]]", IMG,
             "Oat milk 1 l", "7", "Drinks", "SPU123", "this one is great", "1", "2", "0"]
    assert len(cells) == len(ann.AUTHORS_COLUMNS)
    path = tmp_path / "training_videoinfo_authors.txt"
    path.write_text(_row(cells), encoding="utf-8")
    (row,) = ann.read_training_videoinfo(path)
    assert row.frame_ids == FRAMES
    assert row.spu_id == "SPU123" and row.asr == "this one is great" and row.number_type == "0"
    assert row.boxes == [[[0.1, 0.2, 0.5, 0.6]], [], [[0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.4, 0.9]]]
    # written back in the README form: same content, spu_id dropped (not a README column)
    out = tmp_path / "readme.txt"
    ann.write_training_videoinfo(out, [row])
    (again,) = ann.read_training_videoinfo(out)
    assert again == _clip(spu_id="")
    assert json.loads(out.read_text().split("\t")[1]) == FRAMES


def test_json_lists_crlf_and_empty_box_cell(tmp_path):
    cells = [VID, json.dumps(FRAMES), "", IMG, "t", "", "", "", "", "", ""]
    path = tmp_path / "t.txt"
    path.write_bytes(("\r\n\r\n" + _row(cells).replace("\n", "\r\n")).encode())
    (row,) = ann.read_training_videoinfo(path)
    assert row.boxes == [[], [], []] and row.line == 3


def test_box_tolerance_is_clipped():
    assert ann.check_box([-1e-9, 0.2, 1 + 1e-9, 0.4]) == [0.0, 0.2, 1.0, 0.4]


def test_parse_list_never_evaluates_code():
    with pytest.raises(BadInput, match="neither JSON nor a Python literal"):
        ann.parse_list("__import__('os').system('echo hi')")
    assert ann.parse_list("('a', 'b')") == ["a", "b"]


def test_id_maps_round_trip(tmp_path):
    gt = {VID: [IMG], VID2: [IMG2, IMG]}
    gallery = {LIVE: [IMG, IMG2], LIVE2: [IMG2]}
    boxes = {FRAMES[0]: [[0.1, 0.1, 0.2, 0.2]], FRAMES[1]: []}
    ann.write_id_map(tmp_path / "gt.json", gt)
    ann.write_id_map(tmp_path / "gal.json", gallery)
    ann.write_id_map(tmp_path / "box.json", boxes)
    assert ann.read_videoid_to_gtimage(tmp_path / "gt.json") == gt
    assert ann.read_liveid_to_gallery(tmp_path / "gal.json") == gallery
    assert ann.read_frameid_to_gtbox(tmp_path / "box.json") == boxes


def test_gtbox_keys_may_be_frame_paths(tmp_path):
    (tmp_path / "box.json").write_text(json.dumps({f"query/{VID}/{FRAMES[2]}.jpg": [[0, 0, 0.5, 0.5]]}))
    assert ann.read_frameid_to_gtbox(tmp_path / "box.json") == {FRAMES[2]: [[0.0, 0.0, 0.5, 0.5]]}


def test_bad_gtbox_entries_name_their_line(tmp_path):
    """json.load keeps no positions: the line comes from the key's place in the file (found in file order)."""
    rows = [[[0.1, 0.1, 0.2, 0.2]], [[0.1, 0.2, 0.3]], [[0.5, 0.5, 0.4, 0.9]]]
    lines = ",\n".join(f" {json.dumps(f)}: {json.dumps(b)}" for f, b in zip(FRAMES, rows))
    (tmp_path / "box.json").write_text("{\n" + lines + "\n}\n")  # FRAMES[i] on line i + 2
    with pytest.raises(BadInput, match=rf"box.json:3: frame '{FRAMES[1]}': box \[0.1, 0.2, 0.3\]"):
        ann.read_frameid_to_gtbox(tmp_path / "box.json")
    problems = Problems()
    assert ann.read_frameid_to_gtbox(tmp_path / "box.json", problems) == {FRAMES[0]: [[0.1, 0.1, 0.2, 0.2]]}
    assert [m.split(": frame")[0].rsplit(":", 1)[1] for m in problems.messages] == ["3", "4"]


def test_id_text_round_trip(tmp_path):
    asr = {VID: "hello\tworld", VID2: ""}
    titles = {IMG: "Oat milk", IMG2: "Soy drink\n1 l"}
    ann.write_id_text(tmp_path / "asr.txt", asr)
    ann.write_id_text(tmp_path / "titles.txt", titles)
    assert ann.read_asr(tmp_path / "asr.txt") == {VID: "hello world", VID2: ""}
    assert ann.read_titles(tmp_path / "titles.txt") == {IMG: "Oat milk", IMG2: "Soy drink 1 l"}


def test_problems_collects_instead_of_raising(tmp_path):
    path = tmp_path / "t.txt"
    good = _row([VID, json.dumps(FRAMES), "[]", IMG] + [""] * 7)
    path.write_text(good + "only\tthree\tcells\n" + good.replace(IMG, "bad-image"), encoding="utf-8")
    problems = Problems()
    rows = list(ann.read_training_videoinfo(path, problems))
    assert len(rows) == 1
    assert problems.counts == {"malformed_row": 2}
    assert problems.messages[0].startswith(f"{path}:2: expected 11 tab-separated columns")
    assert problems.messages[1].startswith(f"{path}:3: malformed image_id")
    with pytest.raises(BadInput, match=":2: "):
        list(ann.read_training_videoinfo(path, Problems(strict=True)))
