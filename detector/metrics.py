"""Box AP/AR with pycocotools: pure functions over COCO-format dicts, so they can be checked on hand-built cases."""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Iterable, Sequence

import numpy as np

CATEGORY = {"id": 1, "name": "product"}
STAT_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100",
              "ar_small", "ar_medium", "ar_large")


def coco_ground_truth(images: Sequence[tuple[int, str, int, int]], boxes: Sequence[Iterable]) -> dict:
    """A COCO ground-truth dict. ``images``: (image_id >= 1, file_name, width, height); ``boxes[i]``: pixel xyxy
    boxes of image i (an empty list is an image with no objects)."""
    imgs, anns = [], []
    for (image_id, name, w, h), bxs in zip(images, boxes, strict=True):
        imgs.append({"id": int(image_id), "file_name": name, "width": int(w), "height": int(h)})
        for x1, y1, x2, y2 in bxs:
            bw, bh = float(x2) - float(x1), float(y2) - float(y1)
            anns.append({"id": len(anns) + 1, "image_id": int(image_id), "category_id": 1,
                         "bbox": [float(x1), float(y1), bw, bh], "area": bw * bh, "iscrowd": 0})
    return {"images": imgs, "annotations": anns, "categories": [dict(CATEGORY)]}


def coco_detections(image_id: int, xyxy: np.ndarray, scores: np.ndarray) -> list[dict]:
    """COCO result entries (xywh) for one image."""
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    return [{"image_id": int(image_id), "category_id": 1,
             "bbox": [round(float(b[0]), 3), round(float(b[1]), 3), round(float(b[2] - b[0]), 3),
                      round(float(b[3] - b[1]), 3)], "score": round(float(s), 5)}
            for b, s in zip(xyxy, np.asarray(scores).reshape(-1))]


def _coco(gt: dict):
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _load_results(coco_gt, dets: list[dict]):
    from pycocotools.coco import COCO
    if dets:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(copy.deepcopy(dets))
    # loadRes cannot take an empty list; an empty result set is a COCO with no annotations
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                   "categories": copy.deepcopy(coco_gt.dataset["categories"])}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def coco_box_map(gt: dict, dets: list[dict], img_ids: Sequence[int] | None = None) -> dict[str, float | None]:
    """AP@[.50:.95], AP50, AP75, AP/AR by size, AR@1/10/100 for one class (pycocotools ``COCOeval``, bbox).

    Images without annotations count (their detections are false positives). A metric pycocotools cannot define
    (e.g. no ground-truth boxes at all, or none of a size) is ``None``.
    """
    from pycocotools.cocoeval import COCOeval
    coco_gt = _coco(gt)
    coco_dt = _load_results(coco_gt, dets)
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if img_ids is not None:
        ev.params.imgIds = sorted(int(i) for i in img_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {name: (None if v < 0 else float(v)) for name, v in zip(STAT_NAMES, ev.stats)}
    out["images"] = len(ev.params.imgIds)
    out["gt_boxes"] = sum(len(coco_gt.getAnnIds(imgIds=[i])) for i in ev.params.imgIds)
    return out
