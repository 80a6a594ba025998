"""The gid command line: data, train, distill, eval, model; and the commands other packages add.

gid knows nothing of Tune or MLflow: the search commands (sweep, export, demo) come from the
``gid.commands`` entry points (pyproject.toml), each a function that adds its subcommands.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from importlib.metadata import entry_points
from pathlib import Path

from gid import logs
from gid.errors import GidError, one_line


class _Parser(argparse.ArgumentParser):
    """A usage error is one line and exit code 2, like every other error (not argparse's usage text first)."""

    def error(self, message: str):
        self.exit(2, f"gid: error: {one_line(message)}; see {self.prog} --help\n")

COMMANDS_GROUP = "gid.commands"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML config file (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=2 (repeatable)",
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    """For the commands that train: they run in a quiet terminal unless it is given (gid.logs)."""
    parser.add_argument(
        "--verbose", action="store_true",
        help="show everything on the terminal: Ray's and its workers' output, per-step lines (default: one line per "
        "epoch and Tune's table; the full log goes to gid.log either way)",
    )


def print_log_paths() -> None:
    from gid.engine.trainer import ray_logs

    print(f"full log: {logs.log_file()}")
    print(f"Ray's logs, the workers' output among them: {ray_logs()}")


def cmd_data_synth(args: argparse.Namespace) -> None:
    from gid.data import make_synthetic

    kwargs = dict(
        train=args.train, val=args.val, test=args.test, image_size=args.image_size, seed=args.seed,
        max_objects=args.max_objects, min_object_size=args.min_object_size,
    )
    if args.classes:
        kwargs["classes"] = args.classes.split(",")
    out = make_synthetic(args.out, **kwargs)
    print(f"wrote a synthetic COCO data set to {out}")


def _train(args: argparse.Namespace, distill: bool) -> None:
    from gid.config import load_config

    config = load_config(args.config, args.overrides)
    if distill and config.distill is None:
        raise GidError(f"{args.config}: `gid distill` needs a distill section with distill.teacher set")
    if not distill and config.distill is not None:
        raise GidError(f"{args.config}: has a distill section; run it with `gid distill`")
    baseline = _baseline_metrics(args.baseline) if distill and args.baseline is not None else None
    # Ray and torch take seconds to import: only after the config is known to be good.
    from gid.distill.balance import describe as describe_balance
    from gid.engine.evaluation import format_metrics
    from gid.engine.trainer import run_training
    from gid.distill.teacher import teacher_check

    outcome = run_training(config, address=args.address)
    ap = {k[4:]: v for k, v in outcome.metrics.items() if k.startswith("val_")}
    print(f"\n{config.model.framework} {config.model.backbone}: {format_metrics(ap)}")
    if distill and "teacher_val_ap" in outcome.metrics:
        print(f"teacher: AP {100 * outcome.metrics['teacher_val_ap']:.1f}")
        if warning := teacher_check(outcome.metrics["teacher_val_ap"], outcome.metrics.get("val_ap"), "this GID student"):
            print(warning)
    if distill and (calibrated := describe_balance(outcome.metrics)):
        print(calibrated)
    if baseline is not None:
        from gid.distill.cost import gid_cost

        print(f"against the student alone ({args.baseline}): {gid_cost(outcome.metrics, baseline)}")
    print(f"model file: {outcome.model_path}")
    print_log_paths()


def _baseline_metrics(path: Path) -> dict:
    """The metrics of the student-alone model file ``gid distill --baseline`` compares with, checked before training."""
    from gid.models import read_checkpoint

    metrics = read_checkpoint(path).get("metrics", {})
    if "val_ap" not in metrics:
        raise GidError(f"--baseline {path}: the model file records no val AP; pass one written by `gid train`")
    return metrics


def cmd_train(args: argparse.Namespace) -> None:
    _train(args, distill=False)


def cmd_distill(args: argparse.Namespace) -> None:
    _train(args, distill=True)


def cmd_eval(args: argparse.Namespace) -> None:
    from gid.engine.evaluation import evaluate_model_file, format_metrics
    from gid.engine.latency import cpu_cost, format_cost

    if args.latency_runs < 1:
        raise GidError(f"--latency-runs {args.latency_runs}: time at least 1 run")
    overrides = {"root": args.root, "format": args.format}
    evaluated = evaluate_model_file(args.checkpoint, args.split, {k: v for k, v in overrides.items() if v is not None})
    model, data = evaluated.model, evaluated.data
    cost = format_cost(cpu_cost(model, data.image_size, args.latency_runs), data.image_size, args.latency_runs)
    print(f"{args.checkpoint} on {data.root} [{args.split}]: {format_metrics(evaluated.metrics)}; {cost}")


def cmd_model_import(args: argparse.Namespace) -> None:
    from gid.models.exchange import import_torchvision

    imported = import_torchvision(
        args.weights, args.builder, args.out, num_classes=args.num_classes, image_size=args.image_size
    )
    model = imported.config.model
    low, high = model.detector.min_size, model.detector.max_size
    size = f"longest side {low}" if low == high else f"shorter side {low}, longer at most {high}"
    print(
        f"wrote {args.out}: a {model.framework} {model.backbone} ({model.variant}, FPN {model.fpn_channels}) of "
        f"{imported.num_classes} classes with background, with {args.builder}'s settings (images resized to {size}); "
        "use it as distill.teacher or model.weights, or with gid eval --data"
    )


def cmd_model_export(args: argparse.Namespace) -> None:
    from gid.models.exchange import export_model

    print(export_model(args.model_file, args.format, args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gid", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="make data sets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write a deterministic synthetic COCO-format detection data set")
    synth.add_argument("--out", type=Path, required=True, help="output folder")
    synth.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    synth.add_argument("--val", type=int, default=500, help="validation images (default 500)")
    synth.add_argument("--test", type=int, default=0, help="held-out test images (default 0)")
    synth.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    synth.add_argument("--max-objects", type=int, default=12, help="objects per image, at most (default 12)")
    synth.add_argument(
        "--min-object-size", type=float, default=6.0,
        help="smallest object diameter in pixels; the largest is half the image (default 6)",
    )
    synth.add_argument("--classes", default=None, help="comma-separated class names (default: the built-in six)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_data_synth)

    train = commands.add_parser("train", help="train one detector (a teacher, or a student alone)")
    _add_config_args(train)
    add_verbose_arg(train)
    train.set_defaults(func=cmd_train)

    distill = commands.add_parser("distill", help="train a student with GID under a teacher model file")
    _add_config_args(distill)
    distill.add_argument(
        "--baseline", type=Path, default=None, metavar="MODEL_FILE",
        help="the same student trained alone (`gid train`, same data): print GID's AP gain and training-time cost against it",
    )
    add_verbose_arg(distill)
    distill.set_defaults(func=cmd_distill)

    evaluate = commands.add_parser("eval", help="COCO-evaluate a model file")
    evaluate.add_argument("checkpoint", type=Path, help="model file written by train/distill")
    evaluate.add_argument("--data", dest="root", type=Path, default=None, help="data set root (default: the one it trained on)")
    evaluate.add_argument("--format", choices=("coco", "voc"), default=None)
    evaluate.add_argument("--split", default="val", help="split to evaluate (default val)")
    evaluate.add_argument(  # the median of 20 runs is robust to the odd slow one on a shared machine
        "--latency-runs", type=int, default=20, metavar="N",
        help="timed CPU runs of one image, after warm-up, whose median is the reported latency (default 20)",
    )
    evaluate.set_defaults(func=cmd_eval)

    model = commands.add_parser("model", help="torchvision detectors in and out of gid model files")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    imports = model_commands.add_parser("import", help="a torchvision detector's state dict as a gid model file")
    imports.add_argument("weights", type=Path, help="state dict of a torchvision detector (model.state_dict())")
    imports.add_argument(
        "--builder", required=True, help="the torchvision builder it comes from, e.g. retinanet_resnet50_fpn_v2"
    )
    imports.add_argument("--num-classes", type=int, default=None, help="classes with background (default: the file's)")
    imports.add_argument(
        "--image-size", type=int, default=None,
        help="longest image side it sees (default: what its COCO weights were trained for, 800 or 320)",
    )
    imports.add_argument("--out", type=Path, required=True, help="the model file to write")
    imports.set_defaults(func=cmd_model_import)
    exports = model_commands.add_parser("export", help="a model file's detector for torchvision or TorchScript")
    exports.add_argument("model_file", type=Path, help="model file written by train/distill/model import")
    exports.add_argument("--format", required=True, help="torchvision (a state dict) or torchscript")
    exports.add_argument("--out", type=Path, required=True, help="the file to write")
    exports.set_defaults(func=cmd_model_export)

    # Commands of other packages (search/'s sweep, export and demo), found through their entry points.
    for plugin in entry_points(group=COMMANDS_GROUP):
        plugin.load()(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure()
    try:
        with logs.command(args.verbose) if "verbose" in args else nullcontext():
            args.func(args)
    except GidError as exc:
        print(f"gid: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gid: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
