"""Model files: weights plus the config that produced them, loaded with ``weights_only=True``.

A model file is a plain dict of tensors and YAML-safe values, so loading never unpickles code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gid.config import Config, validate
from gid.errors import GidError
from gid.models.detectors import build_detector

FORMAT = "gid-model/1"


def atomic_save(obj: Any, path: Path) -> None:
    """Write then rename, so a crash or a full disk never leaves a truncated file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: nn.Module, config: Config, num_classes: int, path: Path, **extra: Any) -> None:
    state = {"format": FORMAT, "config": config.to_dict(), "num_classes": num_classes}
    atomic_save({**state, **extra, "model": model.state_dict()}, path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise GidError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0]
        raise GidError(f"{path}: refusing to load a checkpoint with non-tensor objects ({first})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise GidError(f"{path}: not a readable checkpoint (truncated or not a torch file): {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise GidError(f"{path}: not a gid model file; pass a model.pt written by `gid train` or `gid distill`")
    return state


def load_model(path: Path) -> tuple[nn.Module, Config, int]:
    """Rebuild the detector a model file was trained as, with its weights."""
    state = read_checkpoint(path)
    config = validate(state["config"], source=f"{path} (stored config)")
    model = build_detector(config.model, config.data.image_size, state["num_classes"])
    model.load_state_dict(state["model"])
    return model, config, state["num_classes"]


def load_weights(model: nn.Module, path: Path) -> None:
    """Initialise ``model`` from a model file, e.g. ``model.weights`` in the config."""
    state = read_checkpoint(path)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise GidError(f"{path}: weights do not fit this model ({first}); check framework and backbone") from None
