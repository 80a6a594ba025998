"""Pooling the general instances' features: ROIAlign at the FPN level each box belongs to (spec §3).

Each level is pooled by ``gid.models.roi_align.fast_roi_align``, whose backward runs on every CPU core.
"""

from __future__ import annotations

from torch import Tensor
from torchvision.ops.poolers import LevelMapper

from gid.models.roi_align import ByLevel, pool_by_level


class InstancePooler:
    """Pools ``boxes`` from any model's FPN maps, each box from the one level the FPN rule assigns it.

    level = clamp(floor(k0 + log2(sqrt(w * h) / canonical_size)), first_level, first_level +
    num_levels - 1), k0 = ``canonical_level``; aligned ROIAlign with sampling ratio 2 at that level's
    stride. The levels are found once (one host synchronisation) for every model pooled.
    """

    def __init__(
        self,
        boxes: list[Tensor],
        first_level: int,
        num_levels: int,
        roi_size: int,
        canonical_size: float,
        canonical_level: int = 4,
    ):
        self.boxes, self.roi_size = boxes, roi_size
        levels = LevelMapper(first_level, first_level + num_levels - 1, canonical_size, canonical_level)(boxes)
        self.by_level = ByLevel.of(levels, num_levels)
        self.scales = [2.0 ** -(first_level + offset) for offset in range(num_levels)]

    def __call__(self, maps: list[Tensor]) -> Tensor:
        """``maps`` (one per level, finest first) pooled at every box -> ``[N, C, roi_size, roi_size]``,
        rows following the boxes: image by image, in each image's order."""
        return pool_by_level(maps, self.scales, self.by_level, self.boxes, self.roi_size, aligned=True)


def pool_instances(
    maps: list[Tensor],
    first_level: int,
    boxes: list[Tensor],
    roi_size: int,
    canonical_size: float,
    canonical_level: int = 4,
) -> Tensor:
    """``maps`` pooled at every box by an :class:`InstancePooler` -> ``[N, C, roi_size, roi_size]``."""
    return InstancePooler(boxes, first_level, len(maps), roi_size, canonical_size, canonical_level)(maps)
