"""Model files: weights plus the config that produced them, loaded with ``weights_only=True``.

A model file is a plain dict of tensors and YAML-safe values, so loading never unpickles code.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gid.config import Config, validate
from gid.errors import GidError
from gid.models.backbones import classifier_body_weights, classifier_reference, without_classifier_head
from gid.models.detectors import build_detector, class_layer_keys
from gid.models.state_dicts import differences, is_state_dict

logger = logging.getLogger(__name__)

# 2: ResNet backbones under torchvision's names (backbone.body.layer1...), torchvision's variants.
FORMAT = "gid-model/2"
_FORMERLY = {
    "gid-model/1": "its backbone is laid out as no torchvision detector is (backbone.body.0 ...) and cannot be rebuilt",
}


def atomic_save(obj: Any, path: Path, write: Callable[[Any, Any], None] = torch.save) -> None:
    """Write then rename, so a crash or a full disk never leaves a truncated file behind.

    A write the disk refuses (full, over quota, no permission) is a one-line GidError; the file
    that was at ``path`` before, e.g. the previous checkpoint, is left as it was.
    """
    path = Path(path)
    try:
        _write_then_rename(obj, path, write)
    except (OSError, RuntimeError) as exc:
        reason = _write_failure(exc)
        if reason is None:
            raise
        raise GidError(
            f"could not write {path} ({reason}); free disk space or fix the folder's permissions and run again "
            f"(the previous {path.name}, if any, is intact)"
        ) from None


def _write_then_rename(obj: Any, path: Path, write: Callable[[Any, Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_failure(exc: BaseException) -> str | None:
    """Why the disk refused a write, or None for other errors (e.g. an object that cannot be saved)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    # torch's zip writer reports a short write (what a disk filling up mid-file gives) as a position mismatch.
    if "unexpected pos" in str(exc):
        return "the write stopped short: the disk is full or a file size limit was reached"
    return None


def save_model(
    model: nn.Module | Mapping[str, torch.Tensor],
    config: Config,
    num_classes: int,
    path: Path,
    *,
    epoch: int | None = None,
    metrics: dict[str, Any] | None = None,
    training_state: dict[str, Any] | None = None,
    class_names: list[str] | None = None,
) -> None:
    """Write a model file: a detector's weights (the module or its state dict) and the config behind them.

    The one writer of the format. A training checkpoint is a model file plus ``training_state``
    (optimizer, LR schedule, AMP scaler, GID adapter), which exported model files leave out.
    ``class_names``: what each label means, label ``i`` being ``class_names[i - 1]`` (0 is the background), as the
    data set it was trained on names them.
    """
    weights = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    state: dict[str, Any] = {"format": FORMAT, "config": config.to_dict(), "num_classes": num_classes, "model": weights}
    if epoch is not None:
        state["epoch"] = epoch
    if metrics is not None:
        state["metrics"] = metrics
    if class_names is not None:
        state["class_names"] = list(class_names)
    atomic_save({**state, **(training_state or {})}, path)


def load_torch_file(path: Path, kind: str, hint: str) -> Any:
    """``torch.load(weights_only=True)``, every way the file can be bad a one-line GidError naming ``kind``."""
    path = Path(path)
    if not path.is_file():
        raise GidError(f"{kind} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = _blocked_object(exc)
        raise GidError(f"{path}: refusing to load a {kind} with non-tensor objects ({blocked}); {hint}") from None
    except (RuntimeError, EOFError, OSError) as exc:
        first_sentence = str(exc).strip().split(". ")[0]
        raise GidError(f"{path}: not a readable {kind} (truncated or not a torch file): {first_sentence}") from None


def read_checkpoint(path: Path) -> dict[str, Any]:
    state = load_torch_file(path, "checkpoint", "pass a model file written by `gid train` or `gid distill`")
    held = state.get("format") if isinstance(state, dict) else None
    if held in _FORMERLY:
        raise GidError(
            f"{path}: a model file of an earlier gid ({held}): {_FORMERLY[held]}; train it again with this gid "
            "(to resume a run from such a checkpoint, start it under a new run.name)"
        )
    if held != FORMAT:
        raise GidError(f"{path}: not a gid model file; pass a model.pt written by `gid train` or `gid distill`")
    return state


def _blocked_object(exc: pickle.UnpicklingError) -> str:
    """The line of torch's refusal that names what the file tried to load (e.g. ``posix.system``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line.rstrip(".") for line in lines if "GLOBAL" in line), lines[0] if lines else "unpickling refused")


def stored_metrics(path: Path | None) -> dict[str, Any]:
    """The last epoch's metrics a model file records (files `gid train` and `gid distill` write do; imported ones
    don't): empty when there are none or the file cannot be read."""
    if path is None:
        return {}
    try:
        return read_checkpoint(path).get("metrics", {})
    except GidError:
        return {}


def stored_val_ap(path: Path | None) -> float | None:
    """The validation AP a model file records, if it records one."""
    return stored_metrics(path).get("val_ap")


def load_model(path: Path) -> tuple[nn.Module, Config, int]:
    """Rebuild the detector a model file was trained as, with its weights."""
    return model_from_state(read_checkpoint(path), path)


def model_from_state(state: dict[str, Any], path: Path) -> tuple[nn.Module, Config, int]:
    """The detector of a model file already read (``read_checkpoint``), with its weights."""
    config = validate(state["config"], source=f"{path} (stored config)")
    model = build_detector(config.model, config.data.image_size, state["num_classes"])
    # e.g. a Faster R-CNN on MobileNetV3 of an earlier gid, whose FPN had five levels where torchvision's has three
    hint = "it was written by an earlier gid for an architecture this one builds differently: train it again"
    _load_weights_of(model, state, path, "the architecture its own config describes", hint)
    return model, config, state["num_classes"]


def load_weights(model: nn.Module, path: Path, framework: str, num_classes: int) -> None:
    """Initialise ``model``, a ``framework`` detector of ``num_classes``, from a model file (``model.weights``).

    A file made for another class count gives everything but the class-dependent layers, which
    keep the model's own (torchvision's) initialisation: fine-tuning to new classes.
    """
    state = read_checkpoint(path)
    own = model.state_dict()
    fresh = class_layer_keys(framework, own) if state["num_classes"] != num_classes else []
    weights = {key: value for key, value in state["model"].items() if key not in fresh}
    weights |= {key: own[key] for key in fresh}
    hint = "check model.framework, model.backbone, model.variant and model.fpn_channels"
    _load_weights_of(model, {**state, "model": weights}, path, "this model", hint)
    if fresh:
        layers = sorted({key.rsplit(".", 1)[0] for key in fresh})
        logger.info(
            "model.weights %s holds %d classes, this model %d: loaded everything except %s, re-initialised",
            path, state["num_classes"], num_classes, ", ".join(layers),
        )


def _load_weights_of(model: nn.Module, state: dict[str, Any], path: Path, target: str, hint: str) -> None:
    """Load a model file's weights into ``model``; what does not fit is one line naming what the file holds."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        first = first if len(first) <= 200 else first[:200] + "..."  # torch lists every key
        held = state["config"]["model"]
        raise GidError(
            f"{path}: weights do not fit {target} (the file holds a {held['framework']} {held['backbone']} "
            f"{held['variant']} with {held['fpn_channels']} FPN channels: {first}); {hint}"
        ) from None


def load_backbone_weights(model: nn.Module, path: Path, backbone: str) -> None:
    """Initialise the backbone body from a torchvision ImageNet classifier state dict (``model.backbone_weights``).

    The file's classification layers are not used, so a classifier trained for other classes does as well.
    """
    hint = f"pass the state dict of a torchvision.models.{backbone}"
    state = load_torch_file(path, "backbone weights file", hint)
    if not is_state_dict(state):
        raise GidError(f"model.backbone_weights {path}: not a state dict (a dict of tensors); {hint}")
    # FrozenBatchNorm2d has no num_batches_tracked; either kind of BatchNorm loads without it.
    body = without_classifier_head(backbone, state)
    found = differences(body, classifier_reference(backbone), ignore_suffix="num_batches_tracked")
    if found:
        raise GidError(f"model.backbone_weights {path}: not torchvision's {backbone} classifier weights: {found}")
    model.backbone.body.load_state_dict(classifier_body_weights(backbone, state))
