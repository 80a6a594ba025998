"""`gid export`: the best trials' configs from MLflow as distill YAML files that run as they are."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from gid.config import Config, validate
from gid.errors import GidError
from search.tracking import FRAMEWORK_TAG, ROLE_TAG, SWEEP_TAG, TRIAL_TAG, connect


@dataclass
class ExportedConfig:
    framework: str
    rank: int
    path: Path
    sweep: str
    trial_id: str
    run_id: str
    metrics: dict[str, float]


def best_runs(client, experiment_id: str, metric: str, sweep: str | None, top: int) -> dict[str, list]:
    """Per framework, the ``top`` finished (not pruned) trial runs with the highest ``metric``."""
    query = f"tags.`{ROLE_TAG}` = 'trial' and tags.status = 'finished'"
    if sweep:
        query += f" and tags.`{SWEEP_TAG}` = '{sweep}'"
    runs = client.search_runs([experiment_id], filter_string=query, order_by=[f"metrics.`{metric}` DESC"], max_results=5000)
    per_framework: dict[str, list] = {}
    for run in runs:
        if metric in run.data.metrics:
            per_framework.setdefault(run.data.tags[FRAMEWORK_TAG], []).append(run)
    return {framework: found[:top] for framework, found in sorted(per_framework.items())}


def exported_config(client, run, name: str) -> Config:
    """The trial's resolved config, renamed to a run of its own under the default storage."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no bar
    with tempfile.TemporaryDirectory() as directory:
        path = client.download_artifacts(run.info.run_id, "config.yaml", directory)
        data = yaml.safe_load(Path(path).read_text())
    data["run"].update({"name": name, "storage_path": "runs"})
    return validate(data, source=f"config.yaml of run {run.info.run_id}")


def export_best(
    out_dir: Path, *, tracking_uri: str | None, experiment: str, sweep: str | None, metric: str = "val_ap", top: int = 1
) -> list[ExportedConfig]:
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
        f"From MLflow experiment `{experiment}`. Each file runs as it is: `gid distill FILE`.",
        "",
        "| file | framework | rank | sweep | trial | MLflow run | AP | AP50 | AP75 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in exported:
        ap = [f"{100 * e.metrics[k]:.1f}" if k in e.metrics else "–" for k in ("val_ap", "val_ap50", "val_ap75")]
        lines.append(f"| {e.path.name} | {e.framework} | {e.rank} | {e.sweep} | {e.trial_id} | {e.run_id} | {' | '.join(ap)} |")
    return "\n".join(lines) + "\n"
