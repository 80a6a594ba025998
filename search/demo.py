"""`gid demo`: the whole workflow on built-in synthetic data, with embedded Ray and MLflow.

Synthetic data -> teachers and students alone (the baseline), side by side -> a GID sweep whose
first trial is GID at its defaults -> exported best configs. Every step writes the same files a
user would write by hand (configs/*.yaml, sweep.yaml), so the demo folder doubles as a template.
Re-running it resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from gid.config import Config, load_config
from gid.data import make_synthetic
from gid.engine.trainer import TrainingOutcome, ensure_ray, run_training
from gid.logs import open_log

if TYPE_CHECKING:
    from search.config import SweepConfig
    from search.outcomes import SweepOutcome

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSize:
    train_images: int
    val_images: int
    image_size: int
    max_objects: int
    min_object_size: float
    teacher_epochs: int
    student_epochs: int
    trials: int


# Chosen on a data set of another seed (docs/benchmarks.md, "The demo's scale"): small images with
# 1-3 large objects, the easiest set on which detectors trained from scratch on two CPU cores learn
# within minutes. The teacher is the student's ResNet-18 with a 2x wider FPN and head trained 6x
# longer: from scratch a ResNet-50 learns too slowly per step for the demo's minutes (3.6 AP after 480
# steps where a ResNet-18 had 5.5), so here the teacher's lead comes from its schedule and width.
FULL = DemoSize(
    train_images=384, val_images=64, image_size=64, max_objects=3, min_object_size=16,
    teacher_epochs=12, student_epochs=2, trials=4,
)
QUICK = DemoSize(
    train_images=32, val_images=16, image_size=64, max_objects=3, min_object_size=16,
    teacher_epochs=1, student_epochs=1, trials=2,
)
TEACHER_MODEL = {"backbone": "resnet18", "fpn_channels": 128}
STUDENT_MODEL = {"backbone": "resnet18", "fpn_channels": 64}


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_configs(out: Path, framework: str, size: DemoSize) -> dict[str, Path]:
    """Teacher, student-alone and GID-student configs for one framework."""
    common = {
        "data": {"root": str(out / "data"), "image_size": size.image_size, "batch_size": 8},
        "run": {"storage_path": str(out / "runs")},
        # One core per run, runs side by side: at 64 px a step gains little from a second thread.
        "scaling": {"cpus_per_worker": 1},
    }
    student_train = {"epochs": size.student_epochs, "lr": 0.02, "schedule": "cosine", "warmup_iters": 50, "log_every": 20}
    teacher = {
        **common,
        "model": {"framework": framework, **TEACHER_MODEL},
        "train": {**student_train, "epochs": size.teacher_epochs},
    }
    student = {**common, "model": {"framework": framework, **STUDENT_MODEL}, "train": student_train}
    # GID at the product's defaults: the config names the teacher and nothing else.
    gid = {**student, "distill": {"teacher": str(out / "runs" / f"{framework}_teacher" / "model.pt")}}
    return {
        name: _write_yaml(out / "configs" / f"{framework}_{name}.yaml", data)
        for name, data in (("teacher", teacher), ("student", student), ("gid", gid))
    }


def write_sweep(out: Path, frameworks: list[str], configs: dict[str, dict[str, Path]], size: DemoSize) -> Path:
    sweep = {
        "name": "demo",
        "frameworks": {
            fw: {"config": str(configs[fw]["gid"]), "baseline": str(out / "runs" / f"{fw}_student" / "model.pt")}
            for fw in frameworks
        },
        "trials": size.trials,
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
        "scheduler": {"type": "asha"},  # its grace period: the default, two thirds of the schedule
        "sampler": {"type": "tpe", "seed": 0},
        "tracking": {
            "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
            "experiment": "gid-demo",
            "artifact_location": str(out / "mlartifacts"),
        },
        "storage_path": str(out / "runs" / "sweeps"),
    }
    return _write_yaml(out / "sweep.yaml", sweep)


DEMO_MODEL = "gid-demo"  # the registered model the demo's best students become versions of


class _Steps:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.perf_counter()

    def __call__(self, title: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        logger.info("\n=== [%d/%d] %s  (demo time so far %.1f min)", self.done, self.total, title, elapsed / 60)


def _named(model: dict) -> str:
    return f"{model['backbone']} FPN-{model['fpn_channels']}"


def train_side_by_side(configs: list[Config]) -> list[TrainingOutcome]:
    """Train ``configs`` one CPU each, as many at once as there are cores, longest first as given."""
    # Ray starts here, on the main thread: started by a pool thread, a later Tune run in this process
    # ends in SystemExit(1) inside ray.wait (docs/ray-workarounds.md).
    ensure_ray()
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        return list(pool.map(run_training, configs))


def run_demo(out: Path, frameworks: list[str], quick: bool = False) -> None:
    from search.config import load_sweep
    from search.export import export_best
    from search.registry import CHAMPION
    from search.sweep import run_sweep

    size = QUICK if quick else FULL
    out = out.expanduser().resolve()
    open_log(out)  # one log for the whole demo, not one per run it starts
    step = _Steps(4)

    step(f"synthetic data: {size.train_images} train / {size.val_images} val images of {size.image_size} px")
    make_synthetic(
        out / "data", train=size.train_images, val=size.val_images, image_size=size.image_size,
        max_objects=size.max_objects, min_object_size=size.min_object_size,
    )
    configs = {fw: write_configs(out, fw, size) for fw in frameworks}

    step(
        f"teachers ({_named(TEACHER_MODEL)}, {size.teacher_epochs} epochs) and students alone "
        f"({_named(STUDENT_MODEL)}, {size.student_epochs} epochs: the baseline), side by side"
    )
    runs = [(fw, role) for role in ("teacher", "student") for fw in frameworks]
    train_side_by_side([load_config(configs[fw][role]) for fw, role in runs])

    step(
        f"GID sweep: {size.trials} trials per framework, the first at GID's defaults, Optuna TPE + ASHA, "
        "tracked in MLflow"
    )
    sweep_file = write_sweep(out, frameworks, configs, size)
    sweep = load_sweep(sweep_file)
    outcome = run_sweep(sweep, resume=(out / "runs" / "sweeps" / "demo").exists())

    step(f"export of the best configs, their students registered as the MLflow model {DEMO_MODEL!r}")
    exported = export_best(
        out / "best", tracking_uri=sweep.tracking.tracking_uri, experiment=sweep.tracking.experiment, sweep="demo",
        register=DEMO_MODEL,
    )

    lines = ["", outcome.summary, *verdicts(outcome, sweep)]
    lines += [
        "", f"Data:            {out / 'data'}",
        f"Configs:         {out / 'configs'}  and the sweep file {sweep_file}",
        f"Sweep report:    {outcome.report_dir}",
    ]
    lines += [f"Best {e.framework:<10}  {e.path}   (re-run: gid distill {e.path})" for e in exported]
    lines += [f"Model {e.framework:<9}  {e.registered.uri}" for e in exported if e.registered is not None]
    lines.append(f'The champion:    mlflow.pytorch.load_model("models:/{DEMO_MODEL}@{CHAMPION}") returns it as a torchvision detector')
    lines.append(f"MLflow UI:       mlflow ui --backend-store-uri {sweep.tracking.tracking_uri} --port 5000")
    lines.append(f"                 then open {outcome.runs_link}")
    logger.info("\n".join(lines))


def verdicts(outcome: SweepOutcome, sweep: SweepConfig) -> list[str]:
    """One plain line per framework: did GID beat the student trained alone, at this scale?"""
    from search.report import gain_over_student, trial_rows

    lines = [""]
    for framework in outcome.frameworks:
        gain = gain_over_student(framework, trial_rows(framework, sweep.objective.metric), sweep.objective.mode)
        if gain is None:
            lines.append(f"{framework.framework}: no GID trial finished, so nothing to compare")
        elif gain > 0:
            lines.append(f"{framework.framework}: the best GID student is {100 * gain:+.1f} AP over the student trained alone")
        else:
            lines.append(
                f"{framework.framework}: at the demo's scale GID did not beat the student trained alone ({100 * gain:+.1f} AP); "
                "docs/benchmarks.md measures it at larger ones"
            )
    return lines
