import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gid.config import DataConfig
from gid.data import (
    DEFAULT_CLASSES,
    CocoDetection,
    RandomHorizontalFlip,
    VocDetection,
    build_dataset,
    collate,
    make_synthetic,
)
from gid.errors import GidError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synth"), train=120, val=12, seed=0)


# --- synthetic data --------------------------------------------------------------------------


def test_make_synthetic_is_deterministic(tmp_path):
    kwargs = dict(train=6, val=3, test=2, image_size=64)
    a = _files(make_synthetic(tmp_path / "a", seed=3, **kwargs))
    b = _files(make_synthetic(tmp_path / "b", seed=3, **kwargs))
    c = _files(make_synthetic(tmp_path / "c", seed=4, **kwargs))
    assert len(a) == 6 + 3 + 2 + 3
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_make_synthetic_skips_empty_splits(tmp_path):
    make_synthetic(tmp_path, train=2, val=0, image_size=64)
    assert sorted(p.name for p in (tmp_path / "annotations").iterdir()) == ["instances_train.json"]
    assert not (tmp_path / "val").exists()


def test_synthetic_annotations(synth):
    coco = COCO(synth / "annotations" / "instances_train.json")
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(DEFAULT_CLASSES)
    for image in coco.imgs.values():
        assert Image.open(synth / "train" / image["file_name"]).size == (128, 128) == (image["width"], image["height"])
    for ann in coco.anns.values():
        x, y, w, h = ann["bbox"]
        assert w >= 1 and h >= 1 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
        assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
    counts = [len(coco.imgToAnns[i]) for i in coco.imgs]
    assert min(counts) >= 1 and max(counts) <= 12 and sum(c >= 5 for c in counts) >= 10
    assert {ann["category_id"] for ann in coco.anns.values()} == set(range(1, len(DEFAULT_CLASSES) + 1))
    areas = np.array([ann["area"] for ann in coco.anns.values()])
    assert (areas < 16**2).mean() > 0.2 and (areas > 32**2).sum() >= 10


def test_make_synthetic_object_count_and_size_options(tmp_path):
    coco = COCO(make_synthetic(tmp_path, train=40, val=0, image_size=64, max_objects=3, min_object_size=16)
                / "annotations" / "instances_train.json")
    counts = [len(coco.imgToAnns[i]) for i in coco.imgs]
    assert min(counts) >= 1 and max(counts) == 3
    # a visible part can be smaller than the object, but never as small as the default's 6 px objects
    assert min(max(ann["bbox"][2], ann["bbox"][3]) for ann in coco.anns.values()) >= 8


def test_make_synthetic_rejects_bad_arguments(tmp_path):
    with pytest.raises(GidError, match="hexagon"):
        make_synthetic(tmp_path, train=1, classes=["circle", "hexagon"])
    with pytest.raises(GidError, match="image_size"):
        make_synthetic(tmp_path, train=1, image_size=16)
    with pytest.raises(GidError, match="max_objects"):
        make_synthetic(tmp_path, train=1, max_objects=0)
    with pytest.raises(GidError, match="min_object_size"):
        make_synthetic(tmp_path, train=1, image_size=64, min_object_size=40)


def test_coco_dataset_on_synthetic(synth):
    ds = CocoDetection(synth, "val", train=False)
    assert len(ds) == 12 and ds.num_classes == len(DEFAULT_CLASSES) + 1
    assert ds.class_names == list(DEFAULT_CLASSES)
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 128, 128)
    assert 0 <= image.min() and image.max() <= 1
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
    assert target["labels"].dtype == torch.int64 and len(target["labels"]) == len(target["boxes"])
    assert ((target["labels"] >= 1) & (target["labels"] < ds.num_classes)).all()
    assert target["image_id"] == ds.ids[0] and isinstance(target["image_id"], int)
    # boxes are the COCO boxes in xyxy
    anns = ds.coco.imgToAnns[target["image_id"]]
    xywh = torch.tensor([a["bbox"] for a in anns])
    assert torch.equal(target["boxes"], torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))


def test_perfect_detections_score_ap_1(synth):
    ds = CocoDetection(synth, "val", train=False)
    results = []
    for _, target in (ds[i] for i in range(len(ds))):
        for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            category_id = ds.label_to_category_id[label]
            bbox = [x1, y1, x2 - x1, y2 - y1]
            results.append({"image_id": target["image_id"], "category_id": category_id, "bbox": bbox, "score": 1.0})
    evaluator = COCOeval(ds.coco, ds.coco.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_build_dataset_and_collate(synth):
    ds = build_dataset(DataConfig(root=synth), "train", train=True)
    images, targets = collate([ds[0], ds[1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
    with pytest.raises(GidError, match="VOC"):
        build_dataset(DataConfig(root=synth, classes=["circle"]), "train", train=True)


# --- hand-written COCO -------------------------------------------------------------------------


def _write_image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.arange(width * height * 3, dtype=np.uint8).reshape(height, width, 3)
    Image.fromarray(pixels).save(path)


def _coco_tree(root: Path, data: dict | None = None) -> Path:
    """Three 40x30 images: 1 with boxes, 2 with none, 3 with only a crowd box."""
    if data is None:
        data = {
            "images": [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in (1, 2, 3)],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5], "area": 50, "iscrowd": 0},
                {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 1},
                {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0},
                {"id": 4, "image_id": 1, "category_id": 3, "bbox": [30, -4, 20, 10], "area": 200, "iscrowd": 0},
                {"id": 5, "image_id": 3, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1},
            ],
            "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        }
    for image in data.get("images", []):
        _write_image(root / "val" / image["file_name"], image["width"], image["height"])
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return root


def test_coco_targets_follow_torchvision(tmp_path):
    ds = CocoDetection(_coco_tree(tmp_path), "val", train=False)
    assert ds.class_names == ["cat", "dog"] and ds.label_to_category_id == {1: 3, 2: 7}
    assert ds.ids == [1, 2, 3]
    image, target = ds[0]
    assert image.shape == (3, 30, 40)
    # crowd and degenerate boxes dropped, the box sticking out clamped to the image
    assert target["boxes"].tolist() == [[2, 3, 12, 8], [30, 0, 40, 6]]
    assert target["labels"].tolist() == [2, 1]
    for index in (1, 2):
        _, target = ds[index]
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    # evaluation still sees the crowd box
    assert [a["iscrowd"] for a in ds.coco.imgToAnns[1]] == [0, 1, 0, 0]


def test_coco_train_drops_images_without_usable_boxes(tmp_path):
    ds = CocoDetection(_coco_tree(tmp_path), "val", train=True, hflip_prob=0.0)
    assert ds.ids == [1] and len(ds) == 1


def test_hflip_flips_boxes(tmp_path):
    root = _coco_tree(tmp_path)
    plain_image, plain = CocoDetection(root, "val", train=False)[0]
    image, target = CocoDetection(root, "val", train=True, hflip_prob=1.0)[0]
    assert torch.equal(image, plain_image.flip(-1))
    assert target["boxes"].tolist() == [[28, 3, 38, 8], [0, 0, 10, 6]]
    assert torch.equal(target["labels"], plain["labels"])


def test_hflip_probability():
    image, target = torch.rand(3, 4, 10), {"boxes": torch.tensor([[1.0, 0.0, 3.0, 2.0]])}
    out_image, out = RandomHorizontalFlip(0.0)(image, target)
    assert out_image is image and out is target
    _, out = RandomHorizontalFlip(1.0)(image, target)
    assert out["boxes"].tolist() == [[7, 0, 9, 2]] and target["boxes"].tolist() == [[1, 0, 3, 2]]


# --- hand-written VOC --------------------------------------------------------------------------


def _voc_xml(filename: str, objects: list[tuple[str, int, tuple[int, int, int, int]]]) -> str:
    objs = "".join(
        f"<object><name>{name}</name><difficult>{difficult}</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, difficult, (x1, y1, x2, y2) in objects
    )
    return (
        f"<annotation><filename>{filename}</filename>"
        f"<size><width>40</width><height>30</height><depth>3</depth></size>{objs}</annotation>"
    )


def _voc_tree(root: Path, objects_b=(("dog", 0, (1, 1, 40, 30)),)) -> Path:
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main" / "val.txt").write_text("a\nb\n")
    objects_a = [("cat", 0, (3, 4, 12, 10)), ("dog", 1, (20, 5, 30, 25))]
    (root / "Annotations" / "a.xml").write_text(_voc_xml("a.jpg", objects_a))
    (root / "Annotations" / "b.xml").write_text(_voc_xml("b.jpg", list(objects_b)))
    for name in ("a", "b"):
        _write_image(root / "JPEGImages" / f"{name}.jpg", 40, 30)
    return root


def test_voc_dataset(tmp_path):
    ds = VocDetection(_voc_tree(tmp_path), "val", classes=["cat", "dog"], train=True, hflip_prob=0.0)
    assert len(ds) == 2 and ds.num_classes == 3 and ds.class_names == ["cat", "dog"]
    assert ds.label_to_category_id == {1: 1, 2: 2}
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    # 1-based inclusive corners: subtract 1 from xmin/ymin; the difficult dog is left out
    assert target["boxes"].tolist() == [[2, 3, 12, 10]] and target["labels"].tolist() == [1]
    assert ds[1][1]["boxes"].tolist() == [[0, 0, 40, 30]]
    anns = ds.coco.imgToAnns[target["image_id"]]
    assert [(a["category_id"], a["iscrowd"]) for a in anns] == [(1, 0), (2, 1)]
    assert anns[1]["bbox"] == [19, 4, 11, 21]


def test_voc_default_classes(tmp_path):
    ds = VocDetection(_voc_tree(tmp_path), "val", train=False)
    assert ds.num_classes == 21 and ds.class_names[7] == "cat"


# --- user errors -------------------------------------------------------------------------------


def test_error_missing_annotation_file(tmp_path):
    with pytest.raises(GidError, match="annotation file not found"):
        CocoDetection(tmp_path, "val", train=False)


def test_error_malformed_json(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text('{"images": [')
    with pytest.raises(GidError, match="not valid JSON"):
        CocoDetection(tmp_path, "val", train=False)


def test_error_not_coco(tmp_path):
    with pytest.raises(GidError, match="no 'images' list"):
        CocoDetection(_coco_tree(tmp_path, {"foo": 1}), "val", train=False)


def test_error_missing_image_file(tmp_path):
    root = _coco_tree(tmp_path)
    (root / "val" / "2.png").unlink()
    ds = CocoDetection(root, "val", train=False)
    with pytest.raises(GidError, match="2.png"):
        ds[1]


def test_error_unknown_category_id(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "1.png", "width": 8, "height": 8}],
        "annotations": [{"id": 9, "image_id": 1, "category_id": 5, "bbox": [0, 0, 2, 2]}],
        "categories": [{"id": 1, "name": "a"}],
    }
    with pytest.raises(GidError, match="category_id 5"):
        CocoDetection(_coco_tree(tmp_path, data), "val", train=False)


def test_error_empty_data_set(tmp_path):
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    with pytest.raises(GidError, match="no images"):
        CocoDetection(_coco_tree(tmp_path, data), "val", train=False)


def test_error_unknown_voc_class(tmp_path):
    root = _voc_tree(tmp_path, objects_b=[("unicorn", 0, (1, 1, 5, 5))])
    with pytest.raises(GidError, match=r"b\.xml.*'unicorn'"):
        VocDetection(root, "val", classes=["cat", "dog"], train=False)


def test_error_missing_voc_split(tmp_path):
    with pytest.raises(GidError, match="split file not found"):
        VocDetection(tmp_path, "val", train=False)
