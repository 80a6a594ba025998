"""The `gid` command's search commands: sweep, export, demo (added through the ``gid.commands`` entry point)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gid.cli import add_verbose_arg, print_log_paths


def cmd_sweep(args: argparse.Namespace) -> None:
    from search.config import load_sweep

    sweep = load_sweep(args.sweep, args.overrides)
    from search.sweep import run_sweep

    outcome = run_sweep(sweep, resume=args.resume, address=args.address, overrides=args.overrides)
    print("\n" + outcome.summary)
    print(f"summary, trials.csv and plots: {outcome.report_dir}")
    print_exported(outcome.exported)
    print(f"MLflow runs: {outcome.runs_link}")
    print_log_paths()


def cmd_export(args: argparse.Namespace) -> None:
    from search.export import export_best

    exported = export_best(
        args.out, tracking_uri=args.tracking_uri, experiment=args.mlflow_experiment, sweep=args.sweep,
        metric=args.metric, top=args.top, register=args.register,
    )
    print_exported(exported)


def print_exported(exported: list) -> None:
    """A line per exported config (with its student's MLflow model version, if registered), then the report."""
    from search.export import final_champion

    champion = final_champion(exported)
    for e in exported:
        line = f"{e.framework} #{e.rank}: AP {100 * e.metrics.get('val_ap', 0):.1f} -> {e.path}"
        if e.registered is not None:
            line += f"; MLflow model {e.registered.uri}" + (" (champion)" if e.registered.version == champion else "")
        print(line)
    if exported:
        print(f"where each came from: {exported[0].path.parent / 'README.md'}")


def cmd_demo(args: argparse.Namespace) -> None:
    from search.demo import run_demo

    run_demo(args.out, frameworks=args.frameworks.split(","), quick=args.quick)
    print_log_paths()


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add sweep, export and demo to the `gid` command's subcommands."""
    sweep = commands.add_parser("sweep", help="search GID values with Ray Tune + Optuna, tracked in MLflow")
    sweep.add_argument("sweep", type=Path, help="sweep file (see configs/sweep.yaml)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a sweep file value, e.g. --set trials=4 (repeatable)")
    sweep.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    add_verbose_arg(sweep)
    sweep.set_defaults(func=cmd_sweep)

    export = commands.add_parser("export", help="write the best trials' configs as distill YAML files")
    export.add_argument("--out", type=Path, required=True, help="output folder")
    export.add_argument("--sweep", default=None, help="only this sweep (default: every sweep in the experiment)")
    export.add_argument("--mlflow-experiment", default="gid-sweeps", help="MLflow experiment (default gid-sweeps)")
    export.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local store)")
    export.add_argument("--top", type=int, default=1, help="configs per framework (default 1)")
    export.add_argument(
        "--metric", default="val_ap",
        help="ranking metric (default val_ap), in the direction the sweep's objective.mode gives it, else maximised",
    )
    export.add_argument(
        "--register", default=None, metavar="NAME",
        help="also register each framework's best student as a version of MLflow model NAME; its alias champion "
        "moves to a version only when it ranks better by --metric (docs/registry.md)",
    )
    export.set_defaults(func=cmd_export)

    demo = commands.add_parser("demo", help="synthetic data, teachers, a small sweep, exported best configs")
    demo.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default demo/)")
    demo.add_argument("--frameworks", default="retinanet,fcos", help="comma-separated (default retinanet,fcos)")
    demo.add_argument("--quick", action="store_true", help="an even smaller run, for a smoke test")
    add_verbose_arg(demo)
    demo.set_defaults(func=cmd_demo)
