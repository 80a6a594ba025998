"""Bad input through the command line: one line `gid: error: ...`, exit code 2, before any compute.

Every case runs `gid.cli.main` in-process. Reaching Ray counts as a failure (the input should have
been refused before compute), and nothing may be left in the run's storage or the MLflow store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from torchvision import models
from torchvision.models import detection

from gid.cli import main
from gid.config import validate
from gid.models import build_detector, save_model
from support import SIZE, RunsCode, tiny_config_dict


def merged(data: dict, changes: dict) -> dict:
    out = dict(data)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_model_file(path: Path, synth_root: Path, framework: str = "retinanet", num_classes: int = 7) -> Path:
    config = validate(tiny_config_dict(synth_root, framework))
    save_model(build_detector(config.model, SIZE, num_classes), config, num_classes, path)
    return path


@pytest.fixture(scope="module")
def files(synth_root, tmp_path_factory) -> dict[str, Path]:
    """Model files shared by the cases: good teachers and broken ones."""
    root = tmp_path_factory.mktemp("bad-input-files")
    teacher = write_model_file(root / "teacher.pt", synth_root)
    (root / "truncated.pt").write_bytes(teacher.read_bytes()[:4096])
    torch.save({"format": "something-else", "model": {}}, root / "not_gid.pt")
    marker = root / "pwned"
    torch.save({"format": "gid-model/1", "model": RunsCode(f"touch {marker}")}, root / "runs_code.pt")
    torch.save({**torch.load(teacher, weights_only=True), "format": "gid-model/1"}, root / "old_format.pt")
    # torchvision-format files, as torchvision publishes them (here randomly initialised)
    torch.save(models.mobilenet_v3_large(weights=None).state_dict(), root / "mobilenet_classifier.pth")
    mobilenet_detector = detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=7)
    torch.save(mobilenet_detector.state_dict(), root / "mobilenet_detector.pth")
    return {
        "teacher": teacher,
        "fcos_teacher": write_model_file(root / "fcos_teacher.pt", synth_root, "fcos"),
        "faster_rcnn_teacher": write_model_file(root / "faster_rcnn_teacher.pt", synth_root, "faster_rcnn"),
        "teacher_3_classes": write_model_file(root / "teacher_3_classes.pt", synth_root, num_classes=4),
        "truncated": root / "truncated.pt",
        "not_gid": root / "not_gid.pt",
        "runs_code": root / "runs_code.pt",
        "marker": marker,
        "missing": root / "missing.pt",
        "a_file": teacher,
        "old_format": root / "old_format.pt",
        "mobilenet_classifier": root / "mobilenet_classifier.pth",
        "mobilenet_detector": root / "mobilenet_detector.pth",
    }


class Inputs:
    """Writes one case's files into its own folder and gives its command line."""

    def __init__(self, synth_root: Path, files: dict[str, Path], tmp: Path):
        self.synth_root, self.files, self.tmp = synth_root, files, tmp
        self.storage, self.tracking_db = tmp / "runs", tmp / "mlflow.db"

    def config(self, changes: dict | None = None, distill: bool = False, text: str | None = None) -> Path:
        data = tiny_config_dict(self.synth_root, run={"name": "case", "storage_path": str(self.storage)})
        if distill:
            data["distill"] = {"teacher": str(self.files["teacher"])}
        path = self.tmp / f"config{len(list(self.tmp.glob('config*.yaml')))}.yaml"
        path.write_text(text if text is not None else yaml.safe_dump(merged(data, changes or {})))
        return path

    def train(self, changes: dict | None = None, *extra: str) -> list[str]:
        return ["train", str(self.config(changes)), *extra]

    def distill(self, changes: dict | None = None, *extra: str) -> list[str]:
        return ["distill", str(self.config(changes, distill=True)), *extra]

    def model_import(self, file: str, builder: str, *extra: str) -> list[str]:
        return ["model", "import", str(self.files[file]), "--builder", builder, *extra, "--out", str(self.tmp / "m.pt")]

    def model_export(self, file: str, export_format: str = "torchscript") -> list[str]:
        return ["model", "export", str(self.files[file]), "--format", export_format, "--out", str(self.tmp / "m.ts")]

    def yaml_text(self, text: str) -> list[str]:
        return ["train", str(self.config(text=text))]

    def sweep(self, changes: dict | None = None, base: dict | None = None) -> list[str]:
        data = {
            "name": "bad",
            "frameworks": {"retinanet": {"config": str(self.config(base, distill=True))}},
            "trials": 1,
            "tracking": {"tracking_uri": f"sqlite:///{self.tracking_db}", "experiment": "gid-bad-input"},
            "storage_path": str(self.storage),
        }
        path = self.tmp / "sweep.yaml"
        path.write_text(yaml.safe_dump({**data, **(changes or {})}))
        return ["sweep", str(path)]

    def data(self, change: Callable[[Path], None]) -> dict:
        """A copy of the synthetic data set's annotations changed by ``change``; the images are links."""
        root = self.tmp / "data"
        shutil.copytree(self.synth_root / "annotations", root / "annotations")
        for split in ("train", "val"):
            (root / split).symlink_to(self.synth_root / split)
        change(root)
        return {"data": {"root": str(root)}}


def edit_train(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Change the parsed training annotations (COCO JSON) of a data copy."""

    def apply(root: Path) -> None:
        path = root / "annotations" / "instances_train.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return apply


def write_train(text: str) -> Callable[[Path], None]:
    return lambda root: (root / "annotations" / "instances_train.json").write_text(text)


def add_missing_image(data: dict) -> None:
    data["images"].append({"id": 10**6, "file_name": "gone.png", "width": SIZE, "height": SIZE})
    data["annotations"].append({"id": 10**6, "image_id": 10**6, "category_id": 1, "bbox": [1, 1, 10, 10]})


def first_annotation(key: str, value) -> Callable[[dict], None]:
    return lambda data: data["annotations"][0].update({key: value})


def zero_width_boxes(data: dict) -> None:
    for ann in data["annotations"]:
        ann["bbox"][2] = 0


def no_images(data: dict) -> None:
    data["images"], data["annotations"] = [], []


CASES = [
    # --- config files ----------------------------------------------------------------------
    ("unknown key", lambda c: c.train({"model": {"framewrk": "fcos"}}), "unknown key 'model.framewrk'"),
    ("wrong type", lambda c: c.train({"train": {"epochs": "many"}}), "train.epochs: Input should be a valid integer"),
    ("unknown framework", lambda c: c.train({"model": {"framework": "yolo"}}), "model.framework: Input should be 'retinanet'"),
    ("value out of range", lambda c: c.train({"data": {"image_size": 16}}), "data.image_size: Input should be greater than or equal to 32"),
    ("impossible schedule", lambda c: c.train({"train": {"milestones": [0.9, 0.5]}}), "milestones must be increasing"),
    ("bad YAML syntax", lambda c: c.yaml_text("model: {framework: [\n"), "not valid YAML at line 2"),
    ("YAML that is a list", lambda c: c.yaml_text("- model\n- train\n"), "a config file must be a YAML mapping, got list"),
    ("YAML Python tag", lambda c: c.yaml_text("model: !!python/object/apply:os.system ['true']\n"), "could not determine a constructor"),
    ("missing config file", lambda c: ["train", str(c.tmp / "nope.yaml")], "config file not found"),
    ("override without =", lambda c: c.train({}, "--set", "train.lr"), "must look like key.path=value"),
    ("override into a value", lambda c: c.train({}, "--set", "train.epochs.x=1"), "'epochs' is a value, not a section"),
    ("balance measured every 0 steps", lambda c: c.distill({"distill": {"balance": {"mode": "dynamic", "every_steps": 0}}}), "distill.balance.every_steps: Input should be greater than or equal to 1 (got 0)"),
    ("balance momentum above 1", lambda c: c.distill({"distill": {"balance": {"momentum": 1.5}}}), "distill.balance.momentum: Input should be less than 1 (got 1.5)"),
    ("distill baseline missing", lambda c: c.distill({}, "--baseline", str(c.files["missing"])), "checkpoint not found"),
    ("distill baseline without AP", lambda c: c.distill({}, "--baseline", str(c.files["teacher"])), "the model file records no val AP; pass one written by `gid train`"),
    ("distill without teacher", lambda c: ["distill", str(c.config())], "needs a distill section"),
    ("train with a teacher", lambda c: ["train", str(c.config(distill=True))], "run it with `gid distill`"),
    ("too few classes", lambda c: c.train({"model": {"num_classes": 3}}), "model.num_classes is 3 but the data has 6 classes"),
    ("GPU fractions for one run's workers", lambda c: c.train({"scaling": {"num_workers": 2, "gpus_per_worker": 0.5}}), "puts one run's workers on the same GPU"),
    ("COCO with data.classes", lambda c: c.train({"data": {"classes": ["a"]}}), "data.classes applies to VOC data only"),
    # --- data ------------------------------------------------------------------------------
    ("missing image file", lambda c: c.train(c.data(edit_train(add_missing_image))), "image file not found: "),
    ("malformed COCO JSON", lambda c: c.train(c.data(write_train('{"images": ['))), "not valid JSON"),
    ("JSON that is not COCO", lambda c: c.train(c.data(write_train('["a", "list"]'))), "not a COCO detection file (no 'images' list)"),
    ("no categories", lambda c: c.train(c.data(edit_train(lambda d: d.update(categories=[])))), "no 'categories' list"),
    ("box outside its image", lambda c: c.train(c.data(edit_train(first_annotation("bbox", [100, 90, 10, 10])))), f"wholly outside its {SIZE}x{SIZE} image"),
    ("negative box size", lambda c: c.train(c.data(edit_train(first_annotation("bbox", [5, 5, -4, 6])))), "negative width or height"),
    ("only zero-area boxes", lambda c: c.train(c.data(edit_train(zero_width_boxes))), "no images with a usable (non-crowd, non-empty) box"),
    ("empty data set", lambda c: c.train(c.data(edit_train(no_images))), "the data set has no images to load"),
    ("unknown category id", lambda c: c.train(c.data(edit_train(first_annotation("category_id", 99)))), "category_id 99, which is not in 'categories'"),
    ("unknown image id", lambda c: c.train(c.data(edit_train(first_annotation("image_id", 424242)))), "image_id 424242, which is not in 'images'"),
    ("bbox of three numbers", lambda c: c.train(c.data(edit_train(first_annotation("bbox", [1, 2, 3])))), "expected [x, y, width, height]"),
    ("annotation without bbox", lambda c: c.train(c.data(edit_train(lambda d: d["annotations"][0].pop("bbox")))), "annotation #0 lacks bbox"),
    ("image size as text", lambda c: c.train(c.data(edit_train(lambda d: d["images"][0].update(width="64")))), "expected whole pixels > 0"),
    ("missing annotations file", lambda c: c.train(c.data(lambda root: (root / "annotations" / "instances_val.json").unlink())), "annotation file not found"),
    ("missing VOC split", lambda c: c.train({"data": {"format": "voc"}}), "VOC split file not found"),
    # --- model files -----------------------------------------------------------------------
    ("missing teacher", lambda c: c.distill({"distill": {"teacher": str(c.files["missing"])}}), "checkpoint not found"),
    ("truncated teacher", lambda c: c.distill({"distill": {"teacher": str(c.files["truncated"])}}), "not a readable checkpoint"),
    ("teacher that runs code", lambda c: c.distill({"distill": {"teacher": str(c.files["runs_code"])}}), "refusing to load a checkpoint with non-tensor objects"),
    ("teacher not a gid file", lambda c: c.distill({"distill": {"teacher": str(c.files["not_gid"])}}), "not a gid model file"),
    ("teacher of another framework", lambda c: c.distill({"distill": {"teacher": str(c.files["fcos_teacher"])}}), "framework differs (teacher fcos, student retinanet)"),
    ("MobileNetV3 student on torchvision's FPN levels under a ResNet teacher", lambda c: c.distill({"model": {"framework": "faster_rcnn", "backbone": "mobilenet_v3_large"}, "distill": {"teacher": str(c.files["faster_rcnn_teacher"])}}), "to read the teacher's levels, set the student's model.fpn_levels: resnet"),
    ("teacher of other classes", lambda c: c.distill({"distill": {"teacher": str(c.files["teacher_3_classes"])}}), "num_classes differs (teacher 4, student 7)"),
    ("weights of another framework", lambda c: c.train({"model": {"weights": str(c.files["fcos_teacher"])}}), "weights do not fit this model"),
    ("missing weights", lambda c: c.train({"model": {"weights": str(c.files["missing"])}}), "checkpoint not found"),
    ("eval a missing file", lambda c: ["eval", str(c.files["missing"])], "checkpoint not found"),
    ("eval a file that runs code", lambda c: ["eval", str(c.files["runs_code"])], "refusing to load"),
    ("eval a truncated file", lambda c: ["eval", str(c.files["truncated"])], "not a readable checkpoint"),
    ("eval with no latency runs", lambda c: ["eval", str(c.files["teacher"]), "--latency-runs", "0"], "--latency-runs 0: time at least 1 run"),
    ("eval a missing split", lambda c: ["eval", str(c.files["teacher"]), "--split", "test"], "annotation file not found"),
    ("eval data missing an image", lambda c: ["eval", str(c.files["teacher"]), "--data", c.data(edit_train(add_missing_image))["data"]["root"], "--split", "train"], "gone.png"),
    # --- pretrained weights, gid model import / export ------------------------------------
    ("backbone weights of another backbone", lambda c: c.train({"model": {"backbone_weights": str(c.files["mobilenet_classifier"])}}), "not torchvision's resnet18 classifier weights: 100 keys missing (e.g. conv1.weight), 266 unexpected (e.g. features.0.0.weight)"),
    ("backbone weights that run code", lambda c: c.train({"model": {"backbone_weights": str(c.files["runs_code"])}}), "refusing to load a backbone weights file with non-tensor objects"),
    ("missing backbone weights", lambda c: c.train({"model": {"backbone_weights": str(c.files["missing"])}}), "backbone weights file not found"),
    ("trainable layers out of range", lambda c: c.train({"model": {"trainable_backbone_layers": 6}}), "trainable_backbone_layers must be 'auto' or 0..5 for resnet18, got 6"),
    ("FCOS has no v2", lambda c: c.train({"model": {"framework": "fcos", "variant": "v2"}}), "variant v2 is not one of fcos's: v1"),
    ("teacher of an earlier gid", lambda c: c.distill({"distill": {"teacher": str(c.files["old_format"])}}), "a model file of an earlier gid (gid-model/1)"),
    ("import a file of another builder", lambda c: c.model_import("mobilenet_detector", "fasterrcnn_resnet50_fpn"), "not a fasterrcnn_resnet50_fpn state dict: 326 keys missing (e.g. backbone.body.conv1.weight), 308 unexpected (e.g. backbone.body.0.0.weight)"),
    ("import a truncated file", lambda c: c.model_import("truncated", "retinanet_resnet50_fpn"), "not a readable torchvision state dict (truncated or not a torch file)"),
    ("import a file that runs code", lambda c: c.model_import("runs_code", "fcos_resnet50_fpn"), "refusing to load a torchvision state dict with non-tensor objects (Trying to load unsupported GLOBAL posix.system"),
    ("import a missing file", lambda c: c.model_import("missing", "fcos_resnet50_fpn"), "torchvision state dict not found"),
    ("import a gid model file", lambda c: c.model_import("teacher", "retinanet_resnet50_fpn_v2"), "already a model file (format gid-model/2), not a torchvision state dict"),
    ("import of an unknown builder", lambda c: c.model_import("mobilenet_detector", "yolo_v8"), "--builder yolo_v8 is not a torchvision builder gid makes"),
    ("import for tiny images", lambda c: c.model_import("mobilenet_detector", "fasterrcnn_resnet50_fpn", "--image-size", "8"), "--image-size 8: give the longest image side in pixels"),
    ("backbone weights of another MobileNet", lambda c: c.train({"model": {"backbone": "mobilenet_v2", "backbone_weights": str(c.files["mobilenet_classifier"])}}), "not torchvision's mobilenet_v2 classifier weights: "),
    ("MobileNet FPN levels on RetinaNet", lambda c: c.train({"model": {"backbone": "mobilenet_v2", "fpn_levels": "mobilenet"}}), "model: fpn_levels mobilenet is not one of retinanet's: auto, resnet"),
    ("MobileNet FPN levels on a ResNet", lambda c: c.train({"model": {"framework": "faster_rcnn", "fpn_levels": "mobilenet"}}), "fpn_levels mobilenet reads a MobileNet's last stage, which resnet18 has not; use resnet"),
    ("export to ONNX", lambda c: c.model_export("teacher", "onnx"), "--format onnx: use one of torchvision, torchscript"),
    ("export a missing file", lambda c: c.model_export("missing"), "checkpoint not found"),
    ("export a file that runs code", lambda c: c.model_export("runs_code", "torchvision"), "refusing to load a checkpoint with non-tensor objects"),
    ("export a truncated file", lambda c: c.model_export("truncated"), "not a readable checkpoint"),
    # --- storage ---------------------------------------------------------------------------
    ("storage under a file", lambda c: c.train({"run": {"storage_path": str(c.files["a_file"] / "runs")}}), "is a file, not a folder"),
    # --- sweep files -----------------------------------------------------------------------
    ("sweep unknown key", lambda c: c.sweep({"trails": 3}), "unknown key 'trails'"),
    ("sweep missing file", lambda c: ["sweep", str(c.tmp / "nope.yaml")], "sweep file not found"),
    ("sweep not a mapping", lambda c: ["sweep", str(c.config(text="just text\n"))], "a sweep file must be a YAML mapping, got str"),
    ("sweep no trials", lambda c: c.sweep({"trials": 0}), "trials: Input should be greater than or equal to 1"),
    ("empty search space", lambda c: c.sweep({"space": {}}), "the search space is empty"),
    ("range low above high", lambda c: c.sweep({"space": {"distill.gism.top_k": {"type": "int", "low": 50, "high": 5}}}), "low (50) must be below high (5)"),
    ("log range from zero", lambda c: c.sweep({"space": {"distill.feature.weight": {"type": "float", "low": 0, "high": 1, "log": True}}}), "a log range needs low > 0"),
    ("space key unknown", lambda c: c.sweep({"space": {"distill.gism.nonsense": {"type": "float", "low": 0.1, "high": 0.2}}}), "unknown key 'distill.gism.nonsense'"),
    ("space range too wide", lambda c: c.sweep({"space": {"distill.gism.nms_iou": {"type": "float", "low": 0.5, "high": 2.0}}}), "space distill.gism.nms_iou: distill.gism.nms_iou: Input should be less than or equal to 1"),
    ("sweep unknown framework", lambda c: c.sweep({"frameworks": {"yolo": {"config": "x.yaml"}}}), "frameworks.yolo"),
    ("sweep framework mismatch", lambda c: c.sweep({"frameworks": {"fcos": {"config": str(c.config(distill=True))}}}), "model.framework is 'retinanet' but the sweep lists it under 'fcos'"),
    ("sweep base without teacher", lambda c: c.sweep({"frameworks": {"retinanet": {"config": str(c.config())}}}), "a sweep's base config needs a distill section"),
    ("sweep base missing", lambda c: c.sweep({"frameworks": {"retinanet": {"config": str(c.tmp / "nope.yaml")}}}), "config file not found"),
    ("sweep teacher that runs code", lambda c: c.sweep(base={"distill": {"teacher": str(c.files["runs_code"])}}), "refusing to load"),
    ("sweep base data broken", lambda c: c.sweep(base=c.data(edit_train(first_annotation("category_id", 99)))), "category_id 99"),
    ("sweep GPU fractions per trial", lambda c: c.sweep({"resources": {"workers_per_trial": 2, "gpus_per_worker": 0.25}}), "resources: gpus_per_worker below 1"),
    ("model builder without a function", lambda c: c.train({"model": {"builder": "mypackage"}}), "model: builder 'mypackage' must look like package.module:function"),
    ("model builder not importable", lambda c: c.train({"model": {"builder": "no_such_package:build"}}), "model.builder no_such_package:build: cannot import it (No module named 'no_such_package')"),
    ("sweep name with a slash", lambda c: c.sweep({"name": "team/run"}), "'team/run' is not a usable sweep name"),
    ("sweep name with a double quote", lambda c: c.sweep({"name": 'say "hi"'}), "is not a usable sweep name; use letters"),
    ("export name with both quotes", lambda c: ["export", "--out", str(c.tmp / "best"), "--sweep", "bob's \"run\"", "--tracking-uri", f"sqlite:///{c.tracking_db}"], "--sweep bob's \"run\" holds both quote characters"),
    ("sweep registered model name with a slash", lambda c: c.sweep({"tracking": {"tracking_uri": f"sqlite:///{c.tracking_db}", "registered_model": "team/detector"}}), "'team/detector' is not a usable registered model name; use letters, digits and _ . -"),
    ("sweep registering from a bucket", lambda c: c.sweep({"storage_path": "s3://bucket/sweeps", "tracking": {"tracking_uri": f"sqlite:///{c.tracking_db}", "registered_model": "detector"}}), "registering reads the winners' checkpoints from storage_path, a bucket here (s3://bucket/sweeps)"),
    ("export register name with a colon", lambda c: ["export", "--out", str(c.tmp / "best"), "--register", "models:detector", "--tracking-uri", f"sqlite:///{c.tracking_db}"], "--register 'models:detector' is not a usable registered model name"),
    ("sweep storage under a file", lambda c: c.sweep({"storage_path": str(c.files["a_file"] / "sweeps")}), "is a file, not a folder; set storage_path"),
]


@pytest.fixture
def no_compute(monkeypatch):
    """Starting Ray means the input was not checked before compute: fail the test instead."""

    def tripwire(address=None):
        raise AssertionError("reached Ray: this bad input was not refused before compute")

    import search.sweep

    monkeypatch.setattr("gid.engine.trainer.ensure_ray", tripwire)
    monkeypatch.setattr(search.sweep, "ensure_ray", tripwire)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what building the case printed
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("make_argv, expected", [pytest.param(m, e, id=name) for name, m, e in CASES])
def test_bad_input_gives_one_line_and_exit_code_2(synth_root, files, tmp_path, capsys, no_compute, make_argv, expected):
    inputs = Inputs(synth_root, files, tmp_path)
    argv = make_argv(inputs)
    code, output = run_cli(argv, capsys)
    lines = output.strip().splitlines()
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("gid: error: "), output
    assert expected in lines[0]
    assert "Traceback" not in output
    assert not inputs.storage.exists()  # no run (or sweep) folder: nothing started
    assert not inputs.tracking_db.exists()  # no MLflow store, let alone a run in it
    assert not files["marker"].exists()  # the pickled command never ran


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30 and len({name for name, _, _ in CASES}) == len(CASES)


def test_the_pickled_command_is_real(files):
    """Control for the cases above: loaded unsafely, the malicious model file does run its command."""
    marker = files["marker"]
    torch.load(files["runs_code"], weights_only=False)
    assert marker.exists()
    marker.unlink()


def test_a_model_file_that_runs_code_is_refused_without_a_traceback(files):
    proc = subprocess.run(
        [sys.executable, "-m", "gid.cli", "eval", str(files["runs_code"])], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("gid: error: ") and "refusing to load" in line and "GLOBAL posix.system" in line
    assert not files["marker"].exists()


def test_unwritable_storage_fails_before_compute(synth_root, files, tmp_path, capsys, no_compute):
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o500)
        storage, expected = folder / "runs", "is not writable (Permission denied"
    else:
        # Root writes through permission bits: use a path the kernel refuses to anyone,
        # one whose parent is a regular file (creating it fails with ENOTDIR).
        storage, expected = files["a_file"] / "runs", "is a file, not a folder"
    inputs = Inputs(synth_root, files, tmp_path)
    for argv in (inputs.train({"run": {"storage_path": str(storage)}}), inputs.sweep({"storage_path": str(storage)})):
        code, output = run_cli(argv, capsys)
        assert code == 2 and output.count("\n") == 1 and expected in output, output
    assert not storage.exists() and not inputs.tracking_db.exists()


def test_a_data_error_found_in_a_worker_reaches_the_user_as_one_line(ray_local, synth_root, files, tmp_path, capsys):
    inputs = Inputs(synth_root, files, tmp_path)
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    name = json.loads((root / "annotations" / "instances_train.json").read_text())["images"][0]["file_name"]
    (root / "train" / name).write_bytes(b"not a png")
    code, output = run_cli(inputs.train({"data": {"root": str(root)}}), capsys)
    assert code == 2
    # Ray forwards the worker's own log (its traceback included), each line tagged "(RayTrainWorker pid=...)";
    # the driver itself prints one line and no traceback of its own, whenever the forwarded lines arrive.
    lines = output.splitlines()
    (error,) = [line for line in lines if line.startswith("gid: ")]
    assert error.startswith("gid: error: cannot read image ") and name in error
    assert not any(line.startswith("Traceback") for line in lines)
