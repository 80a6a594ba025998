"""Pooling the general instances' features: ROIAlign at the FPN level each box belongs to (spec §3).

Each level is pooled by ``gid.models.roi_align.fast_roi_align``, whose backward runs on every CPU core.
"""

from __future__ import annotations

from torch import Tensor
from torchvision.ops.poolers import LevelMapper

from gid.models.roi_align import pool_by_level


def pool_instances(
    maps: list[Tensor],
    first_level: int,
    boxes: list[Tensor],
    roi_size: int,
    canonical_size: float,
    canonical_level: int = 4,
) -> Tensor:
    """Pool every box from the one FPN level the FPN rule assigns it -> ``[N, C, roi_size, roi_size]``.

    level = clamp(floor(k0 + log2(sqrt(w * h) / canonical_size)), first_level, last_level), k0 =
    ``canonical_level``; aligned ROIAlign with sampling ratio 2 at that level's stride. Rows follow
    the boxes: image by image, in each image's order.
    """
    last_level = first_level + len(maps) - 1
    levels = LevelMapper(first_level, last_level, canonical_size, canonical_level)(boxes)
    scales = [2.0 ** -(first_level + offset) for offset in range(len(maps))]
    return pool_by_level(maps, scales, levels, boxes, roi_size, aligned=True)
