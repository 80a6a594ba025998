"""Pascal VOC detection data, converted to an in-memory COCO data set.

Converting the XML once lets training, evaluation (COCOeval) and the targets share the COCO
code path. Objects marked ``difficult`` become ``iscrowd=1``: they are left out of the
training targets and COCOeval ignores detections matched to them instead of counting those
as false positives, as VOC's own evaluation does.

VOC boxes are 1-based inclusive pixel indices, so ``xmin=1, xmax=W`` covers the whole image.
Like detectron2 we subtract 1 from ``xmin`` and ``ymin`` only, which gives the box in the
0-based continuous coordinates torchvision uses, with width ``xmax - xmin + 1``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from gid.data.coco import DetectionDataset, coco_from_dict
from gid.errors import GidError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


class VocDetection(DetectionDataset):
    """``root/ImageSets/Main/{split}.txt``, ``root/Annotations/{id}.xml``, ``root/JPEGImages/``.

    ``classes`` gives the class names in label order (default: VOC's 20); category ids and
    labels are both 1..C in that order.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        *,
        classes: Sequence[str] | None = None,
        train: bool,
        hflip_prob: float = 0.5,
    ) -> None:
        root = Path(root)
        classes = list(VOC_CLASSES if classes is None else classes)
        if not classes or len(set(classes)) != len(classes):
            raise GidError(f"data.classes must be a non-empty list of distinct names, got {classes}")
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        data = voc_to_coco(root, _read_split(split_file), classes)
        super().__init__(
            coco_from_dict(data, str(split_file)),
            root / "JPEGImages",
            f"{split_file} and its Annotations/*.xml",
            train=train,
            hflip_prob=hflip_prob,
        )


def _read_split(path: Path) -> list[str]:
    if not path.is_file():
        raise GidError(f"VOC split file not found: {path} (VOC layout: root/ImageSets/Main/<split>.txt)")
    # the first column is the id (per-class lists add a second one)
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def voc_to_coco(root: Path, ids: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """A COCO detection dict for the images ``ids`` of the VOC tree at ``root``."""
    category_ids = {name: i for i, name in enumerate(classes, 1)}
    images, annotations = [], []
    for image_id, voc_id in enumerate(ids, 1):
        xml_path = root / "Annotations" / f"{voc_id}.xml"
        image, objects = _parse_xml(xml_path, root, voc_id)
        images.append({"id": image_id, **image})
        for name, difficult, bbox in objects:
            if name not in category_ids:
                raise GidError(f"{xml_path}: unknown class {name!r}; add it to data.classes (now {list(classes)})")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_ids[name],
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": int(difficult),
                }
            )
    categories = [{"id": cat, "name": name} for name, cat in category_ids.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def _parse_xml(path: Path, root: Path, voc_id: str) -> tuple[dict[str, Any], list[tuple[str, bool, list[float]]]]:
    """The COCO image entry (without id) and ``(class, difficult, xywh box)`` objects of one XML."""
    if not path.is_file():
        raise GidError(f"VOC annotation not found: {path}")
    try:
        tree = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise GidError(f"{path}: not valid XML: {exc}") from None
    file_name = tree.findtext("filename", "").strip() or f"{voc_id}.jpg"
    try:
        width, height = int(tree.findtext("size/width", "")), int(tree.findtext("size/height", ""))
    except ValueError:  # no usable <size>: read it from the image header
        width, height = _image_size(root / "JPEGImages" / file_name)
    objects = []
    for obj in tree.iter("object"):
        name = (obj.findtext("name") or "").strip()
        try:
            x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{k}", "")) for k in ("xmin", "ymin", "xmax", "ymax"))
            difficult = int(obj.findtext("difficult") or 0) == 1
        except ValueError:
            raise GidError(f"{path}: object {name!r} needs numeric bndbox xmin, ymin, xmax, ymax") from None
        objects.append((name, difficult, [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1]))
    return {"file_name": file_name, "width": width, "height": height}, objects


def _image_size(path: Path) -> tuple[int, int]:
    if not path.is_file():
        raise GidError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:  # reads only the header
            return image.size
    except (OSError, UnidentifiedImageError) as exc:
        raise GidError(f"cannot read image {path}: {exc}") from None
