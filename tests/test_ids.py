"""LPR4M ids: parsing, the checks that keep ids plain file names, and URL -> layout placement."""
from __future__ import annotations

import pytest

from lpr4m.errors import BadInput
from lpr4m.ids import (VideoId, check_safe_name, frame_id_from, parse_frame_id, parse_gallery_name,
                       parse_image_id, parse_live_id, parse_video_id, target_from_url)

LIVE = "9016ad55-b7c8-5601-865b-b98b515df41c"
IMAGE = "264aabc1-5355-5b38-9d68-c7dbd7383315"
VIDEO = f"{LIVE}-1600000000000-1600000005000"
FRAME = f"{VIDEO}-0003"


def test_parse_video_id():
    v = parse_video_id(VIDEO)
    assert v == VideoId(LIVE, 1600000000000, 1600000005000)
    assert v.duration_s == 5.0
    assert str(v) == VIDEO


def test_parse_frame_id_and_live_image():
    assert parse_frame_id(FRAME) == (VIDEO, 3)
    assert parse_live_id(LIVE) == LIVE
    assert parse_image_id(IMAGE) == IMAGE
    assert parse_gallery_name(f"{IMAGE}-0") == (IMAGE, 0)
    assert parse_gallery_name(f"{IMAGE}-12") == (IMAGE, 12)


@pytest.mark.parametrize("text", [FRAME, FRAME + ".jpg", f"training_video/{VIDEO}/{FRAME}.jpg",
                                  f"/abs/{VIDEO}/{FRAME}.JPG", f"C:\\data\\{VIDEO}\\{FRAME}.jpg"])
def test_frame_id_from_ids_and_paths(text):
    assert frame_id_from(text) == FRAME


@pytest.mark.parametrize("bad", ["a/b", "..", ".", "../etc", "x\0y", "a\\b", "", ".hidden", "a..b"])
def test_unsafe_names_rejected(bad):
    with pytest.raises(BadInput, match="unsafe"):
        check_safe_name(bad)


@pytest.mark.parametrize("parser, bad", [
    (parse_live_id, "not-a-uuid"), (parse_live_id, LIVE + "-1"), (parse_image_id, "abc"),
    (parse_video_id, LIVE), (parse_video_id, f"{LIVE}-1-x"), (parse_frame_id, VIDEO),
    (parse_gallery_name, IMAGE), (parse_video_id, f"../{VIDEO}"), (parse_frame_id, f"{VIDEO}/../{FRAME}"),
    (parse_image_id, f"{IMAGE}\0"),
])
def test_malformed_ids_raise_with_location(parser, bad):
    with pytest.raises(BadInput) as e:
        parser(bad, "ann.txt", 7)
    assert e.value.path == "ann.txt" and e.value.line == 7
    assert str(e.value).startswith("ann.txt:7: ")
    assert "\n" not in str(e.value)


def test_frame_id_from_rejects_path_traversal_stem():
    with pytest.raises(BadInput):
        frame_id_from("../../etc/passwd")


@pytest.mark.parametrize("url, kind, rel", [
    (f"https://x.com/lpr4m/training_video/{VIDEO}/{FRAME}.jpg", "training_frame",
     f"training_video/{VIDEO}/{FRAME}.jpg"),
    (f"https://x.com/lpr4m/query/{VIDEO}/{FRAME}.jpg", "query_frame", f"query/{VIDEO}/{FRAME}.jpg"),
    (f"https://x.com/gallery/{LIVE}/{IMAGE}-1.jpg", "gallery_image", f"gallery/{LIVE}/{IMAGE}-1.jpg"),
    (f"https://x.com/training_image/{IMAGE}.jpg", "training_image", f"training_image/{IMAGE}.jpg"),
    (f"https://x.com/{FRAME}.jpg?sig=1", "training_frame", f"training_video/{VIDEO}/{FRAME}.jpg"),
])
def test_target_from_url(url, kind, rel):
    t = target_from_url(url)
    assert (t.kind, t.relpath) == (kind, rel)


@pytest.mark.parametrize("url", ["https://x.com/", "https://x.com/a/readme.txt", "https://x.com/%2e%2e/..jpg"])
def test_target_from_url_rejects(url):
    with pytest.raises(BadInput):
        target_from_url(url)
