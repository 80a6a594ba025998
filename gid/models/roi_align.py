"""ROIAlign that back-propagates on every CPU core, and a Faster R-CNN box pooler built on it.

torchvision's CPU ``roi_align`` runs forward and backward on one thread, one sample at a time;
:func:`roi_align_by_matmul` computes the same values as matrix products, which run (and
back-propagate) on every core. :class:`MatmulMultiScaleRoIAlign` is torchvision's
``MultiScaleRoIAlign`` pooling each level that way: gid's detectors use it in place of
torchvision's (it has no parameters, so state dicts are unchanged) and exports get torchvision's
back (:func:`with_torchvision_poolers`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _filter_input, _setup_scales  # the pooler's own input filter and level set-up


class MatmulMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` with the same levels, scales and legacy (unaligned) sampling, each level
    pooled by :func:`fast_roi_align` where a backward on the CPU will follow.

    Without gradients (evaluation, a teacher) it is torchvision's pooler: a model then predicts
    exactly what its TorchScript export does. So it is on a GPU, and where it does not sample 2 x 2 per bin.
    """

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        maps = _filter_input(x, self.featmap_names)
        backward_on_cpu = torch.is_grad_enabled() and any(level.requires_grad and level.is_cpu for level in maps)
        if not backward_on_cpu or self.sampling_ratio != 2 or len(set(self.output_size)) != 1:
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:  # set up as torchvision's first forward does
            self.scales, self.map_levels = _setup_scales(maps, image_shapes, self.canonical_scale, self.canonical_level)
        if len(maps) == 1:  # torchvision pools a single level without its level mapper
            levels = torch.zeros(sum(map(len, boxes)), dtype=torch.int64, device=maps[0].device)
        else:
            levels = self.map_levels(boxes)
        by_level = ByLevel.of(levels, len(maps))
        return pool_by_level(maps, self.scales, by_level, boxes, self.output_size[0], aligned=False)


def with_matmul_poolers(model: nn.Module) -> nn.Module:
    """``model`` with each of torchvision's own ``MultiScaleRoIAlign`` (not a subclass) made a :class:`MatmulMultiScaleRoIAlign`."""
    return _replace_poolers(model, lambda module: type(module) is MultiScaleRoIAlign, MatmulMultiScaleRoIAlign)


def with_torchvision_poolers(model: nn.Module) -> nn.Module:
    """The inverse of :func:`with_matmul_poolers`: a TorchScript export then holds only torchvision's modules."""
    return _replace_poolers(model, lambda module: isinstance(module, MatmulMultiScaleRoIAlign), MultiScaleRoIAlign)


def _replace_poolers(model: nn.Module, chosen: Callable[[nn.Module], bool], kind: type[MultiScaleRoIAlign]) -> nn.Module:
    """Make, in place, every pooler ``chosen`` picks a ``kind`` of the same settings; returns ``model``."""
    for name, pooler in list(model.named_modules()):
        if name and chosen(pooler):
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, kind(
                pooler.featmap_names, pooler.output_size, pooler.sampling_ratio,
                canonical_scale=pooler.canonical_scale, canonical_level=pooler.canonical_level,
            ))
    return model


@dataclass(frozen=True)
class ByLevel:
    """Boxes grouped by the level of the map each is pooled from; found once, used for any maps."""

    order: Tensor  # the boxes' indices level by level, each level's in box order
    counts: list[int]  # boxes per level
    in_order: bool  # whether ``order`` is 0, 1, 2, ...

    @classmethod
    def of(cls, levels: Tensor, num_levels: int) -> ByLevel:
        """Group boxes by ``levels [N]`` (0 to num_levels - 1), with one host synchronisation."""
        order = torch.argsort(levels, stable=True)
        counts = (levels == torch.arange(num_levels, device=levels.device)[:, None]).sum(dim=1)
        in_order = (order[1:] > order[:-1]).all()
        read = torch.cat([counts, in_order[None]]).tolist()  # the shapes and the order, in one host synchronisation
        return cls(order, read[:-1], bool(read[-1]))


def pool_by_level(
    maps: list[Tensor], scales: list[float], by_level: ByLevel, boxes: list[Tensor], roi_size: int, aligned: bool
) -> Tensor:
    """Pool each box from the map of its level in ``by_level``, at that map's scale; rows in box order."""
    image_index = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)])
    rois = torch.cat([image_index, torch.cat(boxes)], dim=1).detach()  # boxes are constants
    per_level = rois[by_level.order].split(by_level.counts)
    pooled = torch.cat([
        fast_roi_align(feature_map, level_rois.to(feature_map.dtype), roi_size, scale, aligned)
        for feature_map, scale, level_rois in zip(maps, scales, per_level)
    ])
    # Rows come out level by level; put them back in box order. They often already are (all boxes on
    # one level): then the gather, and its backward, would only copy every pooled feature.
    return pooled if by_level.in_order else pooled[torch.argsort(by_level.order)]


#: Largest map (H * W) on which roi_align_by_matmul is the faster one on CPU: its cost grows with
#: the map's area, torchvision's does not. Forward + backward of 80 RoIs x 256 channels on one
#: thread: 10-20 ms against 115 ms on a 16 x 16 map, about 0.12 s each on 48 x 48.
_MATMUL_ROI_ALIGN_MAX_AREA = 48 * 48


def fast_roi_align(feature_map: Tensor, rois: Tensor, roi_size: int, spatial_scale: float, aligned: bool = True) -> Tensor:
    """ROIAlign with sampling ratio 2 (aligned: spec §3), by whichever implementation is faster here.

    torchvision's CPU kernel runs forward and backward on one thread, one sample at a time, and its
    backward dominates the cost of the feature and relation losses; on CUDA it is fast.
    """
    height, width = feature_map.shape[-2:]
    if feature_map.device.type == "cpu" and height * width <= _MATMUL_ROI_ALIGN_MAX_AREA:
        return roi_align_by_matmul(feature_map, rois, roi_size, spatial_scale, aligned)
    return roi_align(feature_map, rois, roi_size, spatial_scale=spatial_scale, sampling_ratio=2, aligned=aligned)


def roi_align_by_matmul(
    feature_map: Tensor, rois: Tensor, roi_size: int, spatial_scale: float, aligned: bool = True
) -> Tensor:
    """``torchvision.ops.roi_align(..., sampling_ratio=2, aligned=aligned)`` as two matrix products.

    ``rois [N, 5]`` are (image index, x1, y1, x2, y2) -> ``[N, C, roi_size, roi_size]``. Bilinear
    sampling is separable: bin (i, j) averages its 2 x 2 samples of w_y(row) * w_x(column) * F, so a
    RoI's pooled map is Wy @ F @ Wx^T, where row i of Wy [roi_size, H] holds the row weights of
    bin row i's two samples, halved (and Wx likewise). The sample positions and roi_align's
    boundary rules are reproduced exactly; only the order of the sums differs. Matrix products
    run, and back-propagate, on all cores; the work grows with H * W.
    """
    num_images, channels, height, width = feature_map.shape
    image_index = rois[:, 0].long()
    # aligned: pixel centres at integers; otherwise roi_align's legacy rule, RoIs at least a pixel wide and high
    x1, y1, x2, y2 = (rois[:, 1:] * spatial_scale - (0.5 if aligned else 0.0)).unbind(dim=1)
    if not aligned:
        x2, y2 = torch.maximum(x2, x1 + 1), torch.maximum(y2, y1 + 1)
    weights_y = _bin_weights(y1, y2, roi_size, height).to(feature_map.dtype)  # [N, roi_size, H]
    weights_x = _bin_weights(x1, x2, roi_size, width).to(feature_map.dtype)  # [N, roi_size, W]

    # Rows first, one product per image for all its RoIs: their Wy are stacked into zero-padded slots.
    slot, num_slots = _rank_within_image(image_index, num_images)
    stacked = weights_y.new_zeros(num_images, num_slots, roi_size, height)
    stacked[image_index, slot] = weights_y
    rows_of_image = feature_map.transpose(1, 2).reshape(num_images, height, channels * width)
    rows = stacked.view(num_images, num_slots * roi_size, height) @ rows_of_image
    rows = rows.view(num_images, num_slots, roi_size * channels, width)[image_index, slot]
    pooled = rows @ weights_x.transpose(1, 2)  # [N, roi_size * C, roi_size]
    return pooled.view(-1, roi_size, channels, roi_size).transpose(1, 2)


def _bin_weights(start: Tensor, end: Tensor, bins: int, length: int) -> Tensor:
    """``[N, bins, length]``: along one axis, each bin's weight on each pixel, as roi_align samples.

    Two samples per bin, at roi_align's positions computed as its CPU kernel does, so that its
    boundary decisions come out the same: a sample beyond one pixel outside the map adds nothing,
    one in [-1, 0] reads pixel 0, one past the last pixel centre reads the last pixel.
    """
    bin_size = ((end - start) / bins)[:, None, None]
    bin_index = torch.arange(bins, dtype=start.dtype, device=start.device)[:, None]
    first = start[:, None, None] + bin_index * bin_size
    offsets = torch.tensor([0.5, 1.5], dtype=start.dtype, device=start.device)
    samples = first + offsets * bin_size / 2  # [N, bins, 2]
    inside = (samples >= -1) & (samples <= length)  # False for NaN too
    samples = torch.where(inside, samples, 0).clamp(min=0, max=length - 1)
    low = samples.floor()
    high_weight = samples - low
    low = low.long()
    high = (low + 1).clamp(max=length - 1)
    zero = samples.new_zeros(())
    weights = samples.new_zeros(*samples.shape[:2], length)
    weights.scatter_add_(2, low, torch.where(inside, (1 - high_weight) / 2, zero))
    weights.scatter_add_(2, high, torch.where(inside, high_weight / 2, zero))
    return weights


def _rank_within_image(image_index: Tensor, num_images: int) -> tuple[Tensor, int]:
    """Each RoI's rank among the RoIs of its image, and the largest count of RoIs in one image."""
    one_hot = F.one_hot(image_index, num_images)
    rank = (one_hot.cumsum(dim=0) - 1).gather(1, image_index[:, None]).squeeze(1)
    return rank, int(one_hot.sum(dim=0).max())
