"""Search efficiency: TPE + ASHA against random search without pruning, at the same trial-epoch budget.

Each strategy runs as ordinary `gid sweep`s (``run_sweep``) over the default search space on the
same GID base config; each experiment ends once its trials have trained ``--budget`` epochs in all
(the sweep file's ``budget_epochs``). TPE + ASHA is the product's defaults: random start-up trials,
a quarter of the sweep's ``trials`` (here as many as the budget can hold), and ASHA stopping trials
only in the last third of their schedule (Optuna 5's TPE: multivariate, constant liar); ``tpe-independent+asha``
is the same with Optuna 4's TPE (a value at a time, running trials ignored). For every sweep seed it records the
best validation AP of a trial that trained the full schedule, the best-so-far curve over the epochs spent, and
when each TPE sweep's curve first reached random search's final best.

The same sweeps give the trial overhead: seconds from a trial's start to its first training step,
and the share of the sweep's slot time (wall time × concurrent trials) not spent in training steps.

    python -m benchmarks.search_efficiency --out runs/bench-search --teacher runs/bench-effect/runs/fcos_teacher_0/model.pt
    python -m benchmarks.search_efficiency ... --strategies random   # one strategy; finished sweeps are kept
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

from benchmarks.effect import FULL

STRATEGIES = {
    "tpe+asha": {"sampler": {"type": "tpe"}, "scheduler": "asha"},  # the product's defaults, start-up and grace `auto`
    "random": {"sampler": {"type": "random"}, "scheduler": "none"},
    # Optuna 4's TPE (one value at a time, running trials ignored): what multivariate TPE and the constant liar add
    "tpe-independent+asha": {"sampler": {"type": "tpe", "multivariate": False, "constant_liar": False}, "scheduler": "asha"},
}
# Where a trial's time from its start to its first training step goes: Tune and Ray Train starting the
# worker (controller, placement group, worker process), the data sets, the models (teacher load included),
# and the rest (DDP set-up, resuming, the first batch).
STARTUP_PARTS = ("to_worker", "data", "models", "rest")
# Where a sweep's slot time (wall time x concurrent trials) goes, as shares: the trials' training steps,
# their per-epoch evaluation and checkpoints, their start-up (trial start -> first step), and the rest
# (Tune between trials, shutting runs down, a slot left idle at the end).
SLOT_PARTS = ("training", "evaluation", "checkpoints", "start-up", "rest")
COLOURS = {"tpe+asha": "#c44e52", "random": "#4c72b0", "tpe-independent+asha": "#dd8452"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher", type=Path, required=True, help="a teacher model file (e.g. from benchmarks/effect.py)")
    p.add_argument(
        "--student-weights", type=Path,
        help="start every trial from this student model file (e.g. the effect benchmark's student alone), so "
        "short trials reach AP values that tell settings apart",
    )
    p.add_argument(
        "--baseline", type=Path,
        help="the student trained alone (e.g. the effect benchmark's), shown in each summary; without it every "
        "sweep trains one itself before its trials (outside the epoch budget)",
    )
    p.add_argument("--framework", default="fcos")
    p.add_argument("--seeds", type=int, default=3, help="sweep seeds per strategy")
    p.add_argument("--epochs", type=int, default=3, help="epochs of a full trial")
    p.add_argument("--budget", type=int, default=12, help="trial-epochs per sweep")
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--concurrent", type=int, default=2, help="trials at a time (one CPU each)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated subset of {','.join(STRATEGIES)}")
    args = p.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",")]
    if not set(args.strategies) <= set(STRATEGIES):
        p.error(f"--strategies: choose from {','.join(STRATEGIES)}")
    return args


def write_base(args: argparse.Namespace, data_root: Path) -> Path:
    from gid.models import read_checkpoint

    teacher = read_checkpoint(args.teacher)["config"]
    base = {
        "data": {**teacher["data"], "root": str(data_root)},
        "model": {"framework": args.framework, "backbone": "resnet18", "fpn_channels": 64,
                  "weights": str(args.student_weights.resolve()) if args.student_weights else None},
        "train": {"epochs": args.epochs, "lr": teacher["train"]["lr"], "schedule": "cosine", "warmup_iters": 50,
                  "log_every": 1000},
        "distill": {"teacher": str(args.teacher.resolve())},
    }
    path = args.out / "base.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def run_strategy(args: argparse.Namespace, base: Path, strategy: str, seed: int) -> dict:
    from search.config import Scheduler, SweepConfig
    from search.report import trial_rows
    from search.sweep import run_sweep

    choice = STRATEGIES[strategy]
    name = f"{strategy.replace('+', '-')}-seed{seed}"
    shortest = Scheduler().grace_period_for(args.epochs) if choice["scheduler"] == "asha" else args.epochs
    sweep = SweepConfig.model_validate({
        "name": name,
        "frameworks": {args.framework: {"config": str(base), "baseline": args.baseline}},
        "trials": args.budget // shortest,  # as many as the budget holds: the epoch budget ends the experiment
        "budget_epochs": args.budget,
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": args.concurrent},
        "scheduler": {"type": choice["scheduler"]},  # ASHA's grace period: the sweep's default
        "sampler": {**choice["sampler"], "seed": seed, "paper_defaults_first": False},
        "tracking": {"tracking_uri": f"sqlite:///{args.out / 'mlflow.db'}", "experiment": "gid-bench-search"},
        "storage_path": str(args.out / "sweeps"),
    })
    started = time.perf_counter()
    (outcome,) = run_sweep(sweep, resume=(args.out / "sweeps" / name).exists()).frameworks
    wall = time.perf_counter() - started
    rows = trial_rows(outcome, "val_ap")
    results = sorted(outcome.results, key=lambda r: (r.metrics or {}).get("timestamp", 0))
    curve, spent, best = [], 0, 0.0
    for result in results:  # in order of their last report: what the search had found by then
        metrics = result.metrics or {}
        spent += int(metrics.get("epoch", 0))
        if metrics.get("epoch") == args.epochs and metrics.get("val_ap") is not None:
            best = max(best, metrics["val_ap"])
        curve.append((spent, best))
    if spent < args.budget:  # Ctrl-C ends a Tune experiment early but cleanly: not a result
        raise SystemExit(f"sweep {name} ended after {spent} of {args.budget} trial-epochs; not recorded")
    spent_in = dict.fromkeys(SLOT_PARTS[:-1], 0.0)
    startups, memory = [], []
    parts: dict[str, list[float]] = {part: [] for part in STARTUP_PARTS}
    for result in results:
        history = result.metrics_dataframe
        if history is None or history.empty:
            continue
        for part, column in (("training", "epoch_time_s"), ("evaluation", "eval_time_s"),
                             ("checkpoints", "checkpoint_time_s")):
            if column in history:  # results of earlier code lack the last two
                spent_in[part] += float(history[column].sum())
        first = history.iloc[0]
        started_at = first["timestamp"] - first["time_total_s"]  # Tune's trial start
        startups.append(first["first_step_at"] - started_at)
        spent_in["start-up"] += startups[-1]
        data, model = float(first["setup_data_s"]), float(first["setup_model_s"])
        to_worker = float(first["worker_started_at"]) - started_at
        for part, seconds in zip(STARTUP_PARTS, (to_worker, data, model, startups[-1] - to_worker - data - model)):
            parts[part].append(seconds)
        memory.append(float(history["memory_peak_mb"].max()))
    return {
        "trials": len(rows),
        "finished": sum(r.status == "finished" for r in rows),
        "pruned": sum(r.status == "pruned" for r in rows),
        "failed": sum(r.status == "failed" for r in rows),
        "epochs": spent,
        "best_ap": best,
        "curve": curve,
        "wall_s": wall,
        "startup_s": startups,
        "startup_parts_s": parts,
        "memory_peak_mb": max(memory, default=float("nan")),
        "outside_training": 1 - spent_in["training"] / (wall * args.concurrent),
        "slot_shares": {**{part: seconds / (wall * args.concurrent) for part, seconds in spent_in.items()},
                        "rest": 1 - sum(spent_in.values()) / (wall * args.concurrent)},
    }


def render(runs: dict[str, dict], args: argparse.Namespace, argv: list[str]) -> str:
    lines = [
        "### Search efficiency: TPE + ASHA vs random search without pruning",
        "",
        f"- command: `python -m benchmarks.search_efficiency {' '.join(argv)}`",
        f"- {args.framework}, student resnet18 FPN 64"
        f"{' from ' + str(args.student_weights) if args.student_weights else ' from scratch'}, "
        f"{args.train_images} training images, {args.epochs} epochs per full trial, budget "
        f"{args.budget} trial-epochs per sweep, {args.concurrent} trials at a time, {os.cpu_count()} cores",
        "",
        "| strategy | seed | trials | finished | pruned | trial-epochs | best val AP | wall min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in sorted(runs.items()):
        strategy, seed = key.rsplit("/", 1)
        lines.append(
            f"| {strategy} | {seed} | {r['trials']} | {r['finished']} | {r['pruned']} | {r['epochs']} "
            f"| {100 * r['best_ap']:.1f} | {r['wall_s'] / 60:.1f} |"
        )
    lines += ["", "| strategy | best val AP, mean ± std over seeds | trial start → first step, s (median) "
              "| slot time outside training steps | trial memory peak, MiB |", "|---|---:|---:|---:|---:|"]
    for strategy in STRATEGIES:
        found = [r for key, r in runs.items() if key.startswith(strategy + "/")]
        if not found:
            continue
        best = [100 * r["best_ap"] for r in found]
        spread = f" ± {statistics.stdev(best):.1f}" if len(best) > 1 else ""
        startups = [s for r in found for s in r["startup_s"]]
        startup = statistics.median(startups) if startups else float("nan")
        outside = statistics.mean(r["outside_training"] for r in found)
        memory = max(r["memory_peak_mb"] for r in found)
        lines.append(
            f"| {strategy} | {statistics.mean(best):.1f}{spread} | {startup:.1f} | {100 * outside:.0f}% | {memory:.0f} |"
        )
    lines += reaching_random(runs)
    measured = [r for r in runs.values() if "startup_parts_s" in r]  # results of earlier code lack the parts
    if measured:
        lines += ["", "| trial start → first step, median s | " + " | ".join(STARTUP_PARTS) + " |",
                  "|---|" + "---:|" * len(STARTUP_PARTS)]
        medians = [statistics.median(s for r in measured for s in r["startup_parts_s"][part]) for part in STARTUP_PARTS]
        lines.append("| all strategies | " + " | ".join(f"{m:.1f}" for m in medians) + " |")
    shared = [r for r in runs.values() if "slot_shares" in r]
    if shared:
        lines += ["", "| slot time, mean share | " + " | ".join(SLOT_PARTS) + " |", "|---|" + "---:|" * len(SLOT_PARTS)]
        means = [statistics.mean(r["slot_shares"][part] for r in shared) for part in SLOT_PARTS]
        lines.append("| all strategies | " + " | ".join(f"{100 * m:.0f}%" for m in means) + " |")
    return "\n".join(lines) + "\n"


def reaching_random(runs: dict[str, dict]) -> list[str]:
    """Trial-epochs each TPE sweep spent until its best full trial reached random search's mean final best."""
    random = [r["best_ap"] for key, r in runs.items() if key.startswith("random/")]
    tpe = {key: r for key, r in sorted(runs.items()) if key.startswith("tpe")}
    if not random or not tpe:
        return []
    target = statistics.mean(random)
    lines = ["", f"Trial-epochs until a TPE sweep's best full trial reached random search's mean final best "
             f"({100 * target:.1f} val AP), of the budget:", "", "| strategy | seed | trial-epochs |", "|---|---:|---:|"]
    for key, r in tpe.items():
        reached = next((spent for spent, best in r["curve"] if best >= target), None)
        when = f"{reached} of {r['epochs']}" if reached is not None else f"not reached in {r['epochs']}"
        strategy, seed = key.split("/")
        lines.append(f"| {strategy} | {seed} | {when} |")
    return lines


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for strategy, colour in COLOURS.items():
        for i, (key, r) in enumerate(sorted(k for k in runs.items() if k[0].startswith(strategy + "/"))):
            xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.step(xs, [100 * y for y in ys], where="post", color=colour, alpha=0.8, label=strategy if i == 0 else None)
    ax.set_xlabel("trial-epochs spent")
    ax.set_ylabel("best val AP of a full trial")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    from gid.data import make_synthetic
    from gid.models import read_checkpoint

    data_root = args.out / "data"
    if not (data_root / "annotations").exists():
        data = read_checkpoint(args.teacher)["config"]["data"]
        # the kind of data benchmarks/effect.py trains its teachers on, a fresh draw of it
        make_synthetic(data_root, train=args.train_images, val=64, image_size=data["image_size"], seed=1,
                       max_objects=FULL.max_objects, min_object_size=FULL.min_object_size)
    base = write_base(args, data_root)
    results_path = args.out / "results.json"
    runs = json.loads(results_path.read_text()) if results_path.exists() else {}
    for seed in range(args.seeds):
        for strategy in args.strategies:
            key = f"{strategy}/{seed}"
            if key not in runs:
                runs[key] = run_strategy(args, base, strategy, seed)
                results_path.write_text(json.dumps(runs, indent=1))
    text = render(runs, args, argv)
    (args.out / "search.md").write_text(text)
    plot(runs, args.out / "search.png")
    print("\n" + text)


if __name__ == "__main__":
    main()
