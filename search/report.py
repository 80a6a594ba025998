"""The sweep's report: a table per framework, a CSV of every trial, pictures, on the parent run."""

from __future__ import annotations

import logging
import csv
import io
import shutil
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from optuna.visualization import matplotlib as optuna_plots

from gid.distill.teacher import teacher_check, teacher_val_ap
from gid.engine.loop import PICTURES_DIR
from gid.distill.cost import time_ratio
from gid.models import stored_metrics, stored_val_ap
from search.config import SweepConfig
from search.finalize import final_markdown
from search.outcomes import FAILED, FINISHED, PRUNED, FrameworkOutcome, TrialRow, best_row, finished, trial_status
from search.space import describe_values
from search.tracking import error_reason
from search.trial import checkpoint_path

logger = logging.getLogger(__name__)


def trial_rows(outcome: FrameworkOutcome, metric: str) -> list[TrialRow]:
    """The framework's trials in the order Tune started them."""
    rows = []
    for result in outcome.results:
        metrics = result.metrics or {}
        epochs = int(metrics.get("epoch", 0))
        status = trial_status(result.error is not None, epochs, outcome.base.train.epochs)
        error = error_reason(str(result.error)) if result.error is not None else ""
        rows.append(
            TrialRow(
                outcome.framework, metrics.get("trial_id", Path(result.path).name), status, epochs,
                metrics.get(metric), dict(result.config or {}), error, checkpoint_path(metrics, result.checkpoint),
                metrics.get("train_time_s"), metrics.get("params"), metrics.get("latency_ms"),
            )
        )
    return rows


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def summary_markdown(sweep: SweepConfig, outcomes: list[FrameworkOutcome], rows: list[TrialRow]) -> str:
    metric, mode = sweep.objective.metric, sweep.objective.mode
    lines = [
        f"# Sweep {sweep.name}",
        "",
        f"Objective: {metric} ({mode}), AP in %.",
        "",
        "| framework | teacher | student alone | GID defaults | best GID | gain | training time vs student alone "
        "| best trial's student: parameters, CPU latency | trials finished / pruned / failed | best trial | best values |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    warnings = []
    for outcome in outcomes:
        teacher_ap, baseline_ap = reference_aps(outcome)
        if warning := teacher_check(teacher_ap, baseline_ap, "the student alone"):
            warnings.append(f"- {outcome.framework}: {warning}")
        mine = [r for r in rows if r.framework == outcome.framework]
        best = best_row(mine, mode)
        counts = " / ".join(str(sum(r.status == s for r in mine)) for s in (FINISHED, PRUNED, FAILED))
        values = describe_values(best.params) if best else "–"
        defaults = next((r for r in mine if outcome.defaults is not None and r.params == outcome.defaults), None)
        gain = gain_over_student(outcome, mine, mode)
        lines.append(
            f"| {outcome.framework} | {_percent(teacher_ap)} | {_percent(baseline_ap)} | {_trial_value(defaults)} "
            f"| {_percent(best.value if best else None)} | {'–' if gain is None else f'{100 * gain:+.1f}'} "
            f"| {_times(best, outcome)} | {_cost(best)} | {counts} "
            f"| {best.trial_id if best else '–'} | {values} |"
        )
    if warnings:
        lines += ["", *warnings]
    finalized = [final_markdown(o.framework, o.final, mode) for o in outcomes if o.final]
    if finalized:
        lines += ["", "## Finalized: the best configurations re-trained over seeds", "", *finalized]
    restarted = [(o.framework, trial, times, reason) for o in outcomes for trial, (times, reason) in o.restarts.items()]
    if restarted:
        lines += ["", f"Trials restarted from their last checkpoint ({len(restarted)}):", ""] + [
            f"- {framework} {trial}: {times}× ({reason})" for framework, trial, times, reason in restarted
        ]
    failed = [r for r in rows if r.status == FAILED]
    if failed:
        lines += ["", "Failed trials:", ""] + [f"- {r.framework} {r.trial_id}: {r.error}" for r in failed]
    return "\n".join(lines) + "\n"


def _times(best: TrialRow | None, outcome: FrameworkOutcome) -> str:
    """The best trial's training time as a multiple of the student alone's: what its gain cost."""
    ratio = time_ratio({"train_time_s": best.train_time_s}, stored_metrics(outcome.baseline)) if best else None
    return "–" if ratio is None else f"{ratio:.1f}×"


def _cost(row: TrialRow | None) -> str:
    """What the trial's student costs to deploy, as its last epoch measured it (none with latency_runs 0)."""
    if row is None or row.param_count is None or row.latency_ms is None:
        return "–"
    return f"{row.param_count / 1e6:.2f} M, {row.latency_ms:.1f} ms"


def _trial_value(row: TrialRow | None) -> str:
    if row is None:
        return "–"
    return _percent(row.value) if row.status == FINISHED else row.status


def gain_over_student(outcome: FrameworkOutcome, rows: list[TrialRow], mode: str) -> float | None:
    """The best finished GID trial's objective minus the student alone's val AP (None if either is unknown)."""
    best, baseline_ap = best_row(rows, mode), stored_val_ap(outcome.baseline)
    return None if best is None or baseline_ap is None else best.value - baseline_ap


def reference_aps(outcome: FrameworkOutcome) -> tuple[float | None, float | None]:
    """The teacher's val AP (stored in its file, or measured once: gid.distill.teacher) and the one the
    student-alone model file records; None where neither is known."""
    return teacher_val_ap(outcome.base), stored_val_ap(outcome.baseline)


def headline_metrics(sweep: SweepConfig, outcomes: list[FrameworkOutcome]) -> dict[str, float]:
    """The summary's numbers as the sweep's own metrics, so MLflow's runs table compares sweeps: per framework the
    teacher's and the student alone's val AP and the best trial's objective (``<framework>/best_<metric>``)."""
    metric, mode, metrics = sweep.objective.metric, sweep.objective.mode, {}
    for outcome in outcomes:
        teacher_ap, baseline_ap = reference_aps(outcome)
        best = best_row(trial_rows(outcome, metric), mode)
        found = {"teacher_val_ap": teacher_ap, "student_val_ap": baseline_ap, f"best_{metric}": best and best.value}
        metrics.update({f"{outcome.framework}/{name}": value for name, value in found.items() if value is not None})
    return metrics


def trials_csv(rows: list[TrialRow]) -> str:
    keys = sorted({k for r in rows for k in r.params})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["framework", "trial_id", "status", "epochs", "objective", "params", "latency_ms", *keys, "error"])
    for r in rows:
        writer.writerow([
            r.framework, r.trial_id, r.status, r.epochs, r.value, r.param_count, r.latency_ms,
            *(r.params.get(k) for k in keys), r.error,
        ])
    return out.getvalue()


def save_plots(outcome: FrameworkOutcome, metric: str, out_dir: Path) -> list[Path]:
    """Optimisation history, parameter importance and parallel coordinates of the framework's study."""
    study = outcome.study
    kwargs = {"target": lambda t: t.values[0], "target_name": metric} if len(study.directions) > 1 else {"target_name": metric}
    plots = {
        "history": optuna_plots.plot_optimization_history,
        "importance": optuna_plots.plot_param_importances,
        "parallel": optuna_plots.plot_parallel_coordinate,
    }
    paths = []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = plot(study, **kwargs)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            # e.g. importance needs two finished trials with different values
            logger.info("  %s: no %s plot (%s)", outcome.framework, name, exc)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        path = out_dir / f"{outcome.framework}_{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        paths.append(path)
    return paths


def _trial_axes(title: str, metric: str, teacher_ap: float | None, baseline_ap: float | None):
    """A figure over trial numbers with the teacher's and the student-alone val AP as horizontal lines."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    for value, label, style in ((teacher_ap, "teacher", ":"), (baseline_ap, "student alone", "--")):
        if value is not None:
            axes.axhline(100 * value, color="grey", linestyle=style, label=f"{label}: val AP {100 * value:.1f}")
    axes.set(title=title, xlabel="trial, in the order Tune started them", ylabel=f"{metric} (%)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure, axes


def _finish(axes) -> None:
    axes.set_ylim(bottom=0)  # AP (or a loss, a time): never below 0, even when all trials score 0
    if axes.get_legend_handles_labels()[0]:  # nothing to name when no trial finished and no file records an AP
        axes.legend()


def trials_figure(
    rows: list[TrialRow], metric: str, teacher_ap: float | None, baseline_ap: float | None, framework: str
) -> Figure:
    """The objective of each trial (pruned ones at their last epoch) against the teacher and the student alone."""
    figure, axes = _trial_axes(f"{framework}: {metric} of each GID trial", metric, teacher_ap, baseline_ap)
    for status, marker in ((FINISHED, {"color": "tab:blue"}), (PRUNED, {"color": "tab:blue", "mfc": "none"})):
        points = [(number, 100 * r.value) for number, r in enumerate(rows, 1) if r.status == status and r.value is not None]
        if points:
            axes.plot(*zip(*points), "o", label=status, **marker)
    _finish(axes)
    return figure


def best_so_far_figure(
    rows: list[TrialRow], metric: str, mode: str, teacher_ap: float | None, baseline_ap: float | None, framework: str
) -> Figure:
    """The best finished trial's objective after each finished trial, against the teacher and the student alone."""
    figure, axes = _trial_axes(f"{framework}: best {metric} so far", metric, teacher_ap, baseline_ap)
    points = []
    for number, row in enumerate(rows, 1):
        if finished([row]):
            points.append((number, 100 * best_row(rows[:number], mode).value))
    if points:
        axes.plot(*zip(*points), "o-", drawstyle="steps-post", label="best finished trial so far")
    _finish(axes)
    return figure


def save_trial_pictures(outcome: FrameworkOutcome, rows: list[TrialRow], sweep: SweepConfig, out_dir: Path) -> None:
    """The framework's two trial figures, and the GI pictures of its best trial copied from its last checkpoint."""
    metric, mode, framework = sweep.objective.metric, sweep.objective.mode, outcome.framework
    teacher_ap, baseline_ap = reference_aps(outcome)
    trials_figure(rows, metric, teacher_ap, baseline_ap, framework).savefig(out_dir / f"{framework}_trials.png", dpi=110)
    best_so_far_figure(rows, metric, mode, teacher_ap, baseline_ap, framework).savefig(
        out_dir / f"{framework}_best_so_far.png", dpi=110
    )
    pictures = out_dir / f"{framework}_best_gi_pictures"
    shutil.rmtree(pictures, ignore_errors=True)  # a resumed sweep's best trial may be another
    best = best_row(rows, mode)
    if best is not None and best.checkpoint and (Path(best.checkpoint) / PICTURES_DIR).is_dir():
        shutil.copytree(Path(best.checkpoint) / PICTURES_DIR, pictures)


def write_sweep_report(sweep: SweepConfig, outcomes: list[FrameworkOutcome], local_dir: Path) -> tuple[str, Path]:
    """Write the summary (Markdown), every trial (CSV), the pictures and the plots to ``local_dir/report``."""
    metric = sweep.objective.metric
    rows = [row for outcome in outcomes for row in trial_rows(outcome, metric)]
    report_dir = local_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = summary_markdown(sweep, outcomes, rows)
    (report_dir / "summary.md").write_text(summary)
    (report_dir / "trials.csv").write_text(trials_csv(rows))
    for outcome in outcomes:
        save_trial_pictures(outcome, [r for r in rows if r.framework == outcome.framework], sweep, report_dir)
        save_plots(outcome, metric, report_dir)
    return summary, report_dir
