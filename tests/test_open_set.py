"""Open-set evaluation: the split by product, seen / unseen rank-k, LP-FT + WiSE-FT training, flip TTA and the
crop policy that fuses detector crops with their full frames."""
import json
from pathlib import Path

import numpy as np
import pytest

from lpr4m.cli import run_main
from lpr4m.errors import BadInput
from lpr4m.layout import Dataset
from lpr4m.split import main as split_main, split_by_product


@pytest.fixture(scope="module")
def split(lpr4m_mini, tmp_path_factory):
    out = tmp_path_factory.mktemp("split") / "s"
    summary = split_by_product(lpr4m_mini, out, holdout=0.5, seed=1)
    return out, summary


def test_split_holds_products_out_of_training(lpr4m_mini, split):
    out, summary = split
    src, ds = Dataset(lpr4m_mini), Dataset(out)
    all_products = {c.image_id for c in src.training_clips()}
    train_products = ds.training_image_ids()
    held = set(summary["held_out"])
    assert held and train_products and held | train_products == all_products and not held & train_products
    gt = ds.gt_images
    for clip in src.training_clips():  # every held-out training clip is a query, answered by its own product
        if clip.image_id in held:
            assert gt[clip.video_id] == [clip.image_id]
            assert clip.image_id in ds.live_galleries[clip.live_id]
            assert ds.gallery_image_path(clip.live_id, clip.image_id).resolve() == \
                src.training_image_path(clip.image_id).resolve()
            assert len(ds.query_frames(clip.video_id)) == len(clip.frame_ids)
    assert set(src.gt_images) <= set(gt)  # the root's own test split is kept
    n_unseen = sum(1 for ids in gt.values() if not set(ids) & train_products)
    assert summary["test_queries"] == {"total": len(gt), "seen": len(gt) - n_unseen, "unseen": n_unseen}
    assert all(p.is_symlink() for p in (out / "training_video").iterdir())  # links, not copies
    assert json.loads((out / "split.json").read_text())["seed"] == 1


def test_split_bad_input(lpr4m_mini, split, tmp_path, capsys):
    out, _ = split
    assert run_main(split_main, [str(lpr4m_mini), str(out)]) == 2  # not an empty folder
    assert "not an empty folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # refused by the parser, before any work
        split_main([str(lpr4m_mini), str(lpr4m_mini / "inside")])
    assert e.value.code == 2 and "lies inside the input folder" in capsys.readouterr().err
    with pytest.raises(BadInput, match="must not lie inside"):  # and by the library
        split_by_product(lpr4m_mini, lpr4m_mini / "inside")
    assert run_main(split_main, [str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    with pytest.raises(SystemExit):
        split_main([str(lpr4m_mini), str(tmp_path / "o"), "--holdout-products", "1.5"])
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_by_product_matches_a_recount():
    from retriever.metrics import by_product
    rng = np.random.default_rng(0)
    gallery = [f"g{i}" for i in range(12)]
    gt = [[gallery[rng.integers(12)]] for _ in range(40)]
    rankings = [list(rng.permutation(gallery)) for _ in range(40)]
    rankings[3] = None  # a failed query counts as a miss in its group
    seen = set(gallery[:5])
    out = by_product(rankings, gt, seen, ks=(1, 3))
    for group, want_seen in (("seen", True), ("unseen", False)):
        rows = [i for i in range(40) if (gt[i][0] in seen) == want_seen]
        for k in (1, 3):
            hits = sum(1 for i in rows if rankings[i] is not None and gt[i][0] in rankings[i][:k])
            assert out[group][f"R{k}"] == pytest.approx(hits / len(rows))
        assert out[group]["n_queries"] == len(rows)
    assert by_product([["a"]], [["a"]], set(), ks=(1,))["seen"] == {"n_queries": 0}  # empty group: no silent 0


def test_crop_weight_and_fusion():
    from retriever.crops import FUSE_HIGH, FUSE_LOW, combine_views, crop_weight, fuse
    assert crop_weight(FUSE_LOW - 0.1) == 0.0 and crop_weight(FUSE_HIGH) == 1.0 and crop_weight(0.1, "crop") == 1.0
    assert crop_weight((FUSE_LOW + FUSE_HIGH) / 2) == pytest.approx(0.5)
    crop, full = np.array([[1.0, 0.0]], np.float32), np.array([0.0, 1.0], np.float32)
    np.testing.assert_allclose(fuse(crop, full, [0.5]), [[2 ** -0.5, 2 ** -0.5]], rtol=1e-6)
    embs = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    # frame 0: crop row 0 fused with full row 1 at 0.5; frame 1: full frame only (row 2)
    out = combine_views(embs, [(0, 1, 0.5), (None, 2, 0.0)])
    np.testing.assert_allclose(out, [[2 ** -0.5, 2 ** -0.5], [0.6, 0.8]], rtol=1e-6)
    with pytest.raises(ValueError):
        crop_weight(0.5, "nope")


@pytest.fixture(scope="module")
def wise_run(split, tmp_path_factory):
    from retriever.training import main as train_main
    runs = tmp_path_factory.mktemp("runs")
    out = runs / "r.json"
    argv = ["--data", str(split[0]), "--preset", "cpu", "--input-size", "64", "--batch-size", "4", "--threads",
            "1", "--eval-frames", "3", "--epochs", "2", "--lp-epochs", "1", "--wise-alpha", "0.5",
            "--cache-views", "1", "--image-views", "1", "--runs-dir", str(runs), "--max-minutes", "0",
            "--out", str(out)]
    assert run_main(train_main, argv) == 0
    return json.loads(out.read_text())


def test_lp_ft_then_wise_ft_interpolates_from_the_probed_model(wise_run):
    """The saved weights are the midpoint of the anchor (pretrained trunk, probed head) and the fine-tuned ones."""
    import torch
    from safetensors.torch import load_file
    from retriever.models import create_embedder
    weights = Path(wise_run["weights"])
    last, tuned = load_file(str(weights)), load_file(str(weights.with_name("finetuned.safetensors")))
    pretrained = create_embedder("efficientnet_lite0", pretrained=True)[0].state_dict()
    moved = [k for k in pretrained if k.startswith("trunk.") and pretrained[k].is_floating_point()
             and not torch.equal(pretrained[k], tuned[k])]
    assert moved  # the trunk trained in the second epoch
    for k in moved:
        torch.testing.assert_close(last[k], (pretrained[k] + tuned[k]) / 2, rtol=1e-5, atol=1e-6)
    state = torch.load(Path(wise_run["run_dir"]) / "train_state.pt", map_location="cpu", weights_only=True)
    for k in ("proj.weight", "pool.fc1.weight"):  # the head's anchor is the probe, not its random start
        torch.testing.assert_close(last[k], (state["anchor"][k] + tuned[k]) / 2, rtol=1e-5, atol=1e-6)
    rows = (Path(wise_run["run_dir"]) / "results.csv").read_text().splitlines()
    assert "mean_unseen_R1" in rows[0]  # the split's held-out products (and the mini's new test products) apart


def test_evaluate_reports_seen_and_unseen(wise_run, split, lpr4m_mini, tmp_path, caplog):
    from retriever.evaluation import main as evaluate_main
    out = tmp_path / "e.json"
    root = split[0]
    assert run_main(evaluate_main, ["--data", str(root), "--weights", wise_run["weights"], "--frames", "2",
                                    "--train-data", str(root), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    groups = res["by_product"]["live/attention"]
    assert groups["seen"]["n_queries"] + groups["unseen"]["n_queries"] == res["results"]["live/attention"]["n_queries"]
    assert groups["unseen"]["n_queries"] == split[1]["test_queries"]["unseen"]
    # a training split sharing no product with the test queries: said plainly, every query unseen
    other = tmp_path / "other"
    (other / "annotations").mkdir(parents=True)
    (other / "annotations" / "training_videoinfo.txt").write_text("")
    assert run_main(evaluate_main, ["--data", str(root), "--weights", wise_run["weights"], "--frames", "2",
                                    "--train-data", str(other), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["by_product"]["live/attention"]["seen"] == {"n_queries": 0}
    assert "shares no product" in caplog.text


def test_flip_tta_averages_an_image_and_its_mirror(wise_run):
    from retriever import load_embedder
    emb = load_embedder(wise_run["weights"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (50, 70, 3), dtype=np.uint8) for _ in range(3)]
    plain = emb.embed(images)
    mirrored = emb.embed([im[:, ::-1].copy() for im in images])
    fingerprint = emb.fingerprint
    emb.config.tta = "flip"
    want = plain + mirrored
    np.testing.assert_allclose(emb.embed(images, batch_size=2), want / np.linalg.norm(want, axis=1, keepdims=True),
                               atol=1e-5)
    assert emb.fingerprint != fingerprint  # an index built without TTA is not reused with it
