"""``python -m lpr4m stats`` on generated datasets and on ../shared/data/grocery-lpr (skipped when absent)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lpr4m import annotations as ann
from lpr4m.cli import run_main
from lpr4m.errors import Problems
from lpr4m.stats import dataset_stats, main
from test_layout import make_dataset

GROCERY = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery-lpr"


def _check_counts(s: dict, c: dict) -> None:
    tr, te = s["training"], s["test"]
    assert (tr["clips"], tr["frames"], tr["boxes"], tr["images"]) == \
        (c["training_clips"], c["training_frames"], c["boxes"], c["training_images"])
    assert tr["frames_on_disk"] == tr["frames"] and tr["images_on_disk"] == tr["images"]
    assert (te["clips"], te["query_frames"], te["gtbox_frames"], te["gallery_lives"], te["gallery_images"]) == \
        (c["test_clips"], c["query_frames"], c["gtbox_frames"], c["gallery_lives"], c["gallery_images"])


def test_generated_dataset(tmp_path):
    made = make_dataset(tmp_path, n_train=4, frames_per_clip=5, n_test=3, n_products=3)
    s = dataset_stats(tmp_path)
    _check_counts(s, made["counts"])
    assert s["problems"]["total"] == 0, s["problems"]["messages"]
    assert s["training"]["frames_with_boxes"] == 4 * 3 and s["test"]["gallery_files"] == 4  # one extra view
    assert s["test"]["videoid_asr_rows"] == 3 and s["test"]["image_title_rows"] == 3


def test_cli_out_file_and_verify(tmp_path, capsys):
    root = tmp_path / "ds"
    made = make_dataset(root)
    out = tmp_path / "stats.json"
    assert run_main(main, [str(root), "--verify", "--strict", "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    _check_counts(s, made["counts"])
    assert s["problems"]["total"] == 0
    assert run_main(main, [str(root)]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["clips"] == made["counts"]["training_clips"]


def test_authors_variant_file_is_counted(tmp_path):
    made = make_dataset(tmp_path)
    path = tmp_path / "annotations" / "training_videoinfo.txt"
    rows = []
    for c in made["clips"]:  # 12 columns with spu_id, frame paths, Python-literal lists
        paths = [f"training_video/{c.video_id}/{f}.jpg" for f in c.frame_ids]
        rows.append("\t".join([c.video_id, repr(paths), repr(c.boxes), c.image_id, c.image_title, c.category_id,
                               c.category_name, "spu-1", c.asr, "", "", ""]))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    s = dataset_stats(tmp_path)
    _check_counts(s, made["counts"])
    assert s["problems"]["total"] == 0


def test_test_only_dataset(tmp_path):
    made = make_dataset(tmp_path)
    (tmp_path / "annotations" / "training_videoinfo.txt").unlink()
    s = dataset_stats(tmp_path)
    assert s["training"] is None and s["test"]["clips"] == made["counts"]["test_clips"]
    assert s["problems"]["total"] == 0


def test_synth_fixture_dataset(request):
    """The session dataset written by lpr4m.synth (tests/conftest.py), when that fixture exists."""
    try:
        root = Path(request.getfixturevalue("lpr4m_mini"))
    except pytest.FixtureLookupError:
        pytest.skip("fixture lpr4m_mini (tests/conftest.py, helper data-synth) not available")
    problems = Problems()
    s = dataset_stats(root, problems)
    assert problems.total == 0, problems.messages[:5]
    assert s["training"]["clips"] > 0 and s["training"]["frames_on_disk"] == s["training"]["frames"]
    assert s["test"]["clips"] > 0 and s["test"]["clips_without_frames"] == 0
    assert s["test"]["gallery_images"] > 0 and s["training"]["boxes"] > 0
    n_rows = sum(1 for _ in ann.read_training_videoinfo(next((root / "annotations").glob("training_videoinfo*"))))
    assert s["training"]["clips"] == n_rows


@pytest.mark.skipif(not GROCERY.is_dir(), reason=f"{GROCERY} absent (shared real data)")
def test_grocery_lpr():
    s = dataset_stats(GROCERY, verify=True)
    assert s["problems"] == {"total": 0, "by_kind": {}, "messages": []}
    tr, te = s["training"], s["test"]
    assert tr["clips"] == 414 and tr["frames"] == tr["frames_on_disk"] and tr["boxes"] == 0
    assert tr["images"] == tr["images_on_disk"] == 61
    assert te["clips"] == 51 and te["gallery_lives"] == 1 and te["gallery_images"] == 61
    assert te["clip_videos"] == 51 and te["clips_without_frames"] == 0 and te["query_frames"] > 51
