"""The typed config tree: every value a run uses, loaded from YAML with dotted overrides.

A config file is a (partial) YAML mapping of this tree; values not given take the defaults
below. ``--set a.b=value`` overrides parse ``value`` as YAML, so ``--set train.lr=0.02`` is a
float and ``--set distill.feature.enabled=false`` a bool. Everything that reaches the model
passes through :class:`Config`, so a sweep trial's config is the same kind of file a user writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gid.errors import GidError
from gid.frameworks import COCO_IMAGE_SIZE, FRAMEWORKS
from gid.frameworks.base import FpnLevels

Framework = Literal[tuple(FRAMEWORKS)]  # model.framework: one of gid.frameworks' modules
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "mobilenet_v3_large"]
Variant = Literal[tuple(sorted({variant for framework in FRAMEWORKS.values() for variant in framework.variants}))]

# torchvision's limits for trainable_backbone_layers: ResNet conv1 + 4 stages; a MobileNet's stages as
# _mobilenet_extractor counts them (the first block, each strided block, the last block): 6 in both.
MAX_TRAINABLE_LAYERS = {
    "resnet18": 5, "resnet34": 5, "resnet50": 5, "resnet101": 5, "mobilenet_v2": 6, "mobilenet_v3_large": 6,
}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(StrictModel):
    """Where the data lives and how it is batched.

    COCO layout: ``root/annotations/instances_{split}.json`` with images in ``root/{split}/``.
    VOC layout: ``root/ImageSets/Main/{split}.txt``, ``root/Annotations``, ``root/JPEGImages``.
    """

    format: Literal["coco", "voc"] = "coco"
    root: Path = Path("data/synth")
    train_split: str = "train"
    val_split: str = "val"
    classes: list[str] | None = None  # VOC only: class names in label order (default: VOC's 20)
    image_size: int = Field(128, ge=32, le=4096)  # longest image side fed to the detector
    batch_size: int = Field(8, ge=1)  # per worker
    # DataLoader worker processes per training worker; auto: on a GPU, the worker's CPUs but the one that trains
    # (at most 4), on a CPU none (gid.engine.loop.loader_workers)
    loader_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0)


Count = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class DetectorSettings(StrictModel):
    """Keyword arguments of torchvision's detector class (``model.detector``), each of one framework or all.

    ``auto``: ``min_size`` and ``max_size`` are ``data.image_size`` (gid feeds images of that longest
    side); every other setting is gid's (``Framework.gid_settings``), else torchvision's class default.
    `gid model import` records its builder's values, so an imported model behaves as the builder's.
    """

    # GeneralizedRCNNTransform: shorter side resized to min_size unless the longer then exceeds max_size
    min_size: Count | Literal["auto"] = "auto"
    max_size: Count | Literal["auto"] = "auto"
    # RetinaNet and FCOS
    score_thresh: Fraction | Literal["auto"] = "auto"
    nms_thresh: Fraction | Literal["auto"] = "auto"
    detections_per_img: Count | Literal["auto"] = "auto"
    topk_candidates: Count | Literal["auto"] = "auto"
    # Faster R-CNN
    rpn_pre_nms_top_n_train: Count | Literal["auto"] = "auto"
    rpn_post_nms_top_n_train: Count | Literal["auto"] = "auto"
    rpn_pre_nms_top_n_test: Count | Literal["auto"] = "auto"
    rpn_post_nms_top_n_test: Count | Literal["auto"] = "auto"
    rpn_nms_thresh: Fraction | Literal["auto"] = "auto"
    rpn_score_thresh: Fraction | Literal["auto"] = "auto"
    box_score_thresh: Fraction | Literal["auto"] = "auto"
    box_nms_thresh: Fraction | Literal["auto"] = "auto"
    box_detections_per_img: Count | Literal["auto"] = "auto"
    box_batch_size_per_image: Count | Literal["auto"] = "auto"

    def given(self) -> dict[str, int | float]:
        """The settings that are not ``auto``."""
        return {name: value for name, value in self.model_dump().items() if value != "auto"}


#: model.detector settings every framework takes; the others are the framework's ``Framework.settings``.
TRANSFORM_SETTINGS = ("min_size", "max_size")


class ModelConfig(StrictModel):
    framework: Framework = "retinanet"
    backbone: Backbone = "resnet18"
    fpn_channels: int = Field(64, ge=64)  # GroupNorm(32) heads need ≥ 2 channels per group on 1×1 maps
    # torchvision's architecture variant (the framework module's); None takes the framework's default.
    variant: Variant | None = None
    num_classes: int | None = Field(None, ge=2)  # incl. background; None = from the data set
    # The backbone outputs the FPN reads (gid.frameworks.base.FpnLevels): resnet, one per stride;
    # mobilenet (Faster R-CNN on a MobileNet), torchvision's fasterrcnn_mobilenet_v3_large_fpn levels.
    # auto: those of torchvision's builder of the framework on the backbone, else resnet.
    fpn_levels: Literal[("auto", *get_args(FpnLevels))] = "auto"
    # Anchor (RetinaNet, Faster R-CNN RPN) or location (FCOS) size per FPN level, smallest level
    # first (Faster R-CNN on the mobilenet levels: all of them on every level). "auto" scales the
    # framework's COCO defaults by image_size / 800.
    anchor_sizes: Literal["auto"] | list[float] = "auto"
    # RetinaNet's three sizes per level, s * 2**(k/3): exact, or rounded down to whole pixels (torchvision's builders)
    anchor_octaves: Literal["exact", "floor"] = "exact"
    weights: Path | None = None  # a local model file to initialise from (never downloaded)
    backbone_weights: Path | None = None  # a local torchvision ImageNet classifier state dict for the backbone
    # Backbone BatchNorm as torchvision's FrozenBatchNorm2d; auto: when backbone_weights is set.
    frozen_batchnorm: bool | Literal["auto"] = "auto"
    # Backbone stages trained, counted from the last; auto: 3 with backbone_weights, else all.
    trainable_backbone_layers: int | Literal["auto"] = "auto"
    # Backbone BatchNorm epsilon; auto: the classifier's (MobileNetV3's 0.001, the others' 1e-5). A value builds it
    # as torchvision's detection builders do: nn.BatchNorm2d (or FrozenBatchNorm2d) with this eps.
    batchnorm_eps: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"
    # torchvision's detector class's keyword arguments: transform sizes, thresholds, proposal counts
    detector: DetectorSettings = DetectorSettings()
    # "package.module:function" returning the user's own torchvision RetinaNet, FCOS or FasterRCNN when called
    # with num_classes=N; then backbone, fpn_channels, fpn_levels, variant and anchor_sizes are the function's business.
    builder: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _framework_default_variant(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("variant") is None:
            framework = FRAMEWORKS.get(data.get("framework", cls.model_fields["framework"].default))
            data = {**data, "variant": None if framework is None else framework.default_variant}
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.fpn_channels % 32:
            raise ValueError(f"fpn_channels must be a multiple of 32 (GroupNorm heads), got {self.fpn_channels}")
        framework = FRAMEWORKS[self.framework]
        sizes = len(framework.coco_anchor_sizes)
        if isinstance(self.anchor_sizes, list) and len(self.anchor_sizes) != sizes:
            raise ValueError(f"anchor_sizes must be 'auto' or a list of {sizes} sizes, one per FPN level")
        if self.variant not in framework.variants:
            raise ValueError(f"variant {self.variant} is not one of {self.framework}'s: {', '.join(framework.variants)}")
        if self.fpn_levels not in ("auto", *framework.fpn_levels):
            raise ValueError(
                f"fpn_levels {self.fpn_levels} is not one of {self.framework}'s: auto, {', '.join(framework.fpn_levels)}"
            )
        if self.fpn_levels == "mobilenet" and not self.backbone.startswith("mobilenet"):
            raise ValueError(f"fpn_levels mobilenet reads a MobileNet's last stage, which {self.backbone} has not; use resnet")
        if self.builder is not None:
            module, _, function = self.builder.partition(":")
            if not module or not function.isidentifier():
                raise ValueError(f"builder {self.builder!r} must look like package.module:function")
            if self.backbone_weights is not None:
                raise ValueError("backbone_weights loads into the backbones gid builds; a builder loads its own weights")
        if self.anchor_octaves != "exact" and not framework.anchor_octaves:
            raise ValueError(f"anchor_octaves {self.anchor_octaves}: {self.framework} has no octave anchor sizes; use exact")
        given = self.detector.given()
        foreign = [name for name in given if name not in (*TRANSFORM_SETTINGS, *framework.settings)]
        if foreign:
            raise ValueError(
                f"detector.{foreign[0]} is not a setting of {self.framework}, whose are: "
                f"{', '.join((*TRANSFORM_SETTINGS, *framework.settings))}"
            )
        if self.builder is not None and (given or self.batchnorm_eps != "auto" or self.anchor_octaves != "exact"):
            raise ValueError("detector, batchnorm_eps and anchor_octaves are a builder function's business, as is its model")
        most = MAX_TRAINABLE_LAYERS[self.backbone]
        if self.trainable_backbone_layers != "auto" and not 0 <= self.trainable_backbone_layers <= most:
            raise ValueError(
                f"trainable_backbone_layers must be 'auto' or 0..{most} for {self.backbone}, "
                f"got {self.trainable_backbone_layers}"
            )
        return self


class TrainConfig(StrictModel):
    epochs: int = Field(12, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_iters: int = Field(100, ge=0)
    warmup_factor: float = Field(0.001, gt=0, le=1)
    schedule: Literal["step", "cosine"] = "step"
    milestones: list[float] = [0.67, 0.92]  # step schedule: fractions of training
    gamma: float = Field(0.1, gt=0, le=1)
    clip_grad_norm: float | None = Field(10.0, gt=0)
    amp: bool = True  # only takes effect on GPU
    seed: int = 0
    eval_every: int = Field(1, ge=1)  # epochs; the last epoch is always evaluated
    # > 0: the student's params and latency_ms (on the CPU, the median of this many timed runs of one image:
    # gid.engine.latency), measured after the first epoch and after the last, reported from the first on
    latency_runs: int = Field(0, ge=0)
    log_every: int = Field(20, ge=1)  # iterations between progress lines

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if any(not 0 < m < 1 for m in self.milestones) or self.milestones != sorted(self.milestones):
            raise ValueError("milestones must be increasing fractions of training in (0, 1)")
        return self


# NCCL refuses two ranks of one process group on the same GPU ("invalid usage"), which is where
# fractional GPUs put a run's workers.
SHARED_GPU_ERROR = (
    "gpus_per_worker below 1 with more than one worker puts one run's workers on the same GPU, which NCCL "
    "refuses; set gpus_per_worker to 1, or use one worker per run and let fractional GPUs share a card between trials"
)


class ScalingConfig(StrictModel):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | Literal["auto"] = "auto"  # auto: GPUs when the Ray cluster has any
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, gt=0)  # fractional GPUs let trials share a card

    @model_validator(mode="after")
    def _one_gpu_per_worker_of_a_run(self) -> ScalingConfig:
        if self.use_gpu is not False and self.num_workers > 1 and self.gpus_per_worker < 1:
            raise ValueError(SHARED_GPU_ERROR)
        return self


class RunConfig(StrictModel):
    name: str | None = None  # default: derived from the config file name
    storage_path: str = "runs"  # Ray Train results and checkpoints (a bucket URI on clusters)
    max_failures: int = Field(0, ge=-1)  # worker failures to recover from (-1: unlimited)
    checkpoints_to_keep: int = Field(2, ge=1)


class GismConfig(StrictModel):
    score_mode: Literal["paper", "reference"] = "paper"
    pre_nms_top_k: int = Field(3000, ge=1)
    min_box_size: float | Literal["auto"] = "auto"  # pixels; auto: 10 at COCO scale
    min_score: float = Field(0.0, ge=0, le=1)
    nms_iou: float = Field(0.3, gt=0, le=1)
    top_k: int = Field(10, ge=1)
    instances: Literal["all", "positive", "semi_positive", "negative", "ground_truth"] = "all"


class FeatureLossConfig(StrictModel):
    enabled: bool = True
    weight: float = Field(5e-3, ge=0)
    adapter: Literal["conv3x3", "conv1x1", "none"] = "conv3x3"
    roi_size: int = Field(10, ge=1)
    canonical_size: float | Literal["auto"] = "auto"  # pixels; auto: 224 at COCO scale
    canonical_level: int = 4


class RelationLossConfig(StrictModel):
    enabled: bool = True
    weight: float = Field(40.0, ge=0)
    group_images: int = Field(2, ge=1)


class ResponseLossConfig(StrictModel):
    enabled: bool = True
    cls_weight: float = Field(0.1, ge=0)
    reg_weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    roi_response: bool = True  # Faster R-CNN: also distil the second stage at the GIs


class BalanceRatios(StrictModel):
    """Per GID term: its gradient norm as a multiple of the detector's own loss's (gradient, dynamic)."""

    feature: float = Field(1.0, gt=0)
    relation: float = Field(1.0, gt=0)
    # 3: chosen with mode dynamic on two development data sets (docs/benchmarks.md)
    response: float = Field(3.0, gt=0)


class BalanceConfig(StrictModel):
    """How the GID terms are weighted: as configured, or from their gradients (beyond the paper).

    gradient: calibrated once, over the first ``calibration_steps`` steps; dynamic: measured every
    ``every_steps`` steps all run long and smoothed with ``momentum`` (gid.distill.balance).
    """

    # dynamic: chosen on two development data sets (docs/benchmarks.md); fixed: the configured weights, as the spec says
    mode: Literal["fixed", "gradient", "dynamic"] = "dynamic"
    calibration_steps: int = Field(10, ge=1)  # gradient: training steps the norms are averaged over
    every_steps: int = Field(50, ge=1)  # dynamic: training steps from one measurement to the next
    momentum: float = Field(0.5, ge=0, lt=1)  # dynamic: weight of the earlier measurements in the smoothed ratios
    ratios: BalanceRatios = BalanceRatios()
    recalibrate: Literal["never", "epoch"] = "never"  # gradient: epoch calibrates again at every epoch's start


class DistillConfig(StrictModel):
    teacher: Path  # checkpoint written by `gid train`
    gism: GismConfig = GismConfig()
    feature: FeatureLossConfig = FeatureLossConfig()
    relation: RelationLossConfig = RelationLossConfig()
    response: ResponseLossConfig = ResponseLossConfig()
    balance: BalanceConfig = BalanceConfig()


class Config(StrictModel):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    distill: DistillConfig | None = None

    def with_absolute_paths(self) -> Config:
        """The same config with local paths made absolute: Ray runs workers in other folders."""
        data = self.to_dict()
        for section, key in (
            ("data", "root"), ("model", "weights"), ("model", "backbone_weights"), ("run", "storage_path"),
            ("distill", "teacher"),
        ):
            value = (data.get(section) or {}).get(key)
            if value is not None and "://" not in str(value):
                data[section][key] = str(expanded(value, f"{section}.{key}").resolve())
        return Config.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-safe dict (what checkpoints and trial configs store)."""
        return self.model_dump(mode="json")


def expanded(path: str | Path, key: str) -> Path:
    """``path`` with ``~`` / ``~user`` expanded; one line, not pathlib's RuntimeError, when that user does not exist."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise GidError(f"{key} {path}: no home folder for {str(path).partition('/')[0]!r}; give a path without it") from None


def scaled_to_input(value: float | str, coco_value: float, image_size: int) -> float:
    """Resolve an "auto" pixel constant given at COCO scale for the actual input size."""
    return coco_value * image_size / COCO_IMAGE_SIZE if value == "auto" else float(value)


# --- loading -------------------------------------------------------------------------------


def read_yaml(path: Path, kind: str = "config file") -> dict[str, Any]:
    """A YAML mapping from ``path``, read with ``safe_load``: tags that would build Python objects are refused."""
    path = Path(path)
    if not path.is_file():
        raise GidError(f"{kind} not found: {path}")
    try:
        data = yaml.safe_load(path.read_bytes()) or {}  # bytes: PyYAML reads UTF-8 and UTF-16, whatever the locale
    except yaml.reader.ReaderError as exc:  # not UTF-8, or a control character
        if exc.encoding == "unicode":
            reason = f"#x{exc.character:04x}: {exc.reason}"
        else:
            reason = f"not {exc.encoding} text ({exc.reason})"
        raise GidError(f"{path}: not valid YAML at character {exc.position}: {reason}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise GidError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise GidError(f"{path}: not valid YAML: nested too deeply") from None
    except (ValueError, TypeError) as exc:  # a value its tag's constructor refuses: !!int abc, an int of 5000 digits
        raise GidError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise GidError(f"{path}: a {kind} must be a YAML mapping, got {type(data).__name__}")
    return data


def set_value(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for the dotted ``key`` "a.b.c", creating sections."""
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise GidError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise GidError(f"override {item!r} must look like key.path=value, e.g. train.lr=0.02")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except (yaml.YAMLError, ValueError, TypeError, RecursionError):  # not YAML (e.g. !!int abc): the text itself
            value = raw
        set_value(data, key, value)
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}; check the spelling (see docs/config.md)"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{source}: {key}: {msg}{shown}"


def validate(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise GidError(format_validation_error(exc, source)) from None


def load_config(path: Path | str | None, overrides: list[str] | None = None) -> Config:
    """Load a config file (or the defaults when ``path`` is None) with dotted overrides."""
    data = read_yaml(Path(path)) if path is not None else {}
    apply_overrides(data, overrides or [])
    config = validate(data, source=str(path) if path else "config")
    if config.run.name is None and path is not None:
        config.run.name = Path(path).stem
    return config
