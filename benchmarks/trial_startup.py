"""Where a run's start-up goes before its first training step: Ray Train's share against gid's.

A Ray Train run (``TorchTrainer.fit``) is started ``--repeats`` times, each one as Tune starts a
sweep trial or as ``gid train`` does, with a training function that records wall-clock times and
returns at once. Each start is split into

* **to function**: from ``fit()`` to the training function's first line on the worker: Train's
  controller actor, its placement group, the worker actor and its process, the process group;
* **imports**: importing what gid's training loop imports (torch, torchvision, gid), in that fresh
  worker process;
* **to return**: from the function's return until ``fit()`` returns: shutting the run down.

    python -m benchmarks.trial_startup                # plain runs, as `gid train` starts them
    python -m benchmarks.trial_startup --in-tune      # each run inside a Tune trial, as a sweep starts them
    python -m benchmarks.trial_startup --tune-only    # a Tune trial that imports gid itself, no Train run: Tune's share

With ``--tune-only`` "to function" runs from ``Tuner.fit()`` to the trial function's first line.

Ray must not be running anything else (one Ray instance on this machine at a time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray
import ray.train
from ray import tune
from ray.train.torch import TorchTrainer

from gid.engine.trainer import ensure_ray

PARTS = ("to function", "imports", "to return")


def probe(config: dict) -> None:
    entered = time.time()
    import gid.engine.loop  # noqa: F401 - what the real training function imports first

    imported = time.time()
    Path(config["out"]).write_text(json.dumps({"entered": entered, "imported": imported, "returned": time.time()}))


def run_once(storage: str, name: str, report_to_tune: bool) -> dict[str, float]:
    from ray.tune.integration.ray_train import TuneReportCallback

    out = Path(storage) / f"{name}.json"  # this machine's file system: one node
    trainer = TorchTrainer(
        probe,
        train_loop_config={"out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, callbacks=[TuneReportCallback()] if report_to_tune else None
        ),
    )
    started = time.time()
    trainer.fit()
    ended = time.time()
    m = json.loads(out.read_text())
    return {"to function": m["entered"] - started, "imports": m["imported"] - m["entered"],
            "to return": ended - m["returned"], "total": ended - started}


def in_tune_trial(config: dict) -> None:
    times = run_once(config["storage"], tune.get_context().get_trial_id(), report_to_tune=True)
    tune.report({f"part/{k}": v for k, v in times.items()})


def tune_only_trial(config: dict) -> None:
    entered = time.time()
    import gid.engine.loop  # noqa: F401

    tune.report({"entered": entered, "imported": time.time()})


def one_trial(function, resources: dict, name: str, storage: str) -> tuple[dict, float]:
    """Run ``function`` as the only trial of a Tune experiment: its last metrics, and when ``fit()`` was called."""
    tuner = tune.Tuner(
        tune.with_resources(function, resources), param_space={"storage": storage},
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0),
    )
    started = time.time()
    (result,) = tuner.fit()
    return result.metrics, started


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--in-tune", action="store_true", help="start each run inside a Tune trial, as sweeps do")
    mode.add_argument("--tune-only", action="store_true", help="a Tune trial without a Train run, for comparison")
    args = p.parse_args(argv)
    ensure_ray()
    storage = tempfile.mkdtemp(prefix="gid-startup-")
    rows = []
    for repeat in range(args.repeats):
        if args.in_tune:
            metrics, started = one_trial(in_tune_trial, {"CPU": 0.01}, f"startup{repeat}", storage)
            times = {k.removeprefix("part/"): v for k, v in metrics.items() if k.startswith("part/")}
            times["tune total"] = time.time() - started
        elif args.tune_only:
            m, started = one_trial(tune_only_trial, {"CPU": 1}, f"startup{repeat}", storage)
            times = {"to function": m["entered"] - started, "imports": m["imported"] - m["entered"],
                     "tune total": time.time() - started}
        else:
            times = run_once(storage, f"startup{repeat}", report_to_tune=False)
        rows.append(times)
        print(f"run {repeat}: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()), flush=True)
    columns = list(rows[0])
    print("\n| " + " | ".join(f"{c}, median s" for c in columns) + " |\n|" + "---:|" * len(columns))
    print("| " + " | ".join(f"{statistics.median(r[c] for r in rows):.1f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
