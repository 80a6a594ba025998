"""COCO-format detection data, loaded the way torchvision's detection references do.

Targets follow ``torchvision/references/detection/coco_utils.py``: crowd annotations are left
out, boxes are clamped to the image and degenerate ones dropped, and training skips images
with nothing left to learn from while evaluation keeps every image. Labels are contiguous,
1..C in order of category id (0 is the background), and ``label_to_category_id`` maps them
back for COCO evaluation, which runs on the ``coco`` attribute.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from gid.data import transforms as T
from gid.errors import GidError


class DetectionDataset(Dataset):
    """Images and targets described by an in-memory pycocotools ``COCO`` object.

    ``images`` is the folder that the ``file_name`` of each COCO image is relative to, and
    ``source`` names the annotation file(s) in error messages.
    """

    def __init__(self, coco: COCO, images: Path, source: str, *, train: bool, hflip_prob: float = 0.5) -> None:
        self.coco = coco
        self.images = images
        self.source = source
        category_ids = sorted(coco.cats)
        self.label_to_category_id: dict[int, int] = {label: cat for label, cat in enumerate(category_ids, 1)}
        self.category_id_to_label = {cat: label for label, cat in self.label_to_category_id.items()}
        self.class_names: list[str] = [coco.cats[cat]["name"] for cat in category_ids]
        self.num_classes = len(category_ids) + 1
        self.ids = sorted(coco.imgs)
        if train:
            self.ids = [image_id for image_id in self.ids if len(self._target(image_id)["boxes"])]
        if not self.ids:
            which = "with a usable (non-crowd, non-empty) box " if train and coco.imgs else ""
            raise GidError(f"{source}: the data set has no images {which}to load")
        steps: list[T.Transform] = [T.to_tensor]
        if train and hflip_prob > 0:
            steps.append(T.RandomHorizontalFlip(hflip_prob))
        self.transforms = T.Compose(steps)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        return self.transforms(self._load_image(image_id), self._target(image_id))

    def check_image_files(self) -> None:
        """Fail now, not mid-epoch in a worker, if an image the data set lists is not on disk."""
        paths = [self.images / self.coco.imgs[image_id]["file_name"] for image_id in self.ids]
        missing = [path for path in paths if not path.is_file()]
        if missing:
            raise GidError(
                f"image file not found: {missing[0]} (listed in {self.source}; {len(missing)} of {len(paths)} missing)"
            )

    def _load_image(self, image_id: int) -> Image.Image:
        info = self.coco.imgs[image_id]
        path = self.images / info["file_name"]
        if not path.is_file():
            raise GidError(f"image file not found: {path} (listed in {self.source})")
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise GidError(f"cannot read image {path}: {exc}") from None
        if image.size != (info["width"], info["height"]):
            raise GidError(
                f"image {path} is {image.width}x{image.height} but {self.source} "
                f"says {info['width']}x{info['height']}"
            )
        return image

    def _target(self, image_id: int) -> dict[str, Any]:
        """Non-crowd boxes as ``xyxy`` clamped to the image, without degenerate ones."""
        info = self.coco.imgs[image_id]
        anns = [ann for ann in self.coco.imgToAnns[image_id] if not ann["iscrowd"]]
        boxes = torch.tensor([ann["bbox"] for ann in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=info["width"])
        boxes[:, 1::2].clamp_(min=0, max=info["height"])
        labels = torch.tensor([self.category_id_to_label[ann["category_id"]] for ann in anns], dtype=torch.int64)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        return {"boxes": boxes[keep], "labels": labels[keep], "image_id": image_id}


class CocoDetection(DetectionDataset):
    """``root/annotations/instances_{split}.json`` with images under ``root/{split}/``."""

    def __init__(self, root: Path, split: str, *, train: bool, hflip_prob: float = 0.5) -> None:
        root = Path(root)
        ann_file = root / "annotations" / f"instances_{split}.json"
        super().__init__(load_coco(ann_file), root / split, str(ann_file), train=train, hflip_prob=hflip_prob)


def load_coco(path: Path) -> COCO:
    """A checked pycocotools ``COCO`` object from a detection annotation file."""
    if not path.is_file():
        raise GidError(f"annotation file not found: {path} (COCO layout: root/annotations/instances_<split>.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GidError(f"{path}: not valid JSON: {exc}") from None
    return coco_from_dict(data, str(path))


def coco_from_dict(data: Any, source: str) -> COCO:
    """Check a COCO detection dict, fill in what evaluation needs, and index it."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise GidError(f"{source}: not a COCO detection file (no 'images' list)")
    if not isinstance(data.get("categories"), list) or not data["categories"]:
        raise GidError(f"{source}: not a COCO detection file (no 'categories' list)")
    data.setdefault("annotations", [])
    _require(data["images"], ("id", "file_name", "width", "height"), "image", source)
    _require(data["categories"], ("id", "name"), "category", source)
    _require(data["annotations"], ("id", "image_id", "category_id", "bbox"), "annotation", source)
    for image in data["images"]:
        _check_image(image, source)
    images = {image["id"]: image for image in data["images"]}
    category_ids = {cat["id"] for cat in data["categories"]}
    for ann in data["annotations"]:
        _check_annotation(ann, images, category_ids, source)
        # COCOeval reads both
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def _check_image(image: dict, source: str) -> None:
    size = image["width"], image["height"]
    if not all(isinstance(v, int) and v > 0 for v in size):
        raise GidError(f"{source}: image {image['id']} has width, height {size!r}; expected whole pixels > 0")


def _check_annotation(ann: dict, images: dict[int, dict], category_ids: set, source: str) -> None:
    """One annotation refers to a known image and category and has a box on that image.

    Zero-width or zero-height boxes pass (torchvision drops them, and COCO itself has some);
    a negative size or a box wholly outside its image is a broken annotation.
    """
    where = f"{source}: annotation {ann['id']}"
    if ann["category_id"] not in category_ids:
        raise GidError(
            f"{where} has category_id {ann['category_id']}, which is not in 'categories' (ids {sorted(category_ids)})"
        )
    if ann["image_id"] not in images:
        raise GidError(f"{where} has image_id {ann['image_id']}, which is not in 'images'")
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise GidError(f"{where} has bbox {bbox!r}; expected [x, y, width, height]")
    x, y, w, h = bbox
    if w < 0 or h < 0:
        raise GidError(f"{where} has bbox {bbox} with a negative width or height; COCO boxes are [x, y, width, height]")
    image = images[ann["image_id"]]
    if w > 0 and h > 0 and (x >= image["width"] or y >= image["height"] or x + w <= 0 or y + h <= 0):
        raise GidError(
            f"{where} has bbox {bbox}, wholly outside its {image['width']}x{image['height']} image {image['file_name']}"
        )


def _require(items: list, keys: tuple[str, ...], kind: str, source: str) -> None:
    for i, item in enumerate(items):
        missing = [key for key in keys if not isinstance(item, dict) or key not in item]
        if missing:
            raise GidError(f"{source}: {kind} #{i} lacks {', '.join(missing)}")
