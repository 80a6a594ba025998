"""Pooling the general instances' features: ROIAlign at the FPN level each box belongs to (spec §3).

Each level is pooled by ``gid.models.roi_align.fast_roi_align``, whose backward runs on every CPU core.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
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
        self.bins = sum(map(len, boxes)) * roi_size**2
        levels = LevelMapper(first_level, first_level + num_levels - 1, canonical_size, canonical_level)(boxes)
        self.by_level = ByLevel.of(levels, num_levels)
        self.scales = [2.0 ** -(first_level + offset) for offset in range(num_levels)]

    def __call__(self, maps: list[Tensor]) -> Tensor:
        """``maps`` (one per level, finest first) pooled at every box -> ``[N, C, roi_size, roi_size]``,
        rows following the boxes: image by image, in each image's order."""
        return pool_by_level(maps, self.scales, self.by_level, self.boxes, self.roi_size, aligned=True)


def pool_adapted(pool: InstancePooler, adapter: nn.Module, maps: list[Tensor]) -> Tensor:
    """``pool([adapter(level) for level in maps])``: the student's maps, adapted, pooled at the boxes, in the
    cheaper order (:func:`pools_first`)."""
    if isinstance(adapter, nn.Identity):
        return pool(maps)
    if pools_first(pool, adapter, maps):
        return adapt_pooled(pool, adapter, maps)
    return pool([adapter(level) for level in maps])


def adapt_pooled(pool: InstancePooler, conv: nn.Conv2d, maps: list[Tensor]) -> Tensor:
    """``pool([conv(level) for level in maps])`` for a square convolution that keeps the map's size, computed
    on the pooled bins.

    Convolution and ROIAlign are both linear (a bin is a weighted sum of map positions), so a k x k
    convolution's output pooled is its weights applied to its input's k^2 shifted copies pooled at the
    same bins. Where the bins are far fewer than the maps' positions (large images: at 800 px Faster
    R-CNN's stride-4 level has 67k positions per image, 10 GIs 1,000 bins) that order costs a fraction
    of the time and memory of adapting whole maps. The bias passes whole: GI boxes lie inside their
    image, so every ROIAlign sample falls inside the map.
    """
    size, padding = conv.kernel_size[0], conv.padding[0]
    padded = [F.pad(level, (padding,) * 4) for level in maps]
    shifted = torch.stack([
        pool([level[..., dy : dy + original.shape[-2], dx : dx + original.shape[-1]] for level, original in zip(padded, maps)])
        for dy in range(size) for dx in range(size)
    ], dim=2)  # [N, C_in, k * k, roi, roi], the shifts in the order of the weight's k x k taps
    adapted = torch.einsum("nckij,ock->noij", shifted, conv.weight.flatten(2))
    return adapted if conv.bias is None else adapted + conv.bias[:, None, None]


def pools_first(pool: InstancePooler, adapter: nn.Module, maps: list[Tensor]) -> bool:
    """Whether :func:`pool_adapted` adapts the pooled bins (:func:`adapt_pooled`): for a square convolution that
    keeps the map's size, when the bins are fewer than half the maps' positions. Either order multiplies every
    input channel's k^2 taps into every output channel, once per bin or once per position; the margin pays
    for pooling k^2 shifted copies of the narrow input instead of one adapted map."""
    if not isinstance(adapter, nn.Conv2d):
        return False
    size = adapter.kernel_size[0]
    keeps_size = adapter.kernel_size == (size, size) and adapter.padding == (size // 2, size // 2)
    plain = adapter.stride == (1, 1) and adapter.dilation == (1, 1) and adapter.groups == 1
    if not (keeps_size and plain and adapter.padding_mode == "zeros"):
        return False
    positions = sum(level.shape[0] * level.shape[-2] * level.shape[-1] for level in maps)
    return 2 * pool.bins < positions


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
