"""`gid export`: the best trials' configs from MLflow as distill YAML files that run as they are, and with
``--register`` each framework's best student as an MLflow model version (search.registry)."""

from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gid.config import Config, set_value, validate
from gid.errors import GidError
from search.metric_names import gid_metrics
from search.names import check_model_name, quoted
from search.tracking import (
    CANDIDATE_TAG,
    FRAMEWORK_TAG,
    PORTABLE_CONFIG,
    ROLE_TAG,
    SEED_TAG,
    SOURCE_TAG,
    STATUS_TAG,
    STORAGE_TAG,
    SWEEP_ID_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    connect,
    tag_filter,
)
from search.outcomes import FINISHED, ranked
from search.registry import CHAMPION, Registered, register_student
from search.trial import FINAL, STUDENT


@dataclass
class ExportedConfig:
    framework: str
    rank: int
    path: Path
    sweep: str
    trial_id: str
    run_id: str
    metrics: dict[str, float]  # the mean over seeds when finalized
    seeds: int = 1
    registered: Registered | None = None  # the student's MLflow model version, with --register


def sweep_id(client, experiment_id: str, sweep: str) -> str:
    """The id of the sweep that ``sweep`` (its name or its id) names; one line if none or several do."""
    by_name, by_id = (tag_filter({ROLE_TAG: "sweep", tag: sweep}) for tag in (SWEEP_TAG, SWEEP_ID_TAG))
    runs = client.search_runs([experiment_id], filter_string=by_name) or client.search_runs(
        [experiment_id], filter_string=by_id
    )
    found = {run.data.tags[SWEEP_ID_TAG]: run for run in runs}
    if not found:
        raise GidError(f"no sweep named {sweep!r} in this MLflow experiment; check --sweep and --mlflow-experiment")
    if len(found) > 1:
        listed = "; ".join(f"{id_} in {run.data.tags.get(STORAGE_TAG, '?')}" for id_, run in found.items())
        raise GidError(f"{len(found)} sweeps are named {sweep!r} ({listed}); pass the id of one as --sweep")
    return next(iter(found))


@dataclass
class Best:
    """A configuration to export: a run that holds it and its metrics (the mean over seeds when finalized)."""

    run: Any
    metrics: dict[str, float]
    seeds: int = 1


def objective_mode(client, experiment_id: str, sweep_ids: set[str], metric: str) -> str:
    """The direction the sweeps rank ``metric`` in: their sweep file's ``objective.mode`` (or ``second_mode``)
    where ``metric`` is their objective, else ``max`` (AP and its kin); one line if the sweeps disagree."""
    modes = set()
    for id_ in sweep_ids:
        parent = client.search_runs([experiment_id], filter_string=tag_filter({ROLE_TAG: "sweep", SWEEP_ID_TAG: id_}))
        params = parent[0].data.params if parent else {}
        for key in ("", "second_"):
            if params.get(f"objective.{key}metric") == metric:
                modes.add(params.get(f"objective.{key}mode", "max"))
    if len(modes) > 1:
        raise GidError(f"the sweeps here rank {metric} both ways (objective.mode max and min); pick one with --sweep")
    return modes.pop() if modes else "max"


def best_runs(client, experiment_id: str, metric: str, sweep: str | None, top: int) -> tuple[dict[str, list[Best]], str]:
    """Per framework, the ``top`` configurations best by ``metric`` in the sweep's objective direction (returned
    too): the finalize stage's by their mean over seeds where a sweep has one, else the finished (not pruned) trials."""
    tags = {STATUS_TAG: FINISHED}
    if sweep:
        tags[SWEEP_ID_TAG] = sweep_id(client, experiment_id, sweep)
    finals = _finished_runs(client, experiment_id, {**tags, ROLE_TAG: FINAL}, metric)
    trials = _finished_runs(client, experiment_id, {**tags, ROLE_TAG: "trial"}, metric)
    sweeps = {found.run.data.tags[SWEEP_ID_TAG] for runs in (*finals.values(), *trials.values()) for found in runs}
    mode = objective_mode(client, experiment_id, sweeps, metric)
    per_framework: dict[str, list[Best]] = {}
    for framework, runs in finals.items():
        per_framework[framework] = _by_mean(runs, metric, mode)
    for framework, runs in trials.items():
        if framework not in per_framework:
            per_framework[framework] = ranked(runs, mode, key=lambda found: found.metrics[metric])
    return {framework: found[:top] for framework, found in sorted(per_framework.items())}, mode


def _finished_runs(client, experiment_id: str, tags: dict[str, str], metric: str) -> dict[str, list[Best]]:
    """Per framework, the runs of ``tags`` that hold ``metric``, with their metrics under gid's names."""
    per_framework: dict[str, list[Best]] = {}
    for run in client.search_runs([experiment_id], filter_string=tag_filter(tags), max_results=5000):
        found = Best(run, gid_metrics(run.data.metrics))
        if metric in found.metrics:
            per_framework.setdefault(run.data.tags[FRAMEWORK_TAG], []).append(found)
    return per_framework


def _by_mean(runs: list[Best], metric: str, mode: str) -> list[Best]:
    """Finalize runs grouped by the configuration they re-train (the student alone left out), best mean first."""
    groups: dict[tuple[str, str], list[Best]] = {}
    for found in runs:
        tags = found.run.data.tags
        if tags[CANDIDATE_TAG] != STUDENT:
            groups.setdefault((tags[SWEEP_ID_TAG], tags[CANDIDATE_TAG]), []).append(found)
    best = []
    for group in groups.values():
        keys = set.intersection(*(set(found.metrics) for found in group))
        mean = {key: statistics.fmean(found.metrics[key] for found in group) for key in keys}
        first_seed = min(group, key=lambda found: int(found.run.data.tags[SEED_TAG]))
        best.append(Best(first_seed.run, mean, len(group)))
    return ranked(best, mode, key=lambda b: b.metrics[metric])


def exported_config(client, run, name: str) -> Config:
    """The user's base config with the trial's values (no sweep paths or resources), as a run of its own."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no bar
    with tempfile.TemporaryDirectory() as directory:
        path = client.download_artifacts(run.info.run_id, PORTABLE_CONFIG, directory)
        data = yaml.safe_load(Path(path).read_text())
    set_value(data, "run.name", name)
    return validate(data, source=f"{PORTABLE_CONFIG} of run {run.info.run_id}")


def export_best(
    out_dir: Path, *, tracking_uri: str | None, experiment: str, sweep: str | None, metric: str = "val_ap", top: int = 1,
    register: str | None = None,
) -> list[ExportedConfig]:
    """Write the best configs to ``out_dir``; with ``register``, each framework's best (its finalized winner where
    the sweep had a finalize stage) also registers the student it trained as a version of that MLflow model."""
    if top < 1:
        raise GidError(f"--top {top}: export at least 1 config per framework")
    # before MLflow is touched
    if sweep is not None:
        try:
            quoted(sweep)
        except ValueError as exc:
            raise GidError(f"--sweep {exc}") from None
    if register is not None:
        try:
            check_model_name(register)
        except ValueError as exc:
            raise GidError(f"--register {exc}") from None
    client, experiment_id = connect(tracking_uri, experiment, create=False)
    found, mode = best_runs(client, experiment_id, metric, sweep, top)
    if not found:
        which = f"sweep {sweep!r} in " if sweep else ""
        raise GidError(f"no finished trials with {metric} in {which}MLflow experiment {experiment!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    exported = []
    for framework, found_runs in found.items():
        for rank, best in enumerate(found_runs, start=1):
            run = best.run
            run_sweep, trial = run.data.tags[SWEEP_TAG], run.data.tags.get(SOURCE_TAG) or run.data.tags[TRIAL_TAG]
            name = f"{run_sweep}_{framework}_best{rank}"
            path = out_dir / f"{name}.yaml"
            config = exported_config(client, run, name)
            evidence = f"finalized: mean of {best.seeds} seeds, this file has seed {config.train.seed}; " if best.seeds > 1 else ""
            header = f"# Best #{rank} {framework} config of sweep {run_sweep} ({evidence}trial {trial}, MLflow run {run.info.run_id}).\n"
            body = f"# Run it with: gid distill {path}\n" + yaml.safe_dump(config.to_dict(), sort_keys=False)
            registered = None
            if register is not None and rank == 1:  # the version holds the file as written here, less this line
                registered = register_student(
                    client, register, run, best.metrics, best.seeds, metric=metric, mode=mode, config_name=path.name,
                    config_text=header + body,
                )
                header += f"# The student the trial trained is MLflow model {register} version {registered.version}: {registered.uri}\n"
            path.write_text(header + body)
            metrics = {k: v for k, v in best.metrics.items() if k.startswith("val_")}
            exported.append(ExportedConfig(framework, rank, path, run_sweep, trial, run.info.run_id, metrics, best.seeds, registered))
    (out_dir / "README.md").write_text(export_report(exported, experiment))
    return exported


def export_report(exported: list[ExportedConfig], experiment: str) -> str:
    lines = [
        "# Exported GID configs",
        "",
        f"From MLflow experiment `{experiment}`. Each file runs as it is: `gid distill FILE`; the student it",
        "trains, `runs/<file name>/model.pt`, goes to torchvision or TorchScript with `gid model export`.",
        "",
        "AP is the mean over the finalize stage's seeds where the sweep had one (seeds > 1).",
        "",
        "| file | framework | rank | sweep | trial | MLflow run | seeds | AP | AP50 | AP75 | MLflow model |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    champion = final_champion(exported)
    for e in exported:
        ap = [f"{100 * e.metrics[k]:.1f}" if k in e.metrics else "–" for k in ("val_ap", "val_ap50", "val_ap75")]
        model = "–"
        if e.registered is not None:
            model = f"`{e.registered.uri}`" + (f" ({CHAMPION})" if e.registered.version == champion else "")
        lines.append(
            f"| {e.path.name} | {e.framework} | {e.rank} | {e.sweep} | {e.trial_id} | {e.run_id} | {e.seeds} | {' | '.join(ap)} | {model} |"
        )
    if champion is not None:
        name = next(e.registered.name for e in exported if e.registered is not None)
        lines += [
            "",
            f"`mlflow.pytorch.load_model(\"models:/{name}@{CHAMPION}\")` returns the {CHAMPION}, version {champion}, as a",
            "torchvision detector; each version also holds its TorchScript file, its torchvision state dict and its",
            "config (`extra_files/`).",
        ]
    return "\n".join(lines) + "\n"


def final_champion(exported: list[ExportedConfig]) -> str | None:
    """The version ``champion`` names once the export's last student is registered (None: it registered none)."""
    registered = [e.registered for e in exported if e.registered is not None]
    return registered[-1].champion if registered else None
