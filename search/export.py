"""`gid export`: the best trials' configs from MLflow as distill YAML files that run as they are."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from gid.config import Config, set_value, validate
from gid.errors import GidError
from search.names import quoted
from search.tracking import (
    FRAMEWORK_TAG,
    PORTABLE_CONFIG,
    ROLE_TAG,
    STATUS_TAG,
    STORAGE_TAG,
    SWEEP_ID_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    connect,
    tag_filter,
)
from search.trial import FINISHED


@dataclass
class ExportedConfig:
    framework: str
    rank: int
    path: Path
    sweep: str
    trial_id: str
    run_id: str
    metrics: dict[str, float]


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


def best_runs(client, experiment_id: str, metric: str, sweep: str | None, top: int) -> dict[str, list]:
    """Per framework, the ``top`` finished (not pruned) trial runs with the highest ``metric``."""
    tags = {ROLE_TAG: "trial", STATUS_TAG: FINISHED}
    if sweep:
        tags[SWEEP_ID_TAG] = sweep_id(client, experiment_id, sweep)
    runs = client.search_runs(
        [experiment_id], filter_string=tag_filter(tags), order_by=[f"metrics.`{metric}` DESC"], max_results=5000
    )
    per_framework: dict[str, list] = {}
    for run in runs:
        if metric in run.data.metrics:
            per_framework.setdefault(run.data.tags[FRAMEWORK_TAG], []).append(run)
    return {framework: found[:top] for framework, found in sorted(per_framework.items())}


def exported_config(client, run, name: str) -> Config:
    """The user's base config with the trial's values (no sweep paths or resources), as a run of its own."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no bar
    with tempfile.TemporaryDirectory() as directory:
        path = client.download_artifacts(run.info.run_id, PORTABLE_CONFIG, directory)
        data = yaml.safe_load(Path(path).read_text())
    set_value(data, "run.name", name)
    return validate(data, source=f"{PORTABLE_CONFIG} of run {run.info.run_id}")


def export_best(
    out_dir: Path, *, tracking_uri: str | None, experiment: str, sweep: str | None, metric: str = "val_ap", top: int = 1
) -> list[ExportedConfig]:
    if sweep is not None:
        try:  # before MLflow is touched
            quoted(sweep)
        except ValueError as exc:
            raise GidError(f"--sweep {exc}") from None
    client, experiment_id = connect(tracking_uri, experiment)
    found = best_runs(client, experiment_id, metric, sweep, top)
    if not found:
        which = f"sweep {sweep!r} in " if sweep else ""
        raise GidError(f"no finished trials with {metric} in {which}MLflow experiment {experiment!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    exported = []
    for framework, runs in found.items():
        for rank, run in enumerate(runs, start=1):
            run_sweep = run.data.tags[SWEEP_TAG]
            name = f"{run_sweep}_{framework}_best{rank}"
            path = out_dir / f"{name}.yaml"
            config = exported_config(client, run, name)
            header = f"# Best #{rank} {framework} config of sweep {run_sweep} (trial {run.data.tags[TRIAL_TAG]}, MLflow run {run.info.run_id}).\n"
            path.write_text(header + f"# Run it with: gid distill {path}\n" + yaml.safe_dump(config.to_dict(), sort_keys=False))
            metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("val_")}
            exported.append(ExportedConfig(framework, rank, path, run_sweep, run.data.tags[TRIAL_TAG], run.info.run_id, metrics))
    (out_dir / "README.md").write_text(export_report(exported, experiment))
    return exported


def export_report(exported: list[ExportedConfig], experiment: str) -> str:
    lines = [
        "# Exported GID configs",
        "",
        f"From MLflow experiment `{experiment}`. Each file runs as it is: `gid distill FILE`; the student it",
        "trains, `runs/<file name>/model.pt`, goes to torchvision or TorchScript with `gid model export`.",
        "",
        "| file | framework | rank | sweep | trial | MLflow run | AP | AP50 | AP75 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in exported:
        ap = [f"{100 * e.metrics[k]:.1f}" if k in e.metrics else "–" for k in ("val_ap", "val_ap50", "val_ap75")]
        lines.append(f"| {e.path.name} | {e.framework} | {e.rank} | {e.sweep} | {e.trial_id} | {e.run_id} | {' | '.join(ap)} |")
    return "\n".join(lines) + "\n"
