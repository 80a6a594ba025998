"""Detectors in and out of gid: torchvision builders' state dicts in, state dicts and TorchScript out.

``gid model import`` turns the state dict of a torchvision detector (``model.state_dict()`` of
e.g. ``retinanet_resnet50_fpn_v2``) into a gid model file; ``gid model export`` writes a model
file's detector back as such a state dict, or as TorchScript that needs torch and torchvision only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gid.config import Config, ModelConfig, validate
from gid.errors import GidError
from gid.frameworks import FRAMEWORKS, TORCHVISION_BUILDERS
from gid.models.backbones import build_classifier, feature_stages
from gid.models.checkpoint import atomic_save, load_model, load_torch_file, save_model
from gid.models.detectors import (
    build_anchor_generator, build_detector, detector_settings, num_classes_in, uses_frozen_batchnorm,
)
from gid.models.roi_align import with_torchvision_poolers
from gid.models.state_dicts import differences, is_state_dict

EXPORT_FORMATS = ("torchvision", "torchscript")


@dataclass(frozen=True)
class Imported:
    config: Config
    num_classes: int


def check_builder(builder: str) -> tuple[dict[str, Any], int]:
    """The gid model settings of a torchvision builder's architecture and detector (its inference settings
    included) and its input size, or a one-line refusal."""
    if builder not in TORCHVISION_BUILDERS:
        names = ", ".join(TORCHVISION_BUILDERS)
        raise GidError(f"--builder {builder} is not a torchvision builder gid makes; use one of {names}")
    framework, settings = TORCHVISION_BUILDERS[builder]
    model = {"framework": framework.name, "variant": settings.variant, "backbone": settings.backbone,
             "fpn_channels": settings.fpn_channels, "fpn_levels": settings.fpn_levels,
             # the builder's anchors are COCO's at any input size (gid's auto would scale them)
             "anchor_sizes": list(framework.coco_anchor_sizes), "anchor_octaves": settings.anchor_octaves,
             "detector": framework.torchvision_settings(settings)}
    return model, settings.image_size


def import_torchvision(
    weights: Path, builder: str, out: Path, *, num_classes: int | None = None, image_size: int | None = None
) -> Imported:
    """Write the torchvision ``builder``'s state dict in ``weights`` as a gid model file at ``out``.

    The classes are the file's (its classification layer's shape); ``num_classes``, if given, must agree.
    The model file keeps the builder's anchors, BatchNorm, transform and inference settings
    (``model.detector``), so the detector it rebuilds gives the builder's detections. ``image_size``
    (default: the input the builder's COCO weights were trained for) is ``data.image_size``; given,
    the model is fed images of that longest side instead (the builder called with ``min_size`` and
    ``max_size`` both ``image_size``).
    """
    model, builder_image_size = check_builder(builder)
    if image_size is not None:
        model["detector"] |= {"min_size": image_size, "max_size": image_size}
    image_size = builder_image_size if image_size is None else image_size
    if not 32 <= image_size <= 4096:
        raise GidError(f"--image-size {image_size}: give the longest image side in pixels, 32 to 4096")
    if num_classes is not None and num_classes < 2:
        raise GidError(f"--num-classes {num_classes}: count the background too, so at least 2")
    state = _read_detector_state_dict(weights)
    # torchvision's pretrained detectors have FrozenBatchNorm2d, which keeps no num_batches_tracked.
    model["frozen_batchnorm"] = not any(
        key.startswith("backbone.body.") and key.endswith(".num_batches_tracked") for key in state
    )
    # the norm layer the builder passes: FrozenBatchNorm2d (its eps) for pretrained weights, else nn.BatchNorm2d
    model["batchnorm_eps"] = TORCHVISION_BUILDERS[builder][1].frozen_batchnorm_eps if model["frozen_batchnorm"] else 1e-5
    found_classes = _classes_of(state, ModelConfig(**model), image_size)
    # Without class logits (or with another builder's), the comparison says what is amiss.
    classes = found_classes or num_classes or 2
    config = validate(
        {"data": {"image_size": image_size}, "model": {**model, "num_classes": classes}}, source=str(weights)
    )
    mismatch = differences(state, _reference(config, classes))
    if mismatch:
        raise GidError(f"{weights}: not a {builder} state dict: {mismatch}")
    if num_classes is not None and num_classes != classes:
        raise GidError(
            f"{weights}: its classification layer has {classes} classes, not --num-classes {num_classes}; "
            "import it as it is, then fine-tune it to other classes with model.weights"
        )
    save_model(state, config, classes, out)
    return Imported(config, classes)


def _read_detector_state_dict(path: Path) -> dict[str, Tensor]:
    hint = "pass a torchvision detector's state_dict()"
    state = load_torch_file(path, "torchvision state dict", hint)
    if isinstance(state, dict) and "format" in state and "model" in state:
        raise GidError(f"{path}: already a model file (format {state['format']}), not a torchvision state dict")
    if not is_state_dict(state):
        raise GidError(f"{path}: not a state dict (a dict of tensors); {hint}")
    return dict(state)


def _classes_of(state: dict[str, Tensor], model: ModelConfig, image_size: int) -> int | None:
    anchors = build_anchor_generator(model, image_size).num_anchors_per_location()[0]
    return num_classes_in(model.framework, state, anchors)


def _reference(config: Config, num_classes: int) -> dict[str, Tensor]:
    """The keys and shapes of the detector gid builds from ``config``, as meta tensors (no memory, no init)."""
    with torch.device("meta"):
        return build_detector(config.model, config.data.image_size, num_classes).state_dict()


def builder_for(model: ModelConfig, image_size: int | None = None) -> str | None:
    """The torchvision builder whose state dict loads into this architecture, if there is one; of two (the
    MobileNetV3 builders), the one whose settings the model has at input size ``image_size``, if given."""
    if model.builder is not None:
        return None
    framework = FRAMEWORKS[model.framework]
    architecture = (model.variant, model.backbone, model.fpn_channels, framework.levels(model))
    names = [
        name for name, settings in framework.builders.items()
        if (settings.variant, settings.backbone, settings.fpn_channels, settings.fpn_levels) == architecture
    ]
    if image_size is not None:
        ours = framework.torchvision_settings() | detector_settings(model, image_size)
        names = [name for name in names if framework.torchvision_settings(framework.builders[name]) == ours] or names
    return names[0] if names else None


def export_model(model_file: Path, export_format: str, out: Path) -> str:
    """Write a model file's detector as ``export_format`` at ``out``; returns the line telling how to load it."""
    if export_format not in EXPORT_FORMATS:
        raise GidError(f"--format {export_format}: use one of {', '.join(EXPORT_FORMATS)}")
    model, config, num_classes = load_model(model_file)
    if export_format == "torchscript":
        atomic_save(script(model), out, write=save_torchscript)
        return (
            f"wrote {out}: torch.jit.load it where torch and torchvision are installed (torchvision registers "
            "the detection ops); called on a list of [3, H, W] images in 0..1 it returns (losses, detections)"
        )
    atomic_save(model.state_dict(), out)
    differing = settings_to_pass(config)
    passed = ", ".join(f"{name}={value!r}" for name, value in differing.items())
    return f"wrote {out}: {rebuild_hint(config, num_classes)} loads it with strict=True" + (
        f" (gid built it with other settings than torchvision's: pass {passed} for the same input, proposals and "
        "thresholds)" if differing else ""
    )


def settings_to_pass(config: Config) -> dict[str, float]:
    """The detector class's keyword arguments a torchvision call needs to give this model's detections: its
    settings (``model.detector`` resolved, as built) where torchvision's builder of the architecture, or
    the class, has others. Empty for an imported model, which keeps its builder's."""
    if config.model.builder is not None:
        return {}
    framework = FRAMEWORKS[config.model.framework]
    builder = builder_for(config.model, config.data.image_size)
    theirs = framework.torchvision_settings(framework.builders[builder] if builder is not None else None)
    ours = framework.torchvision_settings() | detector_settings(config.model, config.data.image_size)
    return {name: value for name, value in ours.items() if theirs[name] != value}


# torch 2.14 deprecates TorchScript in favour of torch.export, but scripting is what torchvision's
# detectors are built and tested for, and a scripted module runs without any of gid's Python code:
# the two deprecation warnings are silenced where gid calls them, and only there.


def script(model: nn.Module) -> torch.jit.ScriptModule:
    """The detector in eval mode as TorchScript: it runs without gid (or Python code of its own).

    Its box pooler becomes torchvision's again (in place; the same values): the file then holds
    torchvision's modules only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        return torch.jit.script(with_torchvision_poolers(model).eval())


def save_torchscript(module: torch.jit.ScriptModule, file) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.save` is deprecated", category=FutureWarning)
        torch.jit.save(module, file)


def rebuild_hint(config: Config, num_classes: int) -> str:
    """The torchvision call that rebuilds a model file's architecture, for its exported state dict."""
    model = config.model
    if model.builder is not None:
        return f"{model.builder}(num_classes={num_classes}), the function it was built with,"
    builder = builder_for(model, config.data.image_size)
    if builder is not None:
        return f"torchvision.models.detection.{builder}(weights=None, weights_backbone=None, num_classes={num_classes})"
    call = FRAMEWORKS[model.framework].rebuild_call(model, _backbone_call(model), num_classes)
    return f"no torchvision builder makes this architecture; {call}"


def _backbone_call(model: ModelConfig) -> str:
    """A torchvision expression of the backbone + FPN gid builds (names as in ``Framework.rebuild_call``)."""
    frozen = uses_frozen_batchnorm(model)
    classifier = f"{model.backbone}({'norm_layer=FrozenBatchNorm2d' if frozen else ''})"
    if model.backbone.startswith("mobilenet"):
        classifier += ".features"
    layout = FRAMEWORKS[model.framework].fpn_layout(model)
    with torch.device("meta"):  # the stages' names and widths only
        _, chosen = feature_stages(model.backbone, build_classifier(model.backbone, frozen_batchnorm=False), layout)
    return_layers = {stage: str(i) for i, (stage, _) in enumerate(chosen)}
    channels = [c for _, c in chosen]
    if layout.extra == "max_pool":
        extra = "LastLevelMaxPool()"
    else:
        p6_input = channels[-1] if layout.extra == "p6p7_from_c5" else model.fpn_channels
        extra = f"LastLevelP6P7({p6_input}, {model.fpn_channels})"
    if layout.norm is not None:
        extra += f", norm_layer={layout.norm.__name__}"
    return f"BackboneWithFPN({classifier}, {return_layers}, {channels}, {model.fpn_channels}, {extra})"
