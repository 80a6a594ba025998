import subprocess
import sys

import pytest

from gid.config import load_config
from gid.errors import GidError



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
