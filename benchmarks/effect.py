"""Does GID help? Teacher, student alone, GID at the spec's defaults, each loss alone, and GID tuned.

For each framework, on synthetic data with a held-out ``test`` split, it trains through the product's
own paths (``run_training`` on Ray Train, ``run_sweep`` + ``export_best`` for the tuned values):

* **teacher**: the bigger backbone on a longer schedule (one seed);
* **student**: the small backbone alone;
* **GID spec weights**: the student distilled at gid-spec.md's fixed weights (``balance.mode: fixed``);
* **GID default**: the student distilled at the product's defaults (a config that names only its teacher);
* **feature / relation / response only**: one GID loss switched on, at the product's defaults (one seed);
* **GID tuned**: a sweep on the validation split whose finalize stage re-trains its best configurations
  over seeds; the winner it exports, re-trained here on the table's seeds;
* ``--value``: **GID, dynamic balance** (while it is not the default); **student alone, GID's training
  time** (as many epochs as the same seed's GID default run took in training time, on the same schedule
  shape); and **converged** rows, the student alone and GID at the defaults on a ``converge_epochs``
  schedule (their val AP per epoch plotted beside the teacher's in ``convergence.png``; ``--converge-epochs``
  for a framework whose student alone still rises at the end of VALUE's 12: a converged row trained on another
  schedule is trained again, its old test metrics kept under ``replaces``);
* ``--mobile``: a deployable student, **MobileNetV2 from torchvision's ImageNet weights** (``benchmarks/assets.py``)
  alone and with **GID at the product's defaults** (and **tuned** with ``--sweep-trials``), rows
  ``mobilenet_student``, ``mobilenet_gid_default``, ``mobilenet_gid_tuned``; every row also gets its parameters
  and CPU latency per image, measured from its model file as ``gid eval`` measures it, once all training is done.

Every model is COCO-evaluated on the test split, which neither training nor the sweep sees. Rows
student / GID spec weights / GID default / GID tuned repeat over ``--seeds`` training seeds (mean ± std). Finished runs
are kept in ``OUT/results.json``, so an interrupted benchmark picks up where it stopped.

    python -m benchmarks.effect --out runs/bench-effect            # the full table (2 CPUs: 136 min when its sweeps had 4 trials and no finalize stage)
    python -m benchmarks.effect --quick --out runs/bench-effect-q  # a smaller table, FCOS only (2 CPUs: 11 min before the spec-weights row; its teacher is too weak to teach)
    python -m benchmarks.effect --dev --out runs/bench-effect-dev  # the development table the defaults are chosen on
    python -m benchmarks.effect --value --out runs/bench-value     # the defaults at equal compute and at convergence
        --frameworks fcos --keep benchmarks/results/effect_value     # (a framework a session, its results kept in the repo)
        --frameworks faster_rcnn --converge-epochs 24 ...            # (its student alone still rises after 12)
    python -m benchmarks.effect --mobile --out runs/bench-value    # MobileNetV2 from ImageNet, with cost (in the value
                                                                   # table's folder: its teachers, not trained again)
    python -m benchmarks.effect --mobile --dev --out runs/bench-mobile-dev  # the same on the development data set

``--dev`` runs on a data set of another seed and size (``--data-seed`` for more than one), with a
faster teacher, and compares balance candidates (``CANDIDATES``); the product's default
``distill.balance`` is chosen from those tables, never from the benchmark's. It also prints how well val AP after epoch k
ranks the runs by their final val AP: the evidence for the sweep's ASHA grace period. ``--mobile --dev`` runs the
MobileNetV2 table on data seed 1: its scale is chosen there, so that the teacher leads the student alone by 3 AP.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import ray
import torch
import yaml

from benchmarks.assets import mobilenet_v2_imagenet
from benchmarks.step_overhead import cpu_name
from gid.config import BalanceConfig, DataConfig, TrainConfig
from gid.engine.latency import WARMUP_RUNS, cpu_cost
from gid.frameworks import FRAMEWORKS

REPO = Path(__file__).resolve().parent.parent
METRICS = ("ap", "ap50", "ap75", "aps")
SINGLE_LOSSES = ("feature", "relation", "response")
BATCH, WARMUP_ITERS = 8, 100  # every run's


@dataclass(frozen=True)
class Scale:
    """Data, models and schedules: sized so the teacher clearly beats the student within the budget."""

    train_images: int
    val_images: int
    test_images: int
    image_size: int
    max_objects: int
    min_object_size: float
    teacher_backbone: str
    teacher_fpn: int
    teacher_epochs: int
    student_backbone: str
    student_fpn: int
    student_epochs: int
    lr: float
    seeds: int
    sweep_trials: int
    finalize_top: int = 2  # the sweep's finalize stage: its best configurations re-trained over seeds
    finalize_seeds: int = 2
    frameworks: tuple[str, ...] = ("fcos", "retinanet", "faster_rcnn")  # fastest learner first
    single_losses: bool = True
    data_seed: int = 0
    candidates: bool = False  # the balance candidates instead of the default, tuned and single-loss rows
    spec_weights: bool = True  # the spec's fixed weights as a row
    gid_dynamic: bool = False  # GID with distill.balance.mode dynamic as a row (while it is not the default)
    equal_compute: bool = False  # the student alone for as many epochs as gid_default's training time buys
    converge_epochs: int = 0  # > 0: the student alone and gid_default on this long a schedule (convergence rows)
    converge_seeds: int = 2
    student_rows: str = ""  # the student rows' name prefix: MOBILE_ROWS for MOBILE's, beside the others in one folder
    pretrained_student: bool = False  # the student's backbone from torchvision's ImageNet weights (MobileNetV2 only)
    latency_runs: int = 0  # > 0: every row's params and CPU latency_ms (the median of this many runs) after training


FULL = Scale(
    train_images=1024, val_images=128, test_images=256, image_size=64, max_objects=4, min_object_size=12,
    teacher_backbone="resnet50", teacher_fpn=128, teacher_epochs=16,
    student_backbone="resnet18", student_fpn=64, student_epochs=3,
    lr=0.02, seeds=3, sweep_trials=12,
)
QUICK = replace(
    FULL, train_images=512, val_images=64, test_images=128, teacher_epochs=10, student_epochs=4,
    seeds=2, sweep_trials=2, finalize_top=1, frameworks=("fcos",), single_losses=False,
)
# Another seed and size, and a teacher that learns in minutes (docs/benchmarks.md, "The demo's scale").
DEV = replace(
    FULL, data_seed=1, train_images=512, val_images=64, test_images=128,
    teacher_backbone="resnet18", teacher_fpn=128, teacher_epochs=12,
    seeds=2, sweep_trials=0, single_losses=False, candidates=True, spec_weights=False,
)
#: The development table's candidate rows beside the student alone: row name -> (label, ``distill.balance``).
#: Every dynamic setting is spelled out, so that a row keeps its meaning when the product's defaults move.
DYNAMIC = {"mode": "dynamic", "every_steps": 50, "momentum": 0.5}
CANDIDATES = {
    "gradient_1_1_1": ("GID, gradient 1/1/1", {"mode": "gradient", "ratios": {"feature": 1.0, "relation": 1.0, "response": 1.0}}),
    "dynamic_1_1_1": ("GID, dynamic 1/1/1", {**DYNAMIC, "ratios": {"feature": 1.0, "relation": 1.0, "response": 1.0}}),
    "dynamic_1_1_3": ("GID, dynamic 1/1/3", {**DYNAMIC, "ratios": {"feature": 1.0, "relation": 1.0, "response": 3.0}}),
    # The control: is dynamic 1/1/3's gain the moving estimate's, or the response ratio's?
    "gradient_1_1_3": ("GID, gradient 1/1/3", {"mode": "gradient", "ratios": {"feature": 1.0, "relation": 1.0, "response": 3.0}}),
}
#: Rows of earlier development tables, kept readable in their results files.
EARLIER_CANDIDATES = {
    "gradient_025_025_1": "GID, gradient 0.25/0.25/1",
    "gradient_025_025_025": "GID, gradient 0.25/0.25/0.25",
}
# Does GID's gain hold? The defaults against the student alone at the same compute and at convergence. Its teacher
# must lead the converged student alone: FULL's ResNet-50, from scratch at this scale, ends its 16 epochs below a
# ResNet-18 student trained 12 (FCOS val AP 4.6 against 8.6), so here a ResNet-34 trained twice as long as that.
LEADING_TEACHER = {"teacher_backbone": "resnet34", "teacher_epochs": 24}
VALUE = replace(
    FULL, **LEADING_TEACHER,
    sweep_trials=0, single_losses=False, spec_weights=False, equal_compute=True, converge_epochs=12,
    gid_dynamic=BalanceConfig().mode != "dynamic",  # once dynamic is the default, gid_default is it
)
MOBILE_ROWS = "mobilenet_"
LATENCY_THREADS = 1  # every row's latency on as many threads: steadier than more on a machine that runs other work
# A deployable student: MobileNetV2 from ImageNet on the teacher's FPN levels, its cost beside its AP (gid eval's 20
# runs). The data and the teacher are VALUE's, so the value table's folder lends its teachers.
MOBILE = replace(
    FULL, **LEADING_TEACHER, student_backbone="mobilenet_v2", student_rows=MOBILE_ROWS, pretrained_student=True, latency_runs=20,
    sweep_trials=0, single_losses=False, spec_weights=False,
)
# MOBILE on another data set, where its sizes are chosen: the teacher must lead the student alone by 3 AP.
MOBILE_DEV = replace(MOBILE, data_seed=1, seeds=2)
# On a GPU the same command trains on more, larger images for longer.
GPU = replace(
    FULL, train_images=8192, val_images=512, test_images=1024, image_size=256, max_objects=8, min_object_size=12,
    teacher_epochs=24, student_epochs=12,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="working folder: data, runs, results.json, effect.md")
    p.add_argument("--quick", action="store_true", help="FCOS only, 2 seeds, no single-loss rows, a 2-trial sweep")
    p.add_argument("--gpu", action="store_true", help="the GPU scale: 8k images of 256 px, longer schedules")
    p.add_argument("--dev", action="store_true", help="the development table: another data set, balance candidates")
    p.add_argument(
        "--value", action="store_true",
        help="the defaults against the student alone at equal compute and at convergence (no sweeps, no single losses)",
    )
    p.add_argument(
        "--mobile", action="store_true",
        help="the MobileNetV2 student from ImageNet weights, alone and with GID, with parameters and CPU latency "
        "(with --dev: on the development data set)",
    )
    p.add_argument("--frameworks", help=f"comma-separated subset of {','.join(FRAMEWORKS)}")
    p.add_argument("--seeds", type=int, help="training seeds of the student / GID rows")
    p.add_argument("--data-seed", type=int, help="the synthetic data set's seed (development tables: one per data set)")
    p.add_argument("--sweep-trials", type=int, help="trials of each framework's sweep (0: no tuned row)")
    p.add_argument("--converge-epochs", type=int, help="the converged rows' schedule (0: no converged rows)")
    p.add_argument(
        "--keep", type=Path, metavar="DIR",
        help="a folder of the repository that keeps the table's results between sessions (a new session's checkout "
        "has no --out folder): read when --out has no results yet, written after every finished run",
    )
    p.add_argument(
        "--lanes", type=int, default=torch.cuda.device_count() or os.cpu_count() or 1,
        help="runs side by side, each on its share of the CPUs (default: one per GPU, else one per CPU)",
    )
    args = p.parse_args(argv)
    if args.mobile and (args.quick or args.gpu or args.value):
        p.error("--mobile: combine it with --dev only")
    if args.mobile:
        scale = MOBILE_DEV if args.dev else MOBILE
    else:
        scale = GPU if args.gpu else DEV if args.dev else VALUE if args.value else QUICK if args.quick else FULL
    if args.frameworks:
        chosen = tuple(f.strip() for f in args.frameworks.split(","))
        if not set(chosen) <= set(FRAMEWORKS):
            p.error(f"--frameworks: choose from {','.join(FRAMEWORKS)}")
        scale = replace(scale, frameworks=chosen)
    if args.seeds:
        scale = replace(scale, seeds=args.seeds)
    if args.sweep_trials is not None:
        scale = replace(scale, sweep_trials=args.sweep_trials)
    if args.data_seed is not None:
        scale = replace(scale, data_seed=args.data_seed)
    if args.converge_epochs is not None:
        scale = replace(scale, converge_epochs=args.converge_epochs)
    if args.lanes < 1:
        p.error("--lanes: give 1 or more")
    args.scale = scale
    return args


class Results:
    """Finished runs by key, saved after each one so a restart skips them.

    An interrupted benchmark resumes in a later sitting, so the table's wall time is the sum of
    the sittings' (``sittings.json`` beside the results).
    """

    def __init__(self, path: Path, lanes: int, keep: Path | None = None) -> None:
        self.path, self.sittings_path, self.keep = path, path.with_name("sittings.json"), keep
        self.runs: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
        self.sittings = json.loads(self.sittings_path.read_text()) if self.sittings_path.exists() else []
        self.sitting = {"minutes": 0.0, "lanes": lanes, "commit": commit()}  # listed once it finishes a run
        self.started = time.perf_counter()
        self.replaced: dict[str, dict] = {}

    def retrain(self, key: str, why: str | None = None) -> None:
        """Run ``key`` again: its model file is gone (a later sitting on a fresh machine) and a waiting
        run needs it, or ``why``. Its new result keeps the old one's test metrics under ``replaces``."""
        old = self.runs.pop(key)
        self.replaced[key] = {"test": old["test"], "seconds": old["seconds"], **({"why": why} if why else {})}

    def add(self, key: str, result: dict) -> None:
        if key in self.replaced:
            result = {**result, "replaces": self.replaced.pop(key)}
        self.runs[key] = result
        self.path.write_text(json.dumps(self.runs, indent=1))
        self.tick()
        if self.keep is not None:
            for path in (self.path, self.sittings_path):
                shutil.copy2(path, self.keep / path.name)

    def tick(self) -> None:
        """Save this sitting's wall time so far, so that an interrupted sitting still counts."""
        if not self.sittings or self.sittings[-1] is not self.sitting:
            self.sittings.append(self.sitting)
        self.sitting["minutes"] = (time.perf_counter() - self.started) / 60
        self.sittings_path.write_text(json.dumps(self.sittings, indent=1))


def test_metrics(model_path: Path, data_root: Path) -> dict[str, float]:
    """COCO metrics of a model file on the held-out test split."""
    from gid.engine.evaluation import evaluate_model_file

    return evaluate_model_file(model_path, "test", {"root": data_root}, batch_size=16).metrics


# The two kinds of job, as Ray tasks of their own, so that several run side by side on one Ray
# instance. They hold no CPU themselves: the Train workers and Tune trials they start do.
def epoch_slots(history: list[dict], epochs: int) -> list[dict | None]:
    """Each epoch's metrics at its index; a run resumed in a later sitting trained only its last epochs in that
    call, and the earlier ones stay None."""
    slots: list[dict | None] = [None] * epochs
    for metrics in history:
        slots[metrics["epoch"] - 1] = metrics
    return slots


@ray.remote(num_cpus=0)
def train_and_test(key: str, data: dict, data_root: Path) -> dict:
    """Train one config (its run named after ``key``) and evaluate it on the test split."""
    from gid.config import validate
    from gid.engine.trainer import run_training

    config = validate({**data, "run": {**data["run"], "name": key.replace("/", "_")}}, source=key)
    print(f"=== {key}: started", flush=True)
    started, started_at = time.perf_counter(), time.time()
    outcome = run_training(config)
    seconds = time.perf_counter() - started
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))  # evaluate on this run's share too
    first = outcome.history[0] if outcome.history else {}
    by_epoch = epoch_slots(outcome.history, config.train.epochs)
    return {"test": test_metrics(outcome.model_path, data_root), "seconds": seconds,
            "val_ap": outcome.metrics.get("val_ap"), "memory_peak_mb": outcome.metrics.get("memory_peak_mb"),
            "val_ap_by_epoch": [m and m.get("val_ap") for m in by_epoch],
            "epochs": config.train.epochs,
            "train_s": outcome.metrics["train_time_s"],  # training steps alone, over every sitting of the run
            "balance_by_epoch": [m and {k: v for k, v in m.items() if k.startswith("balance_")} for m in by_epoch],
            "startup_s": {  # from run_training's call to the worker, its data, its models, its first step
                "to_worker": first.get("worker_started_at", started_at) - started_at,
                "data": first.get("setup_data_s"), "models": first.get("setup_model_s"),
                "to_first_step": first.get("first_step_at", started_at) - started_at,
            } if first else None,
            "model": str(outcome.model_path)}


@ray.remote(num_cpus=0)
def sweep_and_export(sweep: dict, resume: bool, best_folder: Path, exported: Path) -> dict:
    """Run a sweep and write the config it exports (its finalized winner) to ``exported``."""
    from search.config import SweepConfig
    from search.export import export_best
    from search.sweep import run_sweep

    config = SweepConfig.model_validate(sweep)
    print(f"=== {config.name}: {config.trials} trials started", flush=True)
    started = time.perf_counter()
    run_sweep(config, resume=resume)
    seconds = time.perf_counter() - started
    (best,) = export_best(
        best_folder, tracking_uri=config.tracking.tracking_uri, experiment=config.tracking.experiment, sweep=config.name
    )
    exported.parent.mkdir(parents=True, exist_ok=True)
    exported.write_text(best.path.read_text())
    return {"seconds": seconds, "config": str(exported)}


@dataclass(frozen=True)
class Job:
    key: str
    needs: tuple[str, ...]  # keys whose results this job's config is built from
    lanes: int  # how many of the parallel lanes it occupies while it runs
    launch: Callable[[], ray.ObjectRef]  # called once its needs are met


class Bench:
    """The table's runs as jobs with dependencies, run ``lanes`` at a time on one Ray instance.

    At these sizes a training run gains little from a second thread (its steps are small and
    partly serial), so two one-thread runs side by side finish far sooner than two two-thread
    runs one after another.
    """

    def __init__(self, out: Path, scale: Scale, lanes: int, keep: Path | None = None) -> None:
        self.out, self.scale, self.lanes = out, scale, lanes
        self.cpus_per_run = max(1, (os.cpu_count() or 1) // lanes)
        self.results = Results(out / "results.json", lanes, keep)
        self.configs = out / "configs"
        self.configs.mkdir(parents=True, exist_ok=True)
        # fetched once, before any run needs it (the index is asked once per machine: benchmarks.assets)
        self.student_weights = mobilenet_v2_imagenet() if scale.pretrained_student else None

    def key(self, framework: str, row: str, seed: int | None = 0) -> str:
        """A student run's key: ``framework/row/seed``, the row with the scale's prefix (no seed: ``framework/row``)."""
        return f"{framework}/{self.scale.student_rows}{row}" + ("" if seed is None else f"/{seed}")

    def base(self, framework: str, role: str) -> dict:
        s = self.scale
        teacher = role == "teacher"
        model = {
            "framework": framework,
            "backbone": s.teacher_backbone if teacher else s.student_backbone,
            "fpn_channels": s.teacher_fpn if teacher else s.student_fpn,
        }
        if not teacher and self.student_weights:  # on the teacher's levels, which GID's losses pair one by one
            model |= {"backbone_weights": str(self.student_weights), "fpn_levels": "resnet"}
        return {
            "data": {"root": str(self.out / "data"), "image_size": s.image_size, "batch_size": BATCH},
            "model": model,
            "train": {
                "epochs": s.teacher_epochs if teacher else s.student_epochs, "lr": s.lr, "schedule": "cosine",
                "warmup_iters": WARMUP_ITERS, "log_every": 50,
            },
            "run": {"storage_path": str(self.out / "runs")},
            "scaling": {"cpus_per_worker": self.cpus_per_run},
        }

    def write_config(self, name: str, data: dict) -> Path:
        path = self.configs / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def training(self, key: str, config: Callable[[], dict], needs: tuple[str, ...] = ()) -> Job:
        return Job(key, needs, 1, lambda: train_and_test.remote(key, config(), self.out / "data"))

    def student_config(self, framework: str, seed: int) -> dict:
        config = self.base(framework, "student")
        config["train"]["seed"] = seed
        return config

    def gid_config(self, framework: str, seed: int = 0, **distill) -> dict:
        """The student distilled at the product's defaults, with ``distill`` set on top."""
        teacher = self.results.runs[f"{framework}/teacher/0"]["model"]
        return {**self.student_config(framework, seed), "distill": {"teacher": teacher, **distill}}

    def spec_weights_config(self, framework: str, seed: int) -> dict:
        """gid-spec.md's weights as they are (DistillConfig's defaults with ``balance.mode: fixed``)."""
        return self.gid_config(framework, seed, balance={"mode": "fixed"})

    def candidate_config(self, framework: str, seed: int, candidate: str) -> dict:
        return self.gid_config(framework, seed, balance=CANDIDATES[candidate][1])

    def equal_compute_config(self, framework: str, seed: int) -> dict:
        """The student alone on as many epochs as the same seed's gid_default run trained for in time (the
        student's own time per epoch from its run), on the same schedule shape: what GID's cost buys plainly."""
        runs = self.results.runs
        per_epoch = runs[self.key(framework, "student", seed)]["train_s"] / self.scale.student_epochs
        gid_s = runs[self.key(framework, "gid_default", seed)]["train_s"]
        epochs = max(self.scale.student_epochs, round(gid_s / per_epoch))
        config = self.student_config(framework, seed)
        config["train"]["epochs"] = epochs
        return config

    def converged_config(self, config: dict) -> dict:
        config["train"]["epochs"] = self.scale.converge_epochs
        return config

    def sweep(self, framework: str) -> Job:
        """A TPE + ASHA sweep on the validation split, the spec's defaults as its first trial."""
        s = self.scale
        tracking = {"tracking_uri": f"sqlite:///{self.out / 'mlflow.db'}", "experiment": "gid-bench-effect"}
        name = f"effect-{s.student_rows}{framework}"

        def launch() -> ray.ObjectRef:
            base = self.write_config(f"{s.student_rows}{framework}_gid", self.gid_config(framework))
            baseline = self.results.runs[self.key(framework, "student")]["model"]  # the table's own: the sweep trains none
            sweep = {
                "name": name,
                "frameworks": {framework: {"config": str(base), "baseline": baseline}},
                "trials": s.sweep_trials,
                "resources": {
                    "workers_per_trial": 1, "cpus_per_worker": self.cpus_per_run, "max_concurrent_trials": self.lanes,
                },
                "scheduler": {"type": "asha"},  # the default grace period: two thirds of the schedule
                "sampler": {"type": "tpe", "seed": 0},
                "finalize": {"top": s.finalize_top, "seeds": s.finalize_seeds},
                "tracking": tracking,
                "storage_path": str(self.out / "sweeps"),
            }
            resume = (self.out / "sweeps" / name).exists()
            best = self.out / "best"
            exported = f"{s.student_rows}{framework}"
            return sweep_and_export.remote(sweep, resume, best / exported, best / f"{exported}.yaml")

        needs = (f"{framework}/teacher/0", self.key(framework, "student"))
        return Job(self.key(framework, "sweep", None), needs, self.lanes, launch)

    def tuned_config(self, framework: str, seed: int) -> dict:
        from gid.config import load_config

        exported = load_config(Path(self.results.runs[self.key(framework, "sweep", None)]["config"])).to_dict()
        base = self.base(framework, "student")  # where it runs and on how many threads, like every other row
        exported["train"]["seed"] = seed
        return {**exported, "run": base["run"], "scaling": base["scaling"]}

    def jobs(self) -> list[Job]:
        """Every run of the table, the long chains (teacher, then the runs that need it) first."""
        s = self.scale
        teachers, students, distilled, converged, sweeps, tuned = [], [], [], [], [], []
        for framework in s.frameworks:
            teacher = f"{framework}/teacher/0"
            key = partial(self.key, framework)
            teachers.append(self.training(teacher, lambda f=framework: self.base(f, "teacher")))
            for seed in range(s.seeds):
                students.append(self.training(
                    key("student", seed), lambda f=framework, seed=seed: self.student_config(f, seed)
                ))
                if s.spec_weights:
                    distilled.append(self.training(
                        key("gid_spec_weights", seed),
                        lambda f=framework, seed=seed: self.spec_weights_config(f, seed), (teacher,),
                    ))
                if s.candidates:
                    distilled += [self.training(
                        key(candidate, seed),
                        lambda f=framework, seed=seed, c=candidate: self.candidate_config(f, seed, c), (teacher,),
                    ) for candidate in CANDIDATES]
                else:
                    distilled.append(self.training(
                        key("gid_default", seed), lambda f=framework, seed=seed: self.gid_config(f, seed), (teacher,),
                    ))
                if s.gid_dynamic:
                    distilled.append(self.training(
                        key("gid_dynamic", seed),
                        lambda f=framework, seed=seed: self.gid_config(f, seed, balance={"mode": "dynamic"}), (teacher,),
                    ))
                if s.equal_compute:
                    students.append(self.training(
                        key("student_equal_compute", seed),
                        lambda f=framework, seed=seed: self.equal_compute_config(f, seed),
                        (key("student", seed), key("gid_default", seed)),
                    ))
            for seed in range(s.converge_seeds if s.converge_epochs else 0):
                converged.append(self.training(
                    key("converged_student", seed),
                    lambda f=framework, seed=seed: self.converged_config(self.student_config(f, seed)),
                ))
                converged.append(self.training(
                    key("converged_gid_default", seed),
                    lambda f=framework, seed=seed: self.converged_config(self.gid_config(f, seed)), (teacher,),
                ))
            if s.sweep_trials:
                sweeps.append(self.sweep(framework))
            if s.single_losses:
                for loss in SINGLE_LOSSES:
                    switches = {other: {"enabled": other == loss} for other in SINGLE_LOSSES}
                    distilled.append(self.training(
                        key(f"{loss}_only"), lambda f=framework, sw=switches: self.gid_config(f, **sw), (teacher,)
                    ))
            for seed in range(s.seeds if s.sweep_trials else 0):
                tuned.append(self.training(
                    key("gid_tuned", seed), lambda f=framework, seed=seed: self.tuned_config(f, seed),
                    (key("sweep", None),),
                ))
        # Longest teacher first (the framework order puts the fastest learner first), then the rows
        # that test the defaults, the timed ones (GID's time sets the equal-compute rows') before the
        # long converged runs; the sweeps, which hold every lane, after them.
        return teachers[::-1] + distilled + students + converged + sweeps[::-1] + tuned[::-1]

    def run(self) -> None:
        """Start every ready job that fits in the free lanes, in the order of ``jobs()``; repeat."""
        self.retrain_other_schedules()
        waiting = [job for job in self.jobs() if job.key not in self.results.runs]
        for need in {need for job in waiting for need in job.needs}:
            done = self.results.runs.get(need)
            if done and "model" in done and not Path(done["model"]).exists():
                print(f"=== {need}: its model file is gone, training it again", flush=True)
                self.results.retrain(need)
        waiting = [job for job in self.jobs() if job.key not in self.results.runs]
        running: dict[ray.ObjectRef, Job] = {}
        while waiting or running:
            free = self.lanes - sum(job.lanes for job in running.values())
            for job in list(waiting):
                if job.lanes <= free and all(need in self.results.runs for need in job.needs):
                    running[job.launch()] = job
                    waiting.remove(job)
                    free -= job.lanes
            if not running:
                raise RuntimeError(f"jobs whose needs never finish: {[job.key for job in waiting]}")
            finished, _ = ray.wait(list(running), num_returns=1, timeout=60)
            self.results.tick()
            if not finished:
                continue
            (done,) = finished
            job = running.pop(done)
            self.results.add(job.key, ray.get(done))
            left = len(waiting) + len(running)
            print(f"=== {job.key}: done in {self.results.runs[job.key]['seconds'] / 60:.1f} min; {left} jobs left",
                  flush=True)

    def retrain_other_schedules(self) -> None:
        """Converged rows trained on another schedule than this scale's are trained again: their run folders,
        which Ray Train would resume, are removed, their old test metrics kept under ``replaces``."""
        for job in self.jobs():
            done = self.results.runs.get(job.key)
            row = job.key.split("/")[1]
            if done and row.endswith(("converged_student", "converged_gid_default")) and done["epochs"] != self.scale.converge_epochs:
                print(f"=== {job.key}: trained {done['epochs']} epochs, training it {self.scale.converge_epochs}", flush=True)
                self.results.retrain(job.key, f"{done['epochs']} epochs before, {self.scale.converge_epochs} now")
                shutil.rmtree(self.out / "runs" / job.key.replace("/", "_"), ignore_errors=True)

    def measure_costs(self) -> None:
        """Each row's params and CPU latency_ms, as ``gid eval`` measures them on its model file: one row after another
        once no run trains, every row on the same threads."""
        from gid.models import load_model

        torch.set_num_threads(LATENCY_THREADS)
        for key, result in list(self.results.runs.items()):
            if "latency_ms" in result or "model" not in result:
                continue
            if not Path(result["model"]).exists():
                print(f"=== {key}: its model file is gone, its cost is not measured", flush=True)
                continue
            model, config, _ = load_model(Path(result["model"]))
            self.results.add(key, {**result, **cpu_cost(model, config.data.image_size, self.scale.latency_runs)})


STUDENT_ROWS = (
    ("student", "student alone"),
    ("gid_spec_weights", "GID, spec weights"),
    ("gid_default", "GID, product defaults"),
    ("feature_only", "feature loss only"),
    ("relation_only", "relation loss only"),
    ("response_only", "response loss only"),
    ("gid_tuned", "GID, tuned"),
    ("gid_dynamic", "GID, dynamic balance"),
    ("student_equal_compute", "student alone, GID's training time"),
    ("converged_student", "student alone, converged"),
    ("converged_gid_default", "GID, product defaults, converged schedule"),
    *((name, label) for name, (label, _) in CANDIDATES.items()),
    *EARLIER_CANDIDATES.items(),
)
#: The teacher, then the student's rows, then the same of the MobileNetV2 student (MOBILE's).
ROWS = (
    ("teacher", "teacher"), *STUDENT_ROWS,
    *((MOBILE_ROWS + row, f"MobileNetV2 from ImageNet, {label}") for row, label in STUDENT_ROWS),
)


#: The student row each row's Δ AP is taken against, where it is not the 3-epoch ``student``.
COMPARED_WITH = {"converged_student": "converged_student", "converged_gid_default": "converged_student"}


def reference_row(row: str, scale: Scale) -> str:
    """The row ``row``'s Δ AP is taken against: its own student alone (a converged run: the converged one; the
    teacher: the scale's student)."""
    prefix = scale.student_rows if row == "teacher" else MOBILE_ROWS if row.startswith(MOBILE_ROWS) else ""
    return prefix + COMPARED_WITH.get(row.removeprefix(prefix), "student")


def measured(runs: dict[str, dict]) -> list[str]:
    """The frameworks with results: sittings may each run a subset (``--frameworks``)."""
    return [framework for framework in FULL.frameworks if any(key.startswith(f"{framework}/") for key in runs)]


def summarise(runs: dict[str, dict], framework: str, row: str) -> dict | None:
    found = [r for key, r in runs.items() if key.startswith(f"{framework}/{row}/")]
    if not found:
        return None
    stats = {}
    for metric in METRICS:
        values = [100 * r["test"][metric] for r in found]
        stats[metric] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None)
    stats["seeds"] = len(found)
    stats["minutes"] = statistics.mean(r["seconds"] for r in found) / 60
    stats["epochs"] = "/".join(sorted({str(r["epochs"]) for r in found if "epochs" in r}, key=int)) or "–"
    if all("latency_ms" in r for r in found):  # one architecture per row: the same parameters in every run
        latency = [r["latency_ms"] for r in found]
        stats["params"] = found[0]["params"]
        stats["latency_ms"] = (statistics.mean(latency), statistics.stdev(latency) if len(latency) > 1 else None)
    return stats


def fmt(mean: float, std: float | None) -> str:
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        return head.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def retrained(key: str, run: dict) -> str:
    """The table's note on a run trained again (``Results.retrain``): why, and its test AP before and now."""
    old = run["replaces"]
    # Without a reason recorded, its model file was gone: a teacher, whose dependents may have learnt from the first.
    why, after = (old["why"], "") if "why" in old else ("its model file was gone", "; the rows finished before it learnt from the first")
    return f"- {key} re-trained in a later sitting ({why}): test AP {100 * old['test']['ap']:.2f} then, {100 * run['test']['ap']:.2f} now{after}"


def render(runs: dict[str, dict], scale: Scale, argv: list[str], sittings: list[dict]) -> str:
    s = scale
    train, data = TrainConfig(), DataConfig()  # the values the runs leave at their defaults
    lines = [
        "### GID effect on the held-out test split",
        "",
        f"- command: `python -m benchmarks.effect {' '.join(argv)}`",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, "
        f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; torch {torch.__version__}",
        f"- commit: {', '.join(dict.fromkeys(sitting['commit'] for sitting in sittings))}; wall time {sum(sitting['minutes'] for sitting in sittings):.0f} min in "
        f"{len(sittings)} sitting(s) of {', '.join(str(sitting['lanes']) for sitting in sittings)} run(s) side by side",
        f"- data: synthetic (seed {s.data_seed}), {s.train_images} train / {s.val_images} val / {s.test_images} test images of "
        f"{s.image_size} px, 1–{s.max_objects} objects of {s.min_object_size:g} px to half the image",
        f"- teacher {s.teacher_backbone} FPN {s.teacher_fpn}, {s.teacher_epochs} epochs; student "
        f"{s.student_backbone} FPN {s.student_fpn}, {s.student_epochs} epochs; SGD lr {s.lr}, cosine, batch {BATCH}",
        *([f"- teacher's recipe: {s.teacher_backbone} FPN {s.teacher_fpn} from random weights, {s.teacher_epochs} epochs "
           f"of SGD lr {s.lr} (momentum {train.momentum}, weight decay {train.weight_decay:g}, gradients clipped at "
           f"{train.clip_grad_norm:g}), {WARMUP_ITERS} warm-up iterations then cosine, batch {BATCH}, horizontal flips "
           f"p {data.hflip_prob}",
           f"- student: {s.student_backbone} from torchvision's ImageNet weights (benchmarks/assets.py), its FPN on the "
           "teacher's levels (`fpn_levels: resnet`), BatchNorm frozen and its last 3 stages trained (gid's `auto`)"]
          if s.pretrained_student else []),
        *([f"- cost: parameters, and CPU latency per {s.image_size} px image: the median of {s.latency_runs} timed calls "
           f"after {WARMUP_RUNS} warm-ups on {LATENCY_THREADS} thread(s), measured on each model file as `gid eval` "
           "does, one after another once all training was done"] if s.latency_runs else []),
        *([f"- tuned: TPE + ASHA sweep of {s.sweep_trials} trials on the val split, its top {s.finalize_top} finalized "
           f"over {s.finalize_seeds} seeds, the winner exported and re-trained"] if s.sweep_trials else []),
        *[retrained(key, r) for key, r in runs.items() if "replaces" in r],
        "",
        "| framework | row | seeds | epochs | AP | AP50 | AP75 | APs | "
        + ("params (M) | CPU ms / image | × faster than teacher | " if s.latency_runs else "")
        + "train min / run | Δ AP vs student |",
        "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (3 if s.latency_runs else 0) + "---:|---:|",
    ]
    for framework in measured(runs):
        teacher = summarise(runs, framework, "teacher")
        for row, label in ROWS:
            stats = summarise(runs, framework, row)
            if stats is None:
                continue
            reference = reference_row(row, s)
            student = summarise(runs, framework, reference)
            delta = f"{stats['ap'][0] - student['ap'][0]:+.1f}" if student and row != reference else ""
            cells = " | ".join(fmt(*stats[m]) for m in METRICS)
            if s.latency_runs:
                cells += " | " + cost_cells(stats, teacher if row != "teacher" else None)
            lines.append(
                f"| {framework} | {label} | {stats['seeds']} | {stats['epochs']} | {cells} | {stats['minutes']:.1f} "
                f"| {delta} |"
            )
    return "\n".join(lines + early_ranking(runs, scale)) + "\n"


def cost_cells(stats: dict, teacher: dict | None) -> str:
    """A row's parameters (M), CPU latency (ms) and how many times faster than ``teacher`` (– where not measured)."""
    if "latency_ms" not in stats:
        return "– | – | –"
    latency = stats["latency_ms"][0]
    faster = f"{teacher['latency_ms'][0] / latency:.1f}×" if teacher and "latency_ms" in teacher else ""
    return f"{stats['params'] / 1e6:.2f} | {fmt(*stats['latency_ms'])} | {faster}"


def early_ranking(runs: dict[str, dict], scale: Scale) -> list[str]:
    """How well val AP after epoch k ranks a framework's student runs by their final val AP (Spearman).

    ASHA stops trials on their AP after the grace period; where that ranks runs no better than
    noise, pruning throws away trials that were not worse.
    """
    from scipy.stats import spearmanr

    epochs = scale.student_epochs
    lines = ["", f"Val AP after epoch k against final val AP (epoch {epochs}), student runs of each framework:", "",
             "| framework | runs | " + " | ".join(f"Spearman, k = {k}" for k in range(1, epochs)) + " |",
             "|---|---:|" + "---:|" * (epochs - 1)]
    for framework in measured(runs):
        curves = [r["val_ap_by_epoch"] for key, r in runs.items()
                  if key.startswith(f"{framework}/") and "/teacher/" not in key and len(r.get("val_ap_by_epoch", [])) == epochs
                  and None not in r["val_ap_by_epoch"]]
        if len(curves) < 3:
            continue
        final = [curve[-1] for curve in curves]
        cells = [f"{spearmanr([curve[k - 1] for curve in curves], final).statistic:+.2f}" for k in range(1, epochs)]
        lines.append(f"| {framework} | {len(curves)} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 5 else []


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frameworks = measured(runs)
    fig, axes = plt.subplots(1, len(frameworks), figsize=(4.5 * len(frameworks), 3.6), squeeze=False)
    for ax, framework in zip(axes[0], frameworks):
        labels, means, errors = [], [], []
        for row, label in ROWS:
            stats = summarise(runs, framework, row)
            if stats:
                labels.append(label.replace(", ", "\n"))
                means.append(stats["ap"][0])
                errors.append(stats["ap"][1] or 0.0)
        ax.bar(range(len(means)), means, yerr=errors, capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(means)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(framework)
        ax.set_ylabel("test AP")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


CURVES = (("teacher", "teacher"), ("converged_student", "student alone"), ("converged_gid_default", "GID, product defaults"))


def plot_curves(runs: dict[str, dict], path: Path) -> bool:
    """Val AP per epoch of the teacher and the convergence rows (mean over seeds, each seed faint); False if none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frameworks = [f for f in measured(runs) if any(k.startswith(f"{f}/converged_") for k in runs)]
    if not frameworks:
        return False
    fig, axes = plt.subplots(1, len(frameworks), figsize=(4.5 * len(frameworks), 3.4), squeeze=False)
    for ax, framework in zip(axes[0], frameworks):
        for (row, label), color in zip(CURVES, ("#555555", "#4c72b0", "#dd8452")):
            # epoch -> val AP per seed; a seed resumed in a later sitting is known from its resumed epoch on
            curves = [{epoch: 100 * ap for epoch, ap in enumerate(r["val_ap_by_epoch"], start=1) if ap is not None}
                      for k, r in runs.items() if k.startswith(f"{framework}/{row}/")]
            for curve in curves:
                ax.plot(list(curve), list(curve.values()), color=color, alpha=0.3, linewidth=0.8)
            epochs = sorted({epoch for curve in curves for epoch in curve})
            if epochs:  # the mean of the seeds known at each epoch
                mean = [statistics.mean(c[epoch] for c in curves if epoch in c) for epoch in epochs]
                ax.plot(epochs, mean, color=color, label=label)
        ax.set_title(framework)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val AP")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


#: What the runs of one folder share, its data set and its teachers: a sitting in any mode may add rows to a folder
#: only at the same values (so --mobile takes the full table's teachers, and nothing that differs).
SHARED = (
    "train_images", "val_images", "test_images", "image_size", "max_objects", "min_object_size", "data_seed",
    "teacher_backbone", "teacher_fpn", "teacher_epochs", "lr",
)


def check_folder(out: Path, scale: Scale) -> None:
    """Stop before a sitting whose data set or teacher differs from the runs already in ``out``."""
    path = out / "scale.json"
    before = json.loads(path.read_text()) if path.exists() else {}
    differs = [name for name in SHARED if name in before and before[name] != getattr(scale, name)]
    if differs:
        sys.exit(f"{out} holds runs of another data set or teacher ({', '.join(differs)} differ): pass another --out")


KEPT = ("results.json", "sittings.json", "scale.json")


def take_kept(keep: Path, out: Path) -> None:
    """Start ``out`` from the results ``keep`` holds (an earlier session's), unless it has results of its own.
    A run whose model file is gone is trained again when a waiting run needs it (``Results.retrain``)."""
    keep.mkdir(parents=True, exist_ok=True)
    if not (out / "results.json").exists():
        for name in KEPT:
            if (keep / name).exists():
                shutil.copy2(keep / name, out / name)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    scale, out = args.scale, args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.keep is not None:
        take_kept(args.keep, out)
    check_folder(out, scale)
    (out / "scale.json").write_text(json.dumps(asdict(scale), indent=1))
    if args.keep is not None:
        shutil.copy2(out / "scale.json", args.keep / "scale.json")
    from gid.data import make_synthetic

    if not (out / "data" / "annotations" / "instances_test.json").exists():
        make_synthetic(
            out / "data", train=scale.train_images, val=scale.val_images, test=scale.test_images,
            image_size=scale.image_size, max_objects=scale.max_objects, min_object_size=scale.min_object_size,
            seed=scale.data_seed,
        )
    from gid.engine.trainer import ensure_ray

    ensure_ray()
    bench = Bench(out, scale, args.lanes, args.keep)
    bench.run()
    if scale.latency_runs:
        bench.measure_costs()
    text = render(bench.results.runs, scale, argv, bench.results.sittings)
    (out / "effect.md").write_text(text)
    plot(bench.results.runs, out / "effect.png")
    curves = plot_curves(bench.results.runs, out / "convergence.png")
    print("\n" + text)
    print(f"table: {out / 'effect.md'}   plot: {out / 'effect.png'}" + (f"   curves: {out / 'convergence.png'}" if curves else ""))


if __name__ == "__main__":
    main()
