"""The detector frameworks gid distils, one module each, and the registry the rest of gid looks them up in.

A framework module (``retinanet``, ``fcos``, ``faster_rcnn``) holds everything gid knows of its
framework: FPN layout, anchor rules, heads, torchvision builders, class layers and the
DetectorView; it defines one ``FRAMEWORK``. Adding a framework is one module and one entry
below (docs/frameworks.md).
"""

from __future__ import annotations

from torch import nn

from gid.frameworks import faster_rcnn, fcos, retinanet
from gid.frameworks.base import COCO_IMAGE_SIZE, Framework, TorchvisionBuilder
from gid.frameworks.view import DetectorView

#: By ``model.framework``; the order is the one messages list them in.
FRAMEWORKS: dict[str, Framework] = {module.FRAMEWORK.name: module.FRAMEWORK for module in (retinanet, fcos, faster_rcnn)}

#: Every torchvision builder gid builds exactly, by name: its framework and settings.
TORCHVISION_BUILDERS: dict[str, tuple[Framework, TorchvisionBuilder]] = {
    name: (framework, builder) for framework in FRAMEWORKS.values() for name, builder in framework.builders.items()
}


def view_for(model: nn.Module) -> DetectorView:
    """The view of a torchvision detector of one of the frameworks (not wrapped in DDP)."""
    for framework in FRAMEWORKS.values():
        if isinstance(model, framework.detector):
            return framework.view(model)
    *others, last = [framework.detector.__name__ for framework in FRAMEWORKS.values()]
    raise TypeError(
        f"no DetectorView for {type(model).__name__}: expected a torchvision {', '.join(others)} or {last} "
        "(unwrap DistributedDataParallel with .module)"
    )


__all__ = ["COCO_IMAGE_SIZE", "FRAMEWORKS", "TORCHVISION_BUILDERS", "DetectorView", "Framework", "view_for"]
