"""What a framework module defines: the facts and rules of one torchvision detector framework.

A :class:`Framework` says how gid builds the framework's detector (FPN layout, anchors, heads),
which torchvision builders it reproduces, which layers depend on the classes and which
:class:`~gid.frameworks.view.DetectorView` reads it. The rest of gid looks a framework up in
``gid.frameworks.FRAMEWORKS`` instead of branching on its name (docs/frameworks.md).
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN

if TYPE_CHECKING:
    from gid.config import ModelConfig
    from gid.frameworks.view import DetectorView

#: Input size torchvision's detectors see COCO at; COCO-scale pixel constants ("auto" values) scale from it.
COCO_IMAGE_SIZE = 800

#: The levels above the last stage: P6/P7 from P5 or from C5, or a max-pooled P6.
ExtraLevels = Literal["p6p7_from_p5", "p6p7_from_c5", "max_pool"]

#: Which backbone outputs an FPN reads (``model.fpn_levels``), named after torchvision's two extractors:
#: ``resnet`` one per stride, as ``_resnet_fpn_extractor`` (any backbone); ``mobilenet`` the last stage's
#: first and last block, as ``_mobilenet_extractor`` (MobileNets only).
FpnLevels = Literal["resnet", "mobilenet"]


@dataclass(frozen=True)
class Stage:
    """A backbone output the FPN reads: the last block of that output stride or, with ``first``, the first.

    A ResNet has one block (``layerN``) per stride; torchvision's MobileNet FPN reads where its last
    stage starts as well as where it ends.
    """

    stride: int
    first: bool = False


def stages(*strides: int) -> tuple[Stage, ...]:
    return tuple(Stage(stride) for stride in strides)


@dataclass(frozen=True)
class FpnLayout:
    """The backbone outputs an FPN reads, finest first, and the levels it adds above them."""

    stages: tuple[Stage, ...]
    extra: ExtraLevels
    norm: type[nn.Module] | None = None  # the FPN's normalisation (Faster R-CNN v2: BatchNorm)

    @property
    def strides(self) -> tuple[int, ...]:
        """Output stride of every FPN level: the stages', then the extra levels' (x2 each)."""
        added = 1 if self.extra == "max_pool" else 2
        last = self.stages[-1].stride
        return tuple(stage.stride for stage in self.stages) + tuple(last * 2 ** (i + 1) for i in range(added))


@dataclass(frozen=True)
class TorchvisionBuilder:
    """A builder of ``torchvision.models.detection`` whose module tree gid builds with these settings."""

    variant: str
    backbone: str = "resnet50"
    image_size: int = COCO_IMAGE_SIZE  # the input its COCO weights were trained for: `gid model import`'s default
    fpn_channels: int = 256  # torchvision's FPN width
    fpn_levels: FpnLevels = "resnet"
    # the detector class's keyword arguments the builder passes (model.detector), over the class's defaults
    settings: Mapping[str, float] = field(default_factory=dict)
    # its FrozenBatchNorm2d's eps (a file without num_batches_tracked): 0.0 where torchvision's builder overwrites
    # it for the only weights it publishes (COCO_V1), else the class's 1e-5
    frozen_batchnorm_eps: float = 1e-5
    # RetinaNet's octave anchor sizes (model.anchor_octaves): torchvision's builders round them down
    anchor_octaves: str = "exact"


class Framework(abc.ABC):
    """One detector framework. A subclass sets the attributes and implements the rules that differ."""

    name: str  # model.framework
    detector: type[nn.Module]  # torchvision's class; a model.builder must return one
    view: type[DetectorView]
    variants: tuple[str, ...]  # torchvision's architecture variants (model.variant)
    default_variant: str
    builders: dict[str, TorchvisionBuilder]  # by torchvision builder name
    coco_anchor_sizes: tuple[float, ...]  # per FPN level at COCO_IMAGE_SIZE (model.anchor_sizes: auto)
    class_layers: tuple[str, ...]  # layers shaped by the class count: fine-tuning to other classes starts them afresh
    class_logits: str  # the weight whose first dimension counts the classes
    fpn_levels: tuple[FpnLevels, ...] = ("resnet",)  # the model.fpn_levels it builds
    settings: tuple[str, ...]  # the detector class's keyword arguments model.detector sets, besides min/max_size
    gid_settings: Mapping[str, float] = {}  # gid's values where they are not the class's defaults (model.detector: auto)
    anchor_octaves: bool = False  # several octave sizes per anchor location (model.anchor_octaves)

    def torchvision_settings(self, builder: TorchvisionBuilder | None = None) -> dict[str, float]:
        """The transform sizes and ``settings`` torchvision's ``builder`` (None: the class) gives the detector."""
        parameters = inspect.signature(self.detector.__init__).parameters
        defaults = {name: parameters[name].default for name in ("min_size", "max_size", *self.settings)}
        return {**defaults, **(builder.settings if builder is not None else {})}

    def levels(self, model: ModelConfig) -> FpnLevels:
        """``model.fpn_levels``; ``auto``: those of torchvision's builder of the framework on the backbone, if
        there is one, else the ResNets' (so that any ResNet teacher distils into it)."""
        if model.fpn_levels != "auto":
            return model.fpn_levels
        on_backbone = [builder.fpn_levels for builder in self.builders.values() if builder.backbone == model.backbone]
        return on_backbone[0] if on_backbone else "resnet"

    @abc.abstractmethod
    def layout(self, levels: FpnLevels, variant: str) -> FpnLayout:
        """The FPN of ``model.fpn_levels`` ``levels`` (one of ``fpn_levels``) in the variant."""
        raise NotImplementedError

    def fpn_layout(self, model: ModelConfig) -> FpnLayout:
        return self.layout(self.levels(model), model.variant)

    def levels_with_strides(self, strides: tuple[int, ...]) -> FpnLevels | None:
        """The ``model.fpn_levels`` whose FPN levels have these strides (a teacher's), if one has."""
        # strides do not depend on the variant
        return next((lv for lv in self.fpn_levels if self.layout(lv, self.default_variant).strides == strides), None)

    def anchor_sizes(self, model: ModelConfig, scale: float) -> list[float]:
        """``model.anchor_sizes: auto``: COCO's sizes times ``scale`` (input size / COCO's).

        Scaled sizes are kept at least twice their level's stride: strides do not shrink with the
        input, and anchors much smaller than their stride tile the image too sparsely to match the
        ground truth (at 128 px, unfloored, only a quarter of the synthetic boxes had an anchor at
        IoU >= 0.5; floored, two thirds to all of them). At COCO scale they are torchvision's.
        """
        strides = self.fpn_layout(model).strides
        return [max(size * scale, 2.0 * stride) for size, stride in zip(self.coco_anchor_sizes, strides)]

    @abc.abstractmethod
    def anchor_generator(self, model: ModelConfig, sizes: list[float]) -> AnchorGenerator:
        raise NotImplementedError

    @abc.abstractmethod
    def build(
        self, model: ModelConfig, backbone: BackboneWithFPN, anchors: AnchorGenerator, num_classes: int, **settings
    ) -> nn.Module:
        """The detector on ``backbone`` with ``anchors``; ``settings`` are the class's keyword arguments
        (``model.detector`` resolved: the transform sizes, and those of ``settings`` that are set)."""
        raise NotImplementedError

    def num_classes_in(self, logits: Tensor, anchors_per_location: int) -> int:
        """The class count (background included) of the ``class_logits`` weight."""
        return logits.shape[0]

    @abc.abstractmethod
    def rebuild_call(self, model: ModelConfig, backbone: str, num_classes: int) -> str:
        """The torchvision constructor call, around the ``backbone`` expression, that builds gid's module tree.

        Its names come from ``torchvision.models``, ``torchvision.models.detection`` (and its
        ``anchor_utils``, ``backbone_utils``, ``retinanet``, ``rpn`` and ``faster_rcnn`` modules),
        ``torchvision.ops`` and ``torchvision.ops.misc``, ``torch.nn`` and ``functools``.
        """
        raise NotImplementedError

    def anchors_per_location(self, model: ModelConfig) -> int:
        return self.anchor_generator(model, list(self.coco_anchor_sizes)).num_anchors_per_location()[0]
