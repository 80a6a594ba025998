"""gid's metric names as MLflow keys: in sections (``eval/ap``, ``loss/feature``, ``weighting/weight_response``),
which MLflow's UI shows as groups of charts. The UI sorts its sections by name and opens on the first, so the
names are chosen for that order: ``eval`` (AP), ``loss``, then ``model``, ``run``, ``selection`` (GISM) and
``weighting`` (the balance), which a trial's page used to lead with (``balance_calibrations`` sorted first).

Only MLflow's keys have sections: Ray Tune, the terminal, model files, result.json, the sweep file's
``objective.metric`` and ``gid export --metric`` keep gid's own names (``val_ap``). A sweep logged before
sections had flat keys (``val_ap``): :func:`gid_metrics` leaves a key with no known section as it is, so such a
sweep reads back, exports and resumes as before.
"""

from __future__ import annotations

from collections.abc import Mapping

# Names with a key of their own, then prefixes in the order they are tried; each prefix is replaced by its section.
_NAMED = {
    "loss": "loss/total",
    "teacher_val_ap": "eval/teacher_ap",
    "memory_peak_mb": "run/memory_peak_mb",
    "params": "model/params",
    "latency_ms": "model/latency_ms",
}
_PREFIXES = (("val_", "eval/"), ("loss_", "loss/"), ("gism_", "selection/"), ("balance_", "weighting/"))
_TIME = "run/"  # durations (``*_s``) and moments (``*_at``) keep their whole name: run/epoch_time_s
_FROM_NAMED = {key: name for name, key in _NAMED.items()}


def mlflow_key(name: str) -> str:
    """The MLflow key of gid's metric ``name`` (``val_ap`` -> ``eval/ap``); a name of no section is its own key."""
    if name in _NAMED:
        return _NAMED[name]
    for prefix, section in _PREFIXES:
        if name.startswith(prefix):
            return section + name.removeprefix(prefix)
    if name.endswith(("_s", "_at")):
        return _TIME + name
    return name


def gid_name(key: str) -> str:
    """gid's name of the MLflow key ``key``: the inverse of :func:`mlflow_key`, and a flat key (an older sweep's)
    unchanged."""
    if key in _FROM_NAMED:
        return _FROM_NAMED[key]
    if key.startswith(_TIME):
        return key.removeprefix(_TIME)
    for prefix, section in _PREFIXES:
        if key.startswith(section):
            return prefix + key.removeprefix(section)
    return key


def mlflow_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    return {mlflow_key(name): value for name, value in metrics.items()}


def gid_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's MLflow metrics under gid's names (what export, the registry and the summary rank by)."""
    return {gid_name(key): value for key, value in metrics.items()}
