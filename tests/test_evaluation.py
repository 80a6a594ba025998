import json

import torch
from pycocotools.coco import COCO

from gid.engine.evaluation import coco_metrics, to_coco_detections


def small_coco(tmp_path) -> COCO:
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2)]
    boxes = {1: [[10, 10, 30, 20], [50, 40, 40, 50]], 2: [[5, 60, 20, 20]]}
    annotations, next_id = [], 1
    for image_id, image_boxes in boxes.items():
        for box in image_boxes:
            annotations.append(
                {"id": next_id, "image_id": image_id, "category_id": 1 + next_id % 2, "bbox": box,
                 "area": box[2] * box[3], "iscrowd": 0}
            )
            next_id += 1
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return COCO(str(path))


def ground_truth_as_detections(coco: COCO, shift: float = 0.0) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
         "bbox": [a["bbox"][0] + shift, a["bbox"][1] + shift, a["bbox"][2], a["bbox"][3]]}
        for a in coco.dataset["annotations"]
    ]


def test_ground_truth_fed_back_scores_perfect_ap(tmp_path):
    coco = small_coco(tmp_path)
    metrics = coco_metrics(coco, ground_truth_as_detections(coco))
    assert metrics["ap"] == 1.0 and metrics["ap50"] == 1.0 and metrics["ap75"] == 1.0


def test_shifted_boxes_score_lower(tmp_path):
    coco = small_coco(tmp_path)
    shifted = coco_metrics(coco, ground_truth_as_detections(coco, shift=6.0))
    assert shifted["ap"] < 1.0
    assert shifted["ap50"] >= shifted["ap75"]


def test_no_detections_scores_zero(tmp_path):
    assert coco_metrics(small_coco(tmp_path), [])["ap"] == 0.0


def test_detector_outputs_become_coco_records():
    outputs = [{"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([2])}]
    (record,) = to_coco_detections(outputs, [7], {1: 11, 2: 12})
    assert record == {"image_id": 7, "category_id": 12, "bbox": [10.0, 20.0, 30.0, 40.0], "score": record["score"]}
    assert abs(record["score"] - 0.9) < 1e-6
