import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gid.config import DistillConfig, ModelConfig, load_config, validate
from gid.errors import GidError
from gid.frameworks import FRAMEWORKS

README = Path(__file__).resolve().parents[1] / "README.md"
#: The README's words for a default of None.
NONE_IN_WORDS = {"none", "from the data", "VOC's 20", "the config file's name"}
#: How the README names the frameworks (model.variant's default is each framework's own).
FRAMEWORK_NAMES = {"RetinaNet": "retinanet", "FCOS": "fcos", "Faster R-CNN": "faster_rcnn"}


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_file_values_defaults_and_overrides(tmp_path):
    path = write(tmp_path, "model: {framework: fcos}\ntrain: {epochs: 3}\n")
    config = load_config(path, ["train.lr=0.02", "distill.teacher=t.pt", "distill.feature.enabled=false"])
    assert config.model.framework == "fcos"
    assert config.train.epochs == 3 and config.train.lr == 0.02
    assert config.distill.feature.enabled is False and config.distill.relation.weight == 40.0
    assert config.run.name == "run"  # named after the file unless set


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("model: {framewrk: fcos}\n", [], "unknown key 'model.framewrk'"),
        ("train: {epochs: many}\n", [], "train.epochs: Input should be a valid integer"),
        ("model: {framework: yolo}\n", [], "model.framework: Input should be 'retinanet', 'fcos' or 'faster_rcnn'"),
        ("model: {fpn_channels: 80}\n", [], "fpn_channels must be a multiple of 32"),
        ("model: {fpn_channels: 32}\n", [], "model.fpn_channels: Input should be greater than or equal to 64"),
        ("train: {lr: -1}\n", [], "train.lr: Input should be greater than 0"),
        ("train: {milestones: [0.9, 0.5]}\n", [], "milestones must be increasing"),
        ("{}\n", ["train.lr"], "must look like key.path=value"),
        ("{}\n", ["distill.gism.top_k=0"], "distill.teacher: Field required"),
        ("- a list\n", [], "must be a YAML mapping"),
        ("model: {framework: [\n", [], "not valid YAML"),
        ("model: {framework: faster_rcnn, detector: {topk_candidates: 500}}\n", [],
         "detector.topk_candidates is not a setting of faster_rcnn, whose are: min_size, max_size, rpn_pre_nms_top_n_train"),
        ("model: {framework: fcos}\n", ["model.detector.score_thresh=2"], "model.detector.score_thresh"),
        ("model: {framework: fcos, anchor_octaves: floor}\n", [], "fcos has no octave anchor sizes"),
        ("model: {builder: 'pkg.mod:make'}\n", ["model.detector.min_size=64"], "a builder function's business"),
    ],
)
def test_bad_config_gives_one_clear_line(tmp_path, text, overrides, expected):
    with pytest.raises(GidError) as caught:
        load_config(write(tmp_path, text), overrides)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_detector_settings_are_auto_unless_set(tmp_path):
    config = load_config(write(tmp_path, "model: {framework: retinanet}\n"), ["model.detector.score_thresh=0.3"])
    assert config.model.detector.given() == {"score_thresh": 0.3}
    assert config.model.detector.nms_thresh == "auto" and config.model.batchnorm_eps == "auto"
    assert config.model.anchor_octaves == "exact"


def test_missing_config_file(tmp_path):
    with pytest.raises(GidError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_bad_config_with_exit_code_2_and_no_traceback(tmp_path):
    path = write(tmp_path, "model: {backbone: resnet9}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gid.cli", "train", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gid: error:") and "model.backbone" in lines[0]


def readme_config_reference() -> dict[str, str]:
    """The README's config reference table: each key and the text of its default.

    A row may name several keys (``a.b.c``, then ``.d`` or ``d`` for ``a.b.d``) and give their defaults in order,
    comma-separated, or one default for them all.
    """
    section = README.read_text().split("\n## Config reference\n")[1].split("\n## ")[0]
    table = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        keys_cell, defaults_cell = (cell.strip() for cell in line.split("|")[1:3])
        first, *more = re.findall(r"`([^`]+)`", keys_cell)
        parent = first.rsplit(".", 1)[0]
        keys = [first] + [key if "." in key.lstrip(".") else f"{parent}.{key.lstrip('.')}" for key in more]
        defaults = re.split(r",\s*(?![^\[]*\])", defaults_cell) if more else [defaults_cell]  # not inside [...]
        if len(defaults) == 1:
            defaults *= len(keys)
        assert len(defaults) == len(keys), line
        table.update(zip(keys, defaults))
    return table


def documented_value(text: str):
    if text in NONE_IN_WORDS:
        return None
    value = yaml.safe_load(text.strip("`"))
    return float(value) if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?e-?\d+", value) else value  # 1e-4


def leaves(tree: dict, prefix: str = "") -> dict:
    """A nested dict's values by dotted key."""
    out = {}
    for key, value in tree.items():
        out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_the_readme_config_reference_gives_every_key_with_its_real_default():
    table = readme_config_reference()
    defaults = leaves(validate({"distill": {"teacher": "t.pt"}}).to_dict())
    assert sorted(table) == sorted(defaults)  # every key, and no key the config does not have

    assert table.pop("distill.teacher") == "required" and DistillConfig.model_fields["teacher"].is_required()
    variants = {  # "`v2` RetinaNet, `v1` FCOS and Faster R-CNN"
        FRAMEWORK_NAMES[name]: variant
        for variant, names in re.findall(r"`(\w+)` ([^,`]+)", table.pop("model.variant"))
        for name in names.strip().split(" and ")
    }
    assert variants == {framework: ModelConfig(framework=framework).variant for framework in FRAMEWORKS}
    documented = {key: documented_value(text) for key, text in table.items()}
    assert documented == {key: defaults[key] for key in documented}
