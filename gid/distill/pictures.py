"""Pictures of what GISM picks: GIs (teacher- vs student-chosen) and ground truth on an image."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision.models.detection.transform import resize_boxes
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import draw_bounding_boxes

from gid.distill.distiller import Distiller

TEACHER_COLOUR, STUDENT_COLOUR, GROUND_TRUTH_COLOUR = "orange", "deepskyblue", "lime"


def draw_general_instances(image: Tensor, gi_boxes: Tensor, from_teacher: Tensor, gt_boxes: Tensor) -> Tensor:
    """``image`` [3,H,W] in [0,1] with boxes in its own pixel frame -> uint8 [3,H,W] picture."""
    picture = (image.clamp(0, 1) * 255).to(torch.uint8)
    colours = [TEACHER_COLOUR if t else STUDENT_COLOUR for t in from_teacher.tolist()]
    picture = draw_bounding_boxes(picture, gt_boxes, colors=GROUND_TRUTH_COLOUR, width=1)
    return draw_bounding_boxes(picture, gi_boxes, colors=colours, width=1)


@torch.no_grad()
def save_gi_pictures(distiller: Distiller, dataset, out_dir: Path, count: int = 4) -> list[Path]:
    """Run GISM on the first ``count`` images of ``dataset`` and save one PNG each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = distiller.training
    distiller.eval()
    device = next(distiller.student.parameters()).device
    paths = []
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        (gis,) = distiller.general_instances([image.to(device)], [{k: v.to(device) if torch.is_tensor(v) else v for k, v in target.items()}])
        # GIs live in the detector's resized input frame; draw them on the original image.
        resized = distiller.student.transform.resize(image, None)[0].shape[-2:]
        boxes = resize_boxes(gis.boxes.cpu(), list(resized), list(image.shape[-2:]))
        picture = draw_general_instances(image, boxes, gis.from_teacher.cpu(), target["boxes"])
        path = out_dir / f"gi_{int(target['image_id'])}.png"
        to_pil_image(picture).save(path)
        paths.append(path)
    distiller.train(was_training)
    return paths

