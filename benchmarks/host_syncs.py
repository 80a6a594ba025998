"""Host synchronisations per GID training step: how many, and which line of code makes each.

On a GPU the training loop only queues work: Python runs ahead while the device computes. An operation
that needs a device result on the host (a Python number from a tensor, a shape that depends on the data, a
blocking copy between host and device) makes the host wait until everything queued before it has run, and
the device then idles while the host queues what follows. This script counts them in GID training steps.

On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` reports every synchronisation the CUDA runtime makes.
Elsewhere :class:`SyncCounter` recognises the operations that synchronise on a GPU:

- a Python value from a tensor: ``.item()``, ``bool()``, ``float()``, ``int()`` (aten ``_local_scalar_dense``),
  ``.tolist()``, ``.numpy()``, ``torch.equal``;
- a copy between host and device that is not ``non_blocking``: ``.cpu()``, ``.cuda()``, ``.to("cpu")`` and other
  devices given by name (one given as a ``torch.device`` may be the one the tensor is on already, which a CPU
  run cannot tell), and a tensor made from Python data on a device (``torch.tensor(data, device=...)``,
  ``as_tensor``, ``new_tensor``);
- a shape that depends on the data: ``nonzero`` (so ``argwhere`` and one-argument ``where``), indexing or
  assigning through a boolean mask, ``masked_select``, ``unique``, ``repeat_interleave`` with tensor repeats
  and no ``output_size``, ``bincount``, torchvision's ``nms``.

On a CPU every tensor is on the host, so the count there also takes in these operations on tensors that stay
on the host on a GPU. ``torch.cuda.synchronize`` runs only with a GPU, where the debug mode reports it.

Each sync is put down to the innermost frame of gid or torchvision that led to it (torch's own Python code
and the standard library are passed over); torchvision's also name the gid line that called into
torchvision. A sync in backward (e.g. the gradient of a boolean index) is put down to the line of its forward
operation, which anomaly mode records (on a GPU, to the line that called backward). gid's matrix-product
ROIAlign and Faster R-CNN box pooler (``gid.models.roi_align``) run only where a backward on the CPU
follows; their syncs are reported as "gid, CPU only": on a GPU torchvision's ``roi_align`` and
``MultiScaleRoIAlign`` run in their place.

A GID training step is what ``gid.engine.loop.train_one_epoch`` does with one batch: the Distiller's forward
(teacher and student, GISM, the losses), the loss check, the gradient balance, backward and the optimizer
step, and the loop's bookkeeping. The script runs one epoch of ``train_one_epoch`` itself, over a loader that
tells the counter which step runs, and reports separately the ordinary steps, those that log
(``train.log_every``) and those on which the balance measures (``distill.balance.every_steps``).

    python -m benchmarks.host_syncs [--frameworks retinanet,fcos,faster_rcnn] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import re
import sys
import sysconfig
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import gid
from benchmarks.step_overhead import commit, cpu_name
from gid.config import Config, DataConfig, ModelConfig, validate
from gid.data import build_dataset, collate, make_synthetic
from gid.distill import Distiller
from gid.engine.loop import train_one_epoch
from gid.engine.state import start_training_state
from gid.frameworks import FRAMEWORKS
from gid.models import build_detector
from gid.models.roi_align import MatmulMultiScaleRoIAlign, roi_align_by_matmul

TARGET = 3  # gid's own syncs per ordinary step

EPOCH_START, EPOCH_END = "epoch start", "epoch end"  # what runs before the first step and after the last

aten = torch.ops.aten

#: aten operations that synchronise on a GPU whatever their arguments.
_ATEN_SYNCS = {
    aten._local_scalar_dense: "item",
    aten.equal: "equal",
    aten.nonzero: "nonzero",
    aten.masked_select: "masked_select",
    aten._unique: "unique",
    aten._unique2: "unique",
    aten.unique_dim: "unique",
    aten.unique_consecutive: "unique",
    aten.bincount: "bincount",
    torch.ops.torchvision.nms: "nms",
}
_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}

#: Tensor methods and torch functions that synchronise on a GPU: the host reads the data, or copies it.
_CALL_SYNCS = {
    torch.Tensor.tolist: "tolist",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.cuda: "cuda",
    torch.Tensor.new_tensor: "tensor from data",
}
_FROM_DATA = {torch.tensor, torch.as_tensor}  # a copy to the device when one is named

#: gid code that runs only where a backward on the CPU follows (on a GPU, torchvision's ops run instead).
_CPU_ONLY = {
    (code.co_filename, code.co_name) for code in (roi_align_by_matmul.__code__, MatmulMultiScaleRoIAlign.forward.__code__)
}

_GID = str(Path(gid.__file__).parent) + "/"
_TORCHVISION = str(Path(torchvision.__file__).parent) + "/"
_PASSED_OVER = (str(Path(torch.__file__).parent) + "/", sysconfig.get_paths()["stdlib"] + "/", __file__)
_TRACEBACK_LINE = re.compile(r'File "(.+)", line (\d+), in (.+)')


@dataclass(frozen=True)
class Sync:
    """One host synchronisation, put down to the code that made it."""

    op: str  # what synchronised: "item", "nonzero", "bool mask index", ...; "CUDA sync" on a GPU
    owner: str  # "gid", "gid, CPU only", "torchvision" or "other"
    where: str  # e.g. "gid/distill/gism.py:143 _first_nms_survivors"
    caller: str | None  # torchvision's: the gid line that called into torchvision
    step: int | str  # the training step, or EPOCH_START / EPOCH_END

    @property
    def source(self) -> str:
        return f"{self.where} {self.op}" + (f" (from {self.caller})" if self.caller else "")


@dataclass(frozen=True)
class _Frame:
    filename: str
    line: int
    name: str  # the function's name
    qualname: str  # with its class, where known

    def __str__(self) -> str:
        path = self.filename
        for root in (_GID, _TORCHVISION):
            if path.startswith(root):
                path = str(Path(path).relative_to(Path(root).parent))
        return f"{path}:{self.line} {self.qualname}"


def _live_frames(frame) -> Iterator[_Frame]:
    """The stack from ``frame`` outwards."""
    while frame is not None:
        code = frame.f_code
        yield _Frame(code.co_filename, frame.f_lineno, code.co_name, code.co_qualname)
        frame = frame.f_back


def _forward_frames(node) -> list[_Frame]:
    """Where the forward operation of a backward ``node`` ran, innermost first (anomaly mode keeps it)."""
    frames = [_TRACEBACK_LINE.search(entry) for entry in node.metadata.get("traceback_", [])]
    return [_Frame(m[1], int(m[2]), m[3], m[3]) for m in reversed(frames) if m]


def _origin(frames) -> tuple[str, str, str | None]:
    """(owner, where, caller) of an operation run from ``frames``, innermost first."""
    owner = where = caller = None
    cpu_only = False
    for frame in frames:
        cpu_only |= (frame.filename, frame.name) in _CPU_ONLY
        if frame.filename.startswith(_GID):
            if owner is None:
                owner, where = "gid", str(frame)
            elif owner == "torchvision" and caller is None:
                caller = str(frame)
        elif frame.filename.startswith(_TORCHVISION) and owner is None:
            owner, where = "torchvision", str(frame)
        elif owner is None and where is None and not frame.filename.startswith(_PASSED_OVER):
            where = str(frame)  # outside gid and torchvision: the first line of the caller's code
    if owner == "gid" and cpu_only:
        owner = "gid, CPU only"
    return owner or "other", where or "?", caller


class _AtenCounter(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        op = _ATEN_SYNCS.get(packet)
        if packet in _INDEXING and any(
            index is not None and index.dtype in (torch.bool, torch.uint8) for index in args[1]
        ):
            op = "bool mask index"
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            op = "repeat_interleave"
        if op is not None:
            node = torch._C._current_autograd_node()
            if node is None:
                self.counter.record(op, _live_frames(sys._getframe(1)))
            else:  # in backward: put down to the forward operation whose gradient this is
                self.counter.record(f"{op}, backward", _forward_frames(node))
        return func(*args, **kwargs)


class _CallCounter(TorchFunctionMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _CALL_SYNCS.get(func)
        if func is torch.Tensor.to:
            # a device given as a torch.device may be the one the tensor is on already: only a named one counts
            if isinstance(_target_device(args, kwargs), str) and not _non_blocking(args, kwargs):
                op = "to(device)"
        elif func in _FROM_DATA and kwargs.get("device") is not None and not torch.is_tensor(args[0]):
            op = "tensor from data"
        if op is not None:
            self.counter.record(op, _live_frames(sys._getframe(1)))
        return func(*args, **kwargs)


def _target_device(args, kwargs):
    return kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))


def _non_blocking(args, kwargs) -> bool:
    return kwargs.get("non_blocking", next((a for a in args[1:] if isinstance(a, bool)), False))


class SyncCounter:
    """Records every host synchronisation while it is entered, in :attr:`syncs`; :attr:`step` labels them.

    On a CUDA ``device`` the CUDA runtime reports them (``torch.cuda.set_sync_debug_mode``); elsewhere the
    operations that synchronise on a GPU are recognised as they run (the module's docstring lists them).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.syncs: list[Sync] = []
        self.step: int | str = EPOCH_START

    def record(self, op: str, frames) -> None:
        self.syncs.append(Sync(op, *_origin(frames), self.step))

    def __enter__(self) -> SyncCounter:
        if self.device.type == "cuda":
            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._warned
            torch.cuda.set_sync_debug_mode("warn")
        else:
            # anomaly mode keeps each backward node's forward stack, so syncs in backward find their line
            anomaly = torch.autograd.set_detect_anomaly(True, check_nan=False)
            self._modes = [anomaly, _CallCounter(self), _AtenCounter(self)]
            for mode in self._modes:
                mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
        else:
            for mode in reversed(self._modes):
                mode.__exit__(*exc)

    def _warned(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing CUDA operation" in str(message):
            self.record("CUDA sync", _live_frames(sys._getframe(1)))


# --- GID training steps --------------------------------------------------------------------------


@dataclass
class Step:
    """The syncs of one training step (or of what runs before the first or after the last)."""

    index: int | str
    kind: str  # "ordinary", "logging", "balance", "logging, balance"; or EPOCH_START / EPOCH_END
    syncs: list[Sync] = field(default_factory=list)

    def count(self, owner: str) -> int:
        return sum(sync.owner == owner for sync in self.syncs)


class _CountedSteps:
    """The loop's loader: yields ``batches`` one step each, telling the counter which step runs and noting
    the balance's backward passes at each step's start (a step that adds some measured)."""

    sampler = None  # not a DistributedSampler

    def __init__(self, batches: list, counter: SyncCounter, balance):
        self.batches, self.counter, self.balance = batches, counter, balance
        self.passes: list[int] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        for index, batch in enumerate(self.batches):
            self.passes.append(self._passes())
            self.counter.step = index
            yield batch
        self.passes.append(self._passes())
        self.counter.step = EPOCH_END

    def _passes(self) -> int:
        return 0 if self.balance is None else self.balance.extra_backward_passes


def count_step_syncs(
    distiller: Distiller, config: Config, batches: list, device: torch.device, amp: bool = False
) -> list[Step]:
    """Train ``distiller`` (on ``device``) one epoch of ``len(batches)`` steps with the loop's own
    ``train_one_epoch`` and ``config``'s training settings and balance; each step's syncs, with what runs
    before the first step and after the last. ``amp`` on a CPU: train with autocast and gradient scaling
    as on a GPU (the CPU's GradScaler runs the CUDA scaler's logic)."""
    state = start_training_state(config, distiller, len(batches), device)
    if amp and not state.scaler.is_enabled():
        state.scaler = torch.amp.GradScaler(device.type)
    counter = SyncCounter(device)
    loader = _CountedSteps(batches, counter, state.balance)
    with counter:
        train_one_epoch(distiller, state, loader, device, config.train, rank=0)
    steps = [Step(EPOCH_START, EPOCH_START)]
    for index in range(len(batches)):
        kinds = ["logging"] if (index + 1) % config.train.log_every == 0 else []  # the loop's rule
        kinds += ["balance"] if loader.passes[index + 1] > loader.passes[index] else []
        steps.append(Step(index, ", ".join(kinds) or "ordinary"))
    steps.append(Step(EPOCH_END, EPOCH_END))
    by_index = {step.index: step for step in steps}
    for sync in counter.syncs:
        by_index[sync.step].syncs.append(sync)
    return steps


# --- the benchmark ---------------------------------------------------------------------------------


OWNERS = ("gid", "gid, CPU only", "torchvision", "other")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", type=lambda s: s.split(","), default=list(FRAMEWORKS))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=4, help="train.log_every")
    parser.add_argument("--every-steps", type=int, default=3, help="distill.balance.every_steps (mode dynamic)")
    parser.add_argument("--teacher-backbone", default="resnet50")
    parser.add_argument("--teacher-fpn", type=int, default=128)
    parser.add_argument("--student-backbone", default="resnet18")
    parser.add_argument("--student-fpn", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--amp", action="store_true", help="autocast and gradient scaling (a GPU's default), on any device"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the counts do not depend on it)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def synthetic_batches(root: Path, args: argparse.Namespace) -> list:
    """``args.steps`` batches of the synthetic training data (augmented as training augments them)."""
    make_synthetic(root, train=args.steps * args.batch_size, val=0, image_size=args.image_size, seed=args.seed)
    dataset = build_dataset(DataConfig(root=root), "train", train=True)
    items = [dataset[i] for i in range(args.steps * args.batch_size)]
    return [collate(items[i : i + args.batch_size]) for i in range(0, len(items), args.batch_size)]


def framework_steps(framework: str, root: Path, batches: list, args: argparse.Namespace) -> list[Step]:
    config = validate({
        "data": {"root": str(root), "image_size": args.image_size, "batch_size": args.batch_size},
        "model": {"framework": framework, "backbone": args.student_backbone, "fpn_channels": args.student_fpn},
        "train": {"epochs": 1, "log_every": args.log_every, "seed": args.seed},
        "distill": {"teacher": "unused", "balance": {"mode": "dynamic", "every_steps": args.every_steps}},
    })
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    num_classes = build_dataset(config.data, "train", train=False).num_classes
    teacher_model = ModelConfig(framework=framework, backbone=args.teacher_backbone, fpn_channels=args.teacher_fpn)
    teacher = build_detector(teacher_model, args.image_size, num_classes)
    student = build_detector(config.model, args.image_size, num_classes)
    distiller = Distiller(teacher, student, config.distill, args.image_size).to(device)
    return count_step_syncs(distiller, config, batches, device, args.amp)


def per_step(counts: list[int]) -> str:
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low}–{high}"


def sources(steps: list[Step], owner: str) -> list[str]:
    """Each line that made ``owner``'s syncs in ``steps``, with its count per step, most first."""
    counts = Counter(sync.source for step in steps for sync in step.syncs if sync.owner == owner)
    return [f"  - {source} ×{count / len(steps):g}" for source, count in counts.most_common()]


def render(results: dict[str, list[Step]], args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    lines = [
        f"host syncs per GID training step: image {args.image_size}, batch {args.batch_size}, {args.device}",
        f"command: python -m benchmarks.host_syncs {' '.join(sys.argv[1:])}",
        f"machine: {machine}; torch {torch.__version__}, torchvision {torchvision.__version__}; commit {commit()}",
        f"teacher {args.teacher_backbone} FPN {args.teacher_fpn}, student {args.student_backbone} FPN "
        f"{args.student_fpn}; {args.steps} steps, train.log_every {args.log_every}, distill.balance dynamic, "
        f"every_steps {args.every_steps}; {'AMP' if args.amp else 'float32'}",
        "",
        "| framework | steps | " + " | ".join(OWNERS) + " |",
        "|---|---|" + "---:|" * len(OWNERS),
    ]
    kinds = {framework: _by_kind(steps) for framework, steps in results.items()}
    for framework, by_kind in kinds.items():
        for label, chosen in by_kind.items():
            counts = [per_step([step.count(owner) for step in chosen]) for owner in OWNERS]
            lines.append(f"| {framework} | {label} | " + " | ".join(counts) + " |")
    lines += [
        "", f"Target: gid's own syncs ≤ {TARGET} per ordinary step. Where they come from, per step "
        "(gid's for every kind of step, the others' for the ordinary steps):",
    ]
    for framework, by_kind in kinds.items():
        lines.append(f"- {framework}")
        for label, chosen in by_kind.items():
            owners = OWNERS if chosen[0].kind == "ordinary" else OWNERS[:1]
            for owner in owners:
                found = sources(chosen, owner)
                lines += [f"  {owner}, {label}:", *found] if found else []
    return "\n".join(lines)


def _by_kind(steps: list[Step]) -> dict[str, list[Step]]:
    """The steps of each kind, under a label that lists their indices."""
    by_kind: dict[str, list[Step]] = {}
    for kind in ("ordinary", "logging", "balance", "logging, balance", EPOCH_START, EPOCH_END):
        chosen = [step for step in steps if step.kind == kind]
        if chosen:
            numbers = "" if isinstance(chosen[0].index, str) else f" ({', '.join(str(s.index) for s in chosen)})"
            by_kind[kind + numbers] = chosen
    return by_kind


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="gid-syncs-") as root:
        batches = synthetic_batches(Path(root), args)
        for framework in args.frameworks:
            print(f"counting {framework} ...", file=sys.stderr, flush=True)
            results[framework] = framework_steps(framework, Path(root), batches, args)
    print(render(results, args))


if __name__ == "__main__":
    main()
