"""Names a user types (sweep names, ``gid export --sweep``, registered model names) and how they reach MLflow.

A sweep name is also a folder, a Ray Tune experiment, an Optuna study and part of a SQLite URL, so it
is held to characters that are safe in all of them and refused with one line otherwise. A registered
model name is part of a model URI (``models:/NAME@champion``), where ``/``, ``:`` and ``@`` have meanings.
"""

from __future__ import annotations

import re

_SWEEP_NAME = re.compile(r"[^\W_][\w .,'+=@-]*")
SWEEP_NAME_RULE = "letters, digits, spaces and _ . , ' + = @ -, starting with a letter or digit"
_MODEL_NAME = re.compile(r"[^\W_][\w.-]*")
MODEL_NAME_RULE = "letters, digits and _ . -, starting with a letter or digit"


def check_sweep_name(name: str) -> str:
    if not _SWEEP_NAME.fullmatch(name) or name != name.strip():
        raise ValueError(f"{name!r} is not a usable sweep name; use {SWEEP_NAME_RULE}")
    return name


def check_model_name(name: str) -> str:
    if not _MODEL_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a usable registered model name; use {MODEL_NAME_RULE}")
    return name


def quoted(value: str) -> str:
    """``value`` as a string literal of an MLflow filter (which has no escapes: pick the other quote)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value} holds both quote characters (' and \"), which MLflow's search cannot match; drop one")
