"""The sweep's control plane as the number of trials grows: does anything cost more per trial in a bigger sweep?

For each ``--trials`` count it runs one real sweep (``run_sweep``: Tune, Optuna's TPE, ASHA, MLflow on SQLite, the
report) of near-empty trials, each in a process of its own (``--one``), so that every count starts from a fresh
driver and a fresh Ray: a trial trains a RetinaNet of a few thousand weights (defined here, as a user's
``model.builder``) for one step of 4 images of 64 px and evaluates 2. It reports, per trial, the driver's CPU time
(Tune's loop, Optuna, the MLflow callback, the report: everything this process does; the trials run in Ray's
processes) and the sweep's wall time, the driver's peak memory, and MLflow's rows.

Target: the driver's time per trial at 256 trials within 1.5× of that at 16 (nothing quadratic in the trials).

    python -m benchmarks.sweep_scale --trials 16,64,256 --concurrent 4 --out runs/bench-sweep-scale
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path

import torch
import yaml
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from benchmarks.step_overhead import commit, cpu_name

REPO = Path(__file__).resolve().parent.parent
TARGET = 1.5
IMAGE_SIZE, FPN = 64, 16


def tiny_retinanet(num_classes: int, width: int = 4) -> RetinaNet:
    """A RetinaNet of a few thousand weights: its trial's step costs next to nothing beside the control plane."""
    def stage(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    body = nn.Sequential(OrderedDict(
        stem=nn.Sequential(stage(3, width), stage(width, width)),
        c3=stage(width, 2 * width), c4=stage(2 * width, 4 * width), c5=stage(4 * width, 8 * width),
    ))
    backbone = BackboneWithFPN(
        body, {"c3": "0", "c4": "1", "c5": "2"}, [2 * width, 4 * width, 8 * width], FPN,
        extra_blocks=LastLevelP6P7(FPN, FPN),
    )
    sizes = tuple((s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)) for s in (16, 32, 64, 128, 256))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    head = RetinaNetHead(FPN, 9, num_classes, norm_layer=partial(nn.GroupNorm, 4))
    return RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, min_size=IMAGE_SIZE, max_size=IMAGE_SIZE)


def tiny_retinanet_teacher(num_classes: int) -> RetinaNet:
    return tiny_retinanet(num_classes, width=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", default="16,64,256", help="comma-separated trial counts, one sweep each")
    p.add_argument("--concurrent", type=int, default=4, help="max_concurrent_trials")
    p.add_argument("--out", type=Path, default=Path("runs/bench-sweep-scale"))
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # run one sweep of this many trials in this process
    return p.parse_args(argv)


def prepare(out: Path) -> Path:
    """The data, the teacher's model file and the base distill config (once per --out)."""
    from gid.config import validate
    from gid.data import build_dataset, make_synthetic
    from gid.models import save_model

    config_path = out / "gid.yaml"
    if config_path.is_file():
        return config_path
    make_synthetic(out / "data", train=4, val=2, image_size=IMAGE_SIZE, max_objects=1, min_object_size=16, seed=0)
    model = {"framework": "retinanet", "builder": "benchmarks.sweep_scale:tiny_retinanet"}
    base = {
        "data": {"root": str(out / "data"), "image_size": IMAGE_SIZE, "batch_size": 4},
        "model": model,
        "train": {"epochs": 1, "warmup_iters": 0, "latency_runs": 0},
        "distill": {"teacher": str(out / "teacher.pt")},
    }
    # Untrained models with an AP on file: the sweep measures no teacher and, given a baseline, trains no student
    # alone, so that only the trials' part grows with their number.
    num_classes = build_dataset(validate(base).data, "train", train=False).num_classes
    torch.manual_seed(0)
    for role, builder in (("teacher", tiny_retinanet_teacher), ("baseline", tiny_retinanet)):
        config = validate({**base, "model": {**model, "builder": f"benchmarks.sweep_scale:{builder.__name__}"}})
        save_model(builder(num_classes), config, num_classes, out / f"{role}.pt", metrics={"val_ap": 0.0})
    config_path.write_text(yaml.safe_dump(base, sort_keys=False))
    return config_path


def run_one(trials: int, concurrent: int, out: Path) -> dict:
    from search.config import load_sweep
    from search.sweep import run_sweep

    config = prepare(out)
    folder = out / f"trials_{trials}"
    sweep_file = folder / "sweep.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    sweep_file.write_text(yaml.safe_dump({
        "name": f"scale-{trials}",
        "frameworks": {"retinanet": {"config": str(config), "baseline": str(out / "baseline.pt")}},
        "trials": trials,
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 2 / concurrent, "max_concurrent_trials": concurrent},
        "objective": {"metric": "val_ap", "mode": "max", "latency_runs": 0},
        "tracking": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "scale"},
        "storage_path": str(folder / "sweeps"),
    }, sort_keys=False))
    sweep = load_sweep(sweep_file)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    outcome = run_sweep(sweep)
    cpu, wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
    finished = sum(len(framework.results) for framework in outcome.frameworks)
    with sqlite3.connect(folder / "mlflow.db") as db:
        rows = {table: db.execute(f"select count(*) from {table}").fetchone()[0] for table in ("runs", "metrics", "params", "tags")}
    return {
        "trials": trials, "results": finished, "concurrent": concurrent,
        "driver_cpu_s": cpu, "wall_s": wall,
        "driver_cpu_per_trial_s": cpu / trials, "wall_per_trial_s": wall / trials,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mlflow_rows": rows,
    }


def render(results: list[dict], argv: list[str]) -> str:
    first = results[0]
    lines = [
        f"### Sweep control plane: {', '.join(str(r['trials']) for r in results)} trials, {first['concurrent']} at a time",
        "",
        f"- command: `python -m benchmarks.sweep_scale {' '.join(argv)}`",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores; commit {commit()}",
        "",
        "| trials | driver CPU s | per trial | × at the fewest | wall s | per trial | driver peak MB | MLflow runs | metric rows |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = r["driver_cpu_per_trial_s"] / first["driver_cpu_per_trial_s"]
        lines.append(
            f"| {r['trials']} | {r['driver_cpu_s']:.1f} | {r['driver_cpu_per_trial_s']:.3f} | **{ratio:.2f}×** | "
            f"{r['wall_s']:.0f} | {r['wall_per_trial_s']:.2f} | {r['driver_peak_rss_mb']:.0f} | "
            f"{r['mlflow_rows']['runs']} | {r['mlflow_rows']['metrics']} |"
        )
    last = results[-1]
    ratio = last["driver_cpu_per_trial_s"] / first["driver_cpu_per_trial_s"]
    lines += ["", f"Target: the driver's CPU time per trial at {last['trials']} trials within {TARGET}× of that at "
              f"{first['trials']}: {ratio:.2f}×, **{'met' if ratio <= TARGET else 'missed'}**."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.out = args.out.resolve()
    if args.one:
        print(json.dumps(run_one(args.one, args.concurrent, args.out)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    done = json.loads(results_file.read_text()) if results_file.is_file() else {}
    # The trials import this module (their model.builder) in Ray's processes, which inherit this environment.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for trials in map(int, args.trials.split(",")):
        if str(trials) in done:
            continue
        print(f"a sweep of {trials} trials ...", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "benchmarks.sweep_scale", "--one", str(trials),
                   "--concurrent", str(args.concurrent), "--out", str(args.out)]
        with open(args.out / f"trials_{trials}.log", "w") as log:
            done_run = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True, check=False)
        if done_run.returncode != 0:
            sys.exit(f"the sweep of {trials} trials failed: see {args.out / f'trials_{trials}.log'}")
        done[str(trials)] = json.loads(done_run.stdout.strip().splitlines()[-1])
        results_file.write_text(json.dumps(done, indent=2))
    print(render([done[str(t)] for t in map(int, args.trials.split(","))], argv))


if __name__ == "__main__":
    main()
