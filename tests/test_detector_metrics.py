"""Box AP via pycocotools on hand-built cases whose answers are known without running a detector."""
import math

import numpy as np
import pytest

from detector.metrics import coco_box_map, coco_detections, coco_ground_truth

IMG = [(1, "a.jpg", 200, 200)]
BOX = [50.0, 50.0, 150.0, 150.0]  # 100x100 = 10000 px: "large" (> 96^2)


def _dets(image_id, boxes, scores):
    return coco_detections(image_id, np.array(boxes, np.float32), np.array(scores, np.float32))


def test_perfect_predictions_give_one():
    gt = coco_ground_truth(IMG + [(2, "b.jpg", 200, 200)], [[BOX], [[10, 10, 40, 40], [100, 100, 190, 170]]])
    dets = _dets(1, [BOX], [0.9]) + _dets(2, [[10, 10, 40, 40], [100, 100, 190, 170]], [0.8, 0.7])
    m = coco_box_map(gt, dets)
    for key in ("ap", "ap50", "ap75", "ar10", "ar100", "ap_large"):
        assert m[key] == pytest.approx(1.0), key
    assert m["ar1"] == pytest.approx(2 / 3)  # one detection per image finds 2 of the 3 boxes
    assert m["images"] == 2 and m["gt_boxes"] == 3


def test_empty_predictions_give_zero():
    m = coco_box_map(coco_ground_truth(IMG, [[BOX]]), [])
    assert m["ap"] == 0.0 and m["ap50"] == 0.0 and m["ar100"] == 0.0


def test_empty_ground_truth_is_undefined_not_perfect():
    gt = coco_ground_truth(IMG, [[]])
    assert coco_box_map(gt, _dets(1, [BOX], [0.9]))["ap"] is None
    assert coco_box_map(gt, [])["ap"] is None


@pytest.mark.parametrize("iou", [0.52, 0.62, 0.77, 0.93])
def test_box_off_by_known_iou(iou):
    # shift a 100x100 box right by d: IoU = (100 - d) / (100 + d)  ->  d = 100 (1 - iou) / (1 + iou)
    d = 100 * (1 - iou) / (1 + iou)
    det = [BOX[0] + d, BOX[1], BOX[2] + d, BOX[3]]
    m = coco_box_map(coco_ground_truth(IMG, [[BOX]]), _dets(1, [det], [0.9]))
    passed = sum(iou >= t for t in np.linspace(0.5, 0.95, 10))  # thresholds .50:.05:.95
    assert m["ap"] == pytest.approx(passed / 10, abs=1e-6)
    assert m["ap50"] == pytest.approx(1.0)
    assert m["ap75"] == pytest.approx(1.0 if iou >= 0.75 else 0.0)


def test_frames_without_boxes_count_as_images_without_objects():
    # image 2 has no product; a more confident false positive there halves precision at full recall
    gt = coco_ground_truth(IMG + [(2, "b.jpg", 200, 200)], [[BOX], []])
    dets = _dets(1, [BOX], [0.6]) + _dets(2, [BOX], [0.9])
    m = coco_box_map(gt, dets)
    assert m["ap50"] == pytest.approx(0.5, abs=0.01)  # 101-point interpolated precision is 0.5 at every recall
    assert m["ar100"] == pytest.approx(1.0)
    # the same false positive below the true one costs nothing
    dets = _dets(1, [BOX], [0.9]) + _dets(2, [BOX], [0.6])
    assert coco_box_map(gt, dets)["ap50"] == pytest.approx(1.0)


def test_size_buckets_and_subsets():
    small = [0.0, 0.0, 20.0, 20.0]  # 400 px < 32^2
    gt = coco_ground_truth(IMG + [(2, "b.jpg", 200, 200)], [[BOX], [small]])
    dets = _dets(1, [BOX], [0.9])  # the small one is missed
    m = coco_box_map(gt, dets)
    assert m["ap_large"] == pytest.approx(1.0) and m["ap_small"] == 0.0 and m["ap_medium"] is None
    assert m["ar100"] == pytest.approx(0.5)
    only_first = coco_box_map(gt, dets, img_ids=[1])
    assert only_first["ap"] == pytest.approx(1.0) and only_first["images"] == 1


def test_detections_are_xywh_rounded():
    d = coco_detections(3, np.array([[1.0, 2.0, 11.5, 22.25]]), np.array([0.123456789]))
    assert d == [{"image_id": 3, "category_id": 1, "bbox": [1.0, 2.0, 10.5, 20.25], "score": 0.12346}]
    assert not math.isnan(d[0]["score"])
