"""Bad input, fuzzed: generated configs, sweep files, YAML text and export options through `gid.cli.main`.

Hypothesis mutates small valid inputs (wrong types, unknown keys, out-of-range and huge numbers, odd
unicode, deep nesting, lists where sections belong, raw text that is not YAML or not a mapping) and runs
`gid train`, `gid distill`, `gid sweep` and `gid export` in-process on each. Every input must be either
refused (exit code 2, exactly one output line starting `gid: error:`, no traceback) or accepted: it
passes every check and reaches the tripwire standing where compute (the run's log, MLflow, Ray) begins.
Anything else (an exception escaping `main`, a second line, another exit code) fails the test.

The examples are derandomized, so CI tries the same cases on every run; EXAMPLES is the count per
command that docs/reliability.md reports.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from gid.cli import main
from support import tiny_config_dict
from test_bad_input import merged, write_model_file

EXAMPLES = {"train": 60, "distill": 30, "sweep": 40, "config text": 40, "export": 40}


def fuzz_settings(command: str):
    return settings(
        max_examples=EXAMPLES[command], deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class Accepted(Exception):
    """Raised by the tripwire: the input passed every check and compute was about to begin."""


def tripwire(*args, **kwargs):
    raise Accepted


@pytest.fixture(scope="module")
def world(synth_root, tmp_path_factory):
    """A teacher model file, a working folder as the current one, and tripwires where compute begins."""
    root = tmp_path_factory.mktemp("fuzz")
    teacher = write_model_file(root / "teacher.pt", synth_root)
    import gid.engine.trainer
    import search.export
    import search.sweep

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # relative paths the fuzz writes (storage_path: runs) land here
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'absent' / 'mlflow.db'}")
        # The first step after the checks: the run's or sweep's log (then the teacher's AP, MLflow, Ray).
        for module in (gid.engine.trainer, search.sweep):
            patch.setattr(module, "open_log", tripwire)
            patch.setattr(module, "ensure_ray", tripwire)
        patch.setattr(search.sweep, "connect", tripwire)
        patch.setattr(search.export, "best_runs", tripwire)  # export: reached once MLflow answered
        yield {"synth_root": synth_root, "teacher": teacher, "root": root}


# --- values ------------------------------------------------------------------------------------

ODD_TEXT = [
    "", " ", "\t", "\n", "a\nb", "a\rb", "line\u2028sep", "para\u2029sep", "\x85", "\x0b\x0c", "\x00", "nul\x00byte",
    "\ufeff", "\u202e", "é", "名前", "🚀🚀", "Z̤͔ͧ̑̓", "../../etc/passwd", "~", "~nosuchuser/x", "/", ".", "..",
    "NaN", "1e308", "yes", "no", "null", "~/runs", "s3://bucket/x", "C:\\windows", "%s%n", "{0}", "'", '"', "'\"",
    "!!int abc", "!!float zz", "9" * 5000, "[" * 3000, "a" * 300, "retinanet", "fcos", "faster_rcnn", "auto", "resnet18", "mobilenet_v3_large",
]
HUGE = [2**31, 2**63, -(2**63), 10**30, 10**300, -(10**300), 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan]

odd_text = st.sampled_from(ODD_TEXT) | st.text(max_size=12)
# Small values (often in range) and extreme ones; not the middle, where a valid num_classes or fpn_channels
# would build a detector of gigabytes before the tripwire (an extreme one fails to allocate at once: refused).
numbers = st.integers(-3, 300) | st.sampled_from(HUGE) | st.floats(-2.0, 2.0) | st.floats(-1e-300, 1e-300)
scalars = st.none() | st.booleans() | numbers | odd_text
keys = odd_text | st.sampled_from(["data", "model", "train", "distill", "run", "scaling", "epochs", "teacher", "type"])


def nested(depth: int) -> dict:
    value: object = "deep"
    for _ in range(depth):
        value = {"x": value}
    return value


values = (
    scalars
    | st.lists(scalars, max_size=4)
    | st.dictionaries(keys, scalars, max_size=3)
    | st.integers(10, 150).map(nested)
    | st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3), max_leaves=6)
)


def paths_of(tree: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a config tree, sections and leaves."""
    found = []
    for key, value in tree.items():
        found.append((*prefix, key))
        if isinstance(value, dict):
            found.extend(paths_of(value, (*prefix, key)))
    return found


# Keys a config or sweep file may hold that the base ones leave out, so the fuzz reaches their checks too.
CONFIG_EXTRAS = {
    "model": {"variant": "v1", "num_classes": 7, "anchor_sizes": "auto", "trainable_backbone_layers": "auto", "builder": None},
    "train": {"lr": 0.01, "milestones": [0.5, 0.9], "schedule": "step", "clip_grad_norm": 10.0},
    "scaling": {"num_workers": 1, "use_gpu": False, "gpus_per_worker": 1},
    "data": {"format": "coco", "hflip_prob": 0.5},
}
DISTILL_EXTRAS = {
    "gism": {"top_k": 10, "nms_iou": 0.3, "min_box_size": "auto"},
    "feature": {"weight": 0.005, "roi_size": 10},
    "balance": {"mode": "gradient", "calibration_steps": 1, "ratios": {"feature": 1.0}},
}
SWEEP_EXTRAS = {
    "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "max_concurrent_trials": 1},
    "objective": {"metric": "val_ap", "mode": "max"},
    "scheduler": {"type": "asha", "grace_period": "auto", "reduction_factor": 2},
    "sampler": {"type": "tpe", "seed": 0},
    "space": {"distill.gism.top_k": {"type": "int", "low": 5, "high": 20}},
    "budget_epochs": 4,
}


@st.composite
def mutated(draw, tree: dict) -> dict:
    """``tree`` with one to three changes: a value replaced, a key added or removed, a section made a value."""
    tree = yaml.safe_load(yaml.safe_dump(tree))  # a deep copy
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths_of(tree)))
        *parents, leaf = path
        node = tree
        for part in parents:
            node = node[part]
        change = draw(st.sampled_from(["replace", "replace", "add", "remove", "wrap"]))
        if change == "replace":
            node[leaf] = draw(values)
        elif change == "add":
            target = node[leaf] if isinstance(node[leaf], dict) else node
            target[draw(keys)] = draw(values)
        elif change == "remove":
            del node[leaf]
        else:  # a section or value inside a list, or a list where a section belongs
            node[leaf] = [node[leaf]]
        if not paths_of(tree):
            break
    return tree


def dumped(data, raw_unicode: bool) -> str:
    """YAML text of ``data``, odd characters either escaped or written as they are (UTF-8)."""
    return yaml.safe_dump(data, allow_unicode=raw_unicode)


overrides = st.lists(
    st.tuples(st.sampled_from(["train.epochs", "model.framework", "data.image_size", "distill.gism.top_k", "trials", "x.y.z", ""]) | odd_text, odd_text)
    .map(lambda kv: "=".join(kv)) | odd_text,
    max_size=2,
)


# --- the property ------------------------------------------------------------------------------


def outcome(argv: list[str], capsys) -> str:
    """Run ``gid`` on ``argv``: "accepted", or "refused" after checking the one-line contract."""
    capsys.readouterr()
    try:
        code = main(argv)
    except Accepted:
        captured = capsys.readouterr()
        assert "Traceback" not in captured.out + captured.err
        return "accepted"
    except SystemExit as exc:  # argparse: a usage error
        code = exc.code
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert code == 2, f"exit code {code} for {argv!r}: {output!r}"
    assert "Traceback" not in output
    lines = output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gid: error: "), f"not one line for {argv!r}: {output!r}"
    assert captured.out == ""  # the line goes to stderr
    return "refused"


# Templates of valid inputs; SYNTH, TEACHER and FOLDER stand for the data set, the teacher file and the example's folder.
CONFIG = merged(
    tiny_config_dict(Path("SYNTH"), run={"name": "fuzz", "storage_path": "FOLDER/runs"}), CONFIG_EXTRAS
)
DISTILL_CONFIG = {**CONFIG, "distill": {"teacher": "TEACHER", **DISTILL_EXTRAS}}
SWEEP = {
    "name": "fuzz",
    "frameworks": {"retinanet": {"config": "FOLDER/base.yaml", "overrides": ["train.epochs=1"]}},
    "trials": 1,
    "tracking": {"tracking_uri": "sqlite:///FOLDER/mlflow.db", "experiment": "gid-fuzz", "registered_model": "gid-fuzz"},
    "storage_path": "FOLDER/sweeps",
    **SWEEP_EXTRAS,
}


def resolved(value, world, folder: Path):
    """``value`` with the templates' stand-ins replaced by this example's paths."""
    if isinstance(value, dict):
        return {k: resolved(v, world, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [resolved(v, world, folder) for v in value]
    if isinstance(value, str):
        for name, path in (("SYNTH", world["synth_root"]), ("TEACHER", world["teacher"]), ("FOLDER", folder)):
            value = value.replace(name, str(path)) if value.startswith((name, f"sqlite:///{name}")) else value
    return value


def fuzzed(world, capsys, argv: list[str], files: dict[str, tuple[object, bool]]) -> None:
    """Write ``files`` (name: (tree, raw unicode)) into a fresh folder, run ``argv`` there, check the outcome."""
    with tempfile.TemporaryDirectory(dir=world["root"]) as folder:
        folder = Path(folder)
        for name, (tree, raw_unicode) in files.items():
            (folder / name).write_text(dumped(resolved(tree, world, folder), raw_unicode), encoding="utf-8")
        event(outcome([resolved(arg, world, folder) for arg in argv], capsys))
        # accepted or not, nothing was started: no run or sweep folder, no MLflow store
        assert not {"runs", "sweeps", "mlflow.db"} & {p.name for p in folder.iterdir()}


def set_flags(extra: list[str]) -> list[str]:
    return [arg for override in extra for arg in ("--set", override)]


@fuzz_settings("train")
@given(tree=mutated(CONFIG), raw_unicode=st.booleans(), extra=overrides)
@example(tree=CONFIG, raw_unicode=False, extra=["train.epochs=!!int abc"])  # was a traceback (ValueError)
@example(tree=CONFIG, raw_unicode=False, extra=["train.epochs=" + "9" * 5000])  # likewise
@example(tree=merged(CONFIG, {"run": {"name": "a\nb", "storage_path": "runs\u2028x"}}), raw_unicode=True, extra=[])  # accepted
@example(tree=merged(CONFIG, {"run": {"storage_path": "~nosuchuser/runs"}}), raw_unicode=False, extra=[])  # was a traceback
def test_fuzzed_train_configs(world, capsys, tree, raw_unicode, extra):
    fuzzed(world, capsys, ["train", "FOLDER/config.yaml", *set_flags(extra)], {"config.yaml": (tree, raw_unicode)})


@fuzz_settings("distill")
@given(tree=mutated(DISTILL_CONFIG), raw_unicode=st.booleans())
@example(tree=merged(DISTILL_CONFIG, {"distill": {"teacher": "missing\nteacher.pt"}}), raw_unicode=False)  # was two lines
def test_fuzzed_distill_configs(world, capsys, tree, raw_unicode):
    fuzzed(world, capsys, ["distill", "FOLDER/config.yaml"], {"config.yaml": (tree, raw_unicode)})


@fuzz_settings("sweep")
@given(
    sweep=st.just(SWEEP) | mutated(SWEEP), base=st.just(DISTILL_CONFIG) | mutated(DISTILL_CONFIG),
    raw_unicode=st.booleans(), extra=overrides,
)
@example(sweep=merged(SWEEP, {"storage_path": "~nosuchuser/sweeps"}), base=DISTILL_CONFIG, raw_unicode=False, extra=[])
def test_fuzzed_sweep_files(world, capsys, sweep, base, raw_unicode, extra):
    files = {"sweep.yaml": (sweep, raw_unicode), "base.yaml": (base, raw_unicode)}
    fuzzed(world, capsys, ["sweep", "FOLDER/sweep.yaml", *set_flags(extra)], files)


# Raw text: not YAML, YAML that is not a mapping, tags, anchors, huge or deep documents, bytes that are not UTF-8.
TEXT_PIECES = [
    "model: {framework: [\n", "- a\n- b\n", "just text\n", "42\n", "~\n", "", "\t\n", "data:\n\troot: x\n",
    "model: !!python/object/apply:os.system ['true']\n", "a: &a [*a]\n", "a: *unknown\n", "? [a, b]\n: c\n",
    "train: {epochs: " + "9" * 5000 + "}\n", "x: " + "[" * 3000 + "]" * 3000 + "\n", "x: !!binary AAAA\n",
    "x: !!timestamp 2020-13-45\n", "%YAML 9.9\n---\na: 1\n", "a: 1\n---\nb: 2\n", "{a: 1, a: 2}\n", "model: {framework: fcos}\n",
    "\ufeffmodel: {}\n", "model:\n  framework: fcos\n model: x\n", "'unterminated\n", "x: !!int abc\n", "x: !!float zz\n",
]
raw = st.sampled_from(TEXT_PIECES).map(str.encode) | st.text(max_size=40).map(str.encode) | st.binary(max_size=40)


@fuzz_settings("config text")
@given(text=st.lists(raw, min_size=1, max_size=3).map(b"".join), command=st.sampled_from(["train", "distill", "sweep"]))
@example(text=b"\x1f", command="train")  # found by the fuzz: PyYAML's two-line message
@example(text=b"\xff not utf-8", command="train")  # was a traceback (UnicodeDecodeError)
@example(text=b"\xff\xfe\x00\xd8", command="sweep")  # a UTF-16 BOM, then half a surrogate pair
@example(text=("train: {epochs: " + "9" * 5000 + "}\n").encode(), command="train")  # was a traceback (ValueError)
@example(text=("x: " + "[" * 3000 + "]" * 3000 + "\n").encode(), command="sweep")  # was a traceback (RecursionError)
@example(text=b"x: !!int abc\n", command="distill")  # was a traceback (ValueError)
def test_fuzzed_config_text(world, capsys, text, command):
    with tempfile.TemporaryDirectory(dir=world["root"]) as folder:
        path = Path(folder) / "file.yaml"
        path.write_bytes(text)
        event(outcome([command, str(path)], capsys))


URIS = [
    "nonsense://x", "file:///nowhere/mlruns", "http://127.0.0.1:1", "https://127.0.0.1:1/", "http://", "sqlite://",
    "sqlite:///:memory:", "sqlite:////nowhere/mlflow.db", "sqlite:///relative/mlflow.db", "sqlite:///model.pt/x.db",
    "sqlite:///?mode=ro", "mysql://u:p@127.0.0.1:1/db", "uc:x", "", " ", "./mlruns", "mlflow.db", "~nosuchuser/x",
]  # not databricks:// or postgresql:// (MLflow's own warnings, and its minutes of retries against a database server)


@fuzz_settings("export")
@given(
    uri=st.sampled_from(URIS) | st.sampled_from(["sqlite:///", "file://", "nonsense://", ""]).flatmap(lambda s: odd_text.map(lambda t: s + t)),
    top=st.none() | st.integers(-3, 3).map(str) | st.sampled_from(["0", "-1", "abc", "1.5", "", "9" * 5000, "1e308"]),
    metric=st.none() | odd_text,
    sweep=st.none() | odd_text,
    experiment=st.none() | odd_text,
    out=st.sampled_from(["out", "model.pt/out", ""]),
    register=st.none() | odd_text,
)
@example(uri="nonsense://x", top=None, metric=None, sweep=None, experiment=None, out="out", register=None)  # found: a traceback
@example(uri="sqlite:///..", top=None, metric=None, sweep=None, experiment=None, out="out", register=None)  # found: a traceback
@example(uri="file:///nowhere/mlruns", top=None, metric=None, sweep=None, experiment=None, out="out", register=None)  # a traceback
@example(uri="sqlite:////nowhere/mlflow.db", top=None, metric=None, sweep=None, experiment=None, out="out", register=None)  # made /nowhere
@example(uri="sqlite:///x.db", top="abc", metric=None, sweep=None, experiment=None, out="out", register=None)  # argparse: 4 lines
@example(uri="sqlite:///x.db", top="0", metric=None, sweep=None, experiment=None, out="out", register=None)
@example(uri="sqlite:///x.db", top=None, metric=None, sweep=None, experiment=None, out="out", register="a\u2028b")
def test_fuzzed_export_options(world, capsys, uri, top, metric, sweep, experiment, out, register):
    with tempfile.TemporaryDirectory(dir=world["root"]) as folder:
        (Path(folder) / "model.pt").write_bytes(b"a file")
        argv = ["export", "--out", str(Path(folder) / out), "--tracking-uri", uri]
        options = (("--top", top), ("--metric", metric), ("--sweep", sweep), ("--mlflow-experiment", experiment), ("--register", register))
        for flag, value in options:
            if value is not None:
                argv += [flag, value]
        event(outcome(argv, capsys))
        assert list(Path(folder).iterdir()) == [Path(folder) / "model.pt"]  # nothing written, no store made
