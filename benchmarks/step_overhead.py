"""GID step overhead: how much a GID training step costs beyond running the two models.

For each framework, on one real batch of the synthetic data, it times

* **student step**: the plain student ``student(images, targets)`` + the training loop's own backward and
  SGD step (``gid.engine.loop.apply_gradients``);
* **teacher fwd**: the teacher's no-grad backbone + FPN + dense head through its DetectorView
  (exactly what GID needs from the teacher; the batch transform is shared with the student,
  so it is done once outside the timer);
* **teacher inference** (reference only): the full ``teacher.eval()(images)``, post-processing included;
* **GID step**: ``Distiller(images, targets)`` + the same backward and SGD step (student and adapter);

* **balance measurement**: one measurement of ``distill.balance.mode: dynamic`` (the detector's and
  each GID term's gradient norms, one backward pass each) on a GID forward's losses; divided by
  ``--every-steps`` and the GID step it is the dynamic balance's cost per step;

and prints ``ratio = GID step / (student step + teacher fwd)``: 1.0 would mean that selecting the
general instances and computing the three losses cost nothing. The four measurements run
round-robin, one of each per iteration, so a change in machine load hits all of them alike;
each number is the median over ``--iters`` iterations after ``--warmup`` unrecorded ones.

A breakdown of the GID step follows, from timers this script wraps around the Distiller's parts
(the library itself has no timing code): student and teacher forward, GISM selection,
feature/relation pooling and losses, response mask and loss, the Faster R-CNN RoI response,
backward, and the rest of the training loop's step (zero_grad, clipping, optimizer, LR schedule).
A part called inside another timed part counts for the outer one. With ``--busy N`` on a GPU it also
gives the share of N GID steps' wall time in which the GPU runs a kernel (low: the step waits on the host).

    python -m benchmarks.step_overhead --image-size 128 --batch-size 8 --iters 10 --warmup 3 --out results.md
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import torch

import gid.distill.distiller as distiller_module
from gid.config import BalanceConfig, DataConfig, DistillConfig, ModelConfig, TrainConfig
from gid.data import build_dataset, collate, make_synthetic
from gid.distill import Distiller
from gid.distill.balance import DynamicBalance
from gid.distill.pooling import InstancePooler
from gid.engine.loop import apply_gradients
from gid.engine.state import build_optimizer
from gid.frameworks import FRAMEWORKS, view_for
from gid.models import build_detector

TARGET_RATIO = 1.15
TARGET_BUSY = 0.70  # of a GID step's wall time, on a GPU
TARGET_BALANCE_COST = 0.05  # of a GID step, per step, at the default every_steps
REPO = Path(__file__).resolve().parent.parent

#: Breakdown rows: (label, timer names summed into it), in the order the GID step runs them.
BREAKDOWN = (
    ("student forward (transform, backbone+FPN, head, anchors, GT loss)", ("student.fwd",)),
    ("teacher forward (no-grad backbone+FPN+head)", ("teacher.fwd",)),
    ("GISM selection (+ logging stats)", ("gism.select", "gism.stats")),
    ("feature/relation: adapter + ROIAlign pooling", ("adapter", "pool")),
    ("feature/relation: losses", ("loss.feature", "loss.relation")),
    ("response: mask (GI target assignment) + loss", ("response.mask", "response.loss")),
    ("RoI response (Faster R-CNN: both box heads + loss)", ("roi.teacher", "roi.student", "roi.loss")),
    ("backward", ("backward",)),
    ("zero_grad, gradient clipping, optimizer step, LR schedule", ("step",)),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset of %(default)s")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--teacher-backbone", default="resnet50")
    p.add_argument("--teacher-fpn", type=int, default=128)
    p.add_argument("--student-backbone", default="resnet18")
    p.add_argument("--student-fpn", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate of both training steps")
    p.add_argument(
        "--clip-grad-norm", type=float, default=10.0,
        help="gradient norm clipping in both training steps, as the training loop does (0: off)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (timers synchronise on cuda)")
    p.add_argument(
        "--amp", action="store_true",
        help="float16 autocast + gradient scaling in every step, as the training loop does on GPUs (cuda only)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--every-steps", type=int, default=BalanceConfig().every_steps,
        help="distill.balance.every_steps the dynamic balance's cost per step is given for (default: the product's)",
    )
    p.add_argument(
        "--busy", type=int, default=0, metavar="N",
        help="also run N GID steps under torch.profiler and give the share of their wall time the GPU spends in "
        "kernels (cuda only; on a CPU the steps run and the share is not applicable)",
    )
    p.add_argument("--out", type=Path, help="append the Markdown results to this file")
    p.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="also run N steps of each under torch.profiler and list the operators the GID step adds "
        "to student step + teacher fwd (self CPU time per step)",
    )
    args = p.parse_args(argv)
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = set(args.frameworks) - set(FRAMEWORKS)
    if unknown:
        p.error(f"unknown framework(s) {sorted(unknown)}; choose from {', '.join(FRAMEWORKS)}")
    if args.iters < 1 or args.warmup < 0 or args.threads < 1 or args.busy < 0:
        p.error("--iters and --threads must be >= 1, --warmup and --busy >= 0")
    if args.amp and not args.device.startswith("cuda"):
        p.error("--amp needs --device cuda (the training loop uses AMP on GPUs only)")
    return args


class Clock:
    """Wall-clock seconds per named part, accumulated within one iteration."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.current: dict[str, float] = defaultdict(float)
        self.history: list[dict[str, float]] = []
        self._depth = 0

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self._depth:  # nested in another timed part: that part gets the time
                return fn(*args, **kwargs)
            self._depth += 1
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] += self.now() - start
                self._depth -= 1

        return timed

    def add(self, name: str, seconds: float) -> None:
        self.current[name] += seconds

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Timed parts called inside count for nothing: another step calling the same patched functions."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def close_iteration(self, record: bool) -> None:
        if record:
            self.history.append(dict(self.current))
        self.current = defaultdict(float)

    def median(self, *names: str) -> float:
        return statistics.median(sum(h.get(n, 0.0) for n in names) for h in self.history)


def instrument(distiller: Distiller, clock: Clock, stack: ExitStack) -> None:
    """Wrap the Distiller's parts in timers (undone when ``stack`` closes)."""
    teacher, student = distiller._views
    patch = lambda target, attr, name: stack.enter_context(  # noqa: E731
        mock.patch.object(target, attr, clock.wrap(name, getattr(target, attr)))
    )
    for method in ("transform", "features", "dense", "anchor_layout", "gt_losses"):
        patch(student, method, "student.fwd")
    for method in ("features", "dense"):
        patch(teacher, method, "teacher.fwd")
    patch(student, "assign_foreground", "response.mask")
    patch(teacher, "roi_outputs", "roi.teacher")
    patch(student, "roi_outputs", "roi.student")  # inside gt_losses it counts as student forward
    if distiller.adapter is not None:
        patch(distiller.adapter, "forward", "adapter")
    for function, name in (
        ("select_general_instances", "gism.select"),
        ("filter_instances", "gism.select"),
        ("gism_stats", "gism.stats"),
        ("feature_loss", "loss.feature"),
        ("relation_loss", "loss.relation"),
        ("response_loss", "response.loss"),
        ("roi_response_loss", "roi.loss"),
    ):
        patch(distiller_module, function, name)
    for method in ("__init__", "__call__"):  # the boxes' levels, then each model's pooling
        patch(InstancePooler, method, "pool")


def make_batch(image_size: int, batch_size: int, seed: int, device: torch.device):
    """A real training batch of the synthetic data (written to a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="gid-bench-") as root:
        make_synthetic(Path(root), train=max(batch_size, 8), val=0, image_size=image_size, seed=seed)
        dataset = build_dataset(DataConfig(root=Path(root), hflip_prob=0.0), "train", train=True)
        images, targets = collate([dataset[i] for i in range(batch_size)])
    images = [image.to(device) for image in images]
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets, dataset.num_classes


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(v for k, v in losses.items() if k.startswith("loss_"))


def bench_framework(framework: str, args: argparse.Namespace, batch, device: torch.device) -> dict:
    images, targets, num_classes = batch
    torch.manual_seed(args.seed)
    teacher = build_detector(
        ModelConfig(framework=framework, backbone=args.teacher_backbone, fpn_channels=args.teacher_fpn),
        args.image_size, num_classes,
    ).to(device)
    student = build_detector(
        ModelConfig(framework=framework, backbone=args.student_backbone, fpn_channels=args.student_fpn),
        args.image_size, num_classes,
    ).to(device)
    gid_student = copy.deepcopy(student)  # same start, separate weights: each step trains its own
    # .to(device) moves the adapter, which the Distiller creates on the CPU
    distiller = Distiller(teacher, gid_student, DistillConfig(teacher="unused"), args.image_size).to(device).train()
    student.train()
    teacher_view = view_for(teacher)
    with torch.no_grad():
        teacher_batch, _ = teacher_view.transform(images)  # the GID step transforms once, for both

    train = TrainConfig(lr=args.lr)  # the training loop's SGD (momentum 0.9, weight decay 1e-4)
    student_params = [p for p in student.parameters() if p.requires_grad]
    gid_params = [p for p in distiller.parameters() if p.requires_grad]
    student_opt, gid_opt = build_optimizer(student_params, train), build_optimizer(gid_params, train)

    def autocast():
        return torch.autocast(device.type, dtype=torch.float16, enabled=args.amp)

    # Each step's scaler and (constant) LR schedule, as the training loop keeps them.
    updates = {
        id(optimizer): (torch.amp.GradScaler(enabled=args.amp), torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0))
        for optimizer in (student_opt, gid_opt)
    }
    student_clock, gid_clock = Clock(device), Clock(device)
    finite = {"student": True, "gid": True}

    def backward_and_step(clock: Clock, loss: torch.Tensor, params, optimizer) -> None:
        """The training loop's step (``apply_gradients``): its backward pass timed as "backward", the rest as "step"."""
        scaler, scheduler = updates[id(optimizer)]
        backward_before = clock.current["backward"]
        start = clock.now()
        with mock.patch.object(torch.Tensor, "backward", clock.wrap("backward", torch.Tensor.backward)):
            apply_gradients(loss, optimizer, scaler, scheduler, params, args.clip_grad_norm or None)
        clock.add("step", clock.now() - start - (clock.current["backward"] - backward_before))

    def student_step() -> None:
        start = student_clock.now()
        with autocast():
            loss = sum(student(images, targets).values())  # torchvision's own loss dict
        student_clock.add("forward", student_clock.now() - start)
        backward_and_step(student_clock, loss, student_params, student_opt)
        finite["student"] &= bool(torch.isfinite(loss))

    @torch.no_grad()
    def teacher_forward() -> None:
        with autocast():
            teacher_view.dense(teacher_view.features(teacher_batch))

    @torch.no_grad()
    def teacher_inference() -> None:
        with autocast():
            teacher(images)

    # A copy with its own scales: measuring changes no weight the GID step trains with.
    measured = copy.deepcopy(distiller)
    balance = DynamicBalance(BalanceConfig(mode="dynamic"), measured)
    measured_params = [p for p in measured.parameters() if p.requires_grad]
    measurements: list[float] = []
    gis_per_image = []

    def balance_measurement() -> None:
        with autocast(), gid_clock.paused():  # the module's functions are patched for the GID step's breakdown
            losses = measured(images, targets)
        start = clock.now()
        balance.measure(losses, measured_params)
        measurements.append(clock.now() - start)

    def gid_step() -> None:
        with autocast():
            losses = distiller(images, targets)
            loss = total_loss(losses)
        backward_and_step(gid_clock, loss, gid_params, gid_opt)
        finite["gid"] &= bool(torch.isfinite(loss))
        gis_per_image.append(float(losses["gism_gis_per_image"]))

    steps = {
        "student": student_step,
        "teacher": teacher_forward,
        "inference": teacher_inference,
        "gid": gid_step,
        "balance": balance_measurement,  # its forward is not timed: only the measurement
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    clock = Clock(device)
    with ExitStack() as stack:
        instrument(distiller, gid_clock, stack)
        for it in range(args.warmup + args.iters):
            record = it >= args.warmup
            names = list(steps)
            names = names[it % len(names):] + names[: it % len(names)]  # rotate: no fixed order bias
            for name in names:
                start = clock.now()
                steps[name]()
                elapsed = clock.now() - start
                if record:
                    times[name].append(elapsed)
            student_clock.close_iteration(record)
            gid_clock.close_iteration(record)

    profile_rows = profile_extra_ops(steps, args.profile) if args.profile else []
    busy = device_busy(gid_step, args.busy, device) if args.busy else None
    student_clock.close_iteration(False)
    gid_clock.close_iteration(False)

    med = {name: statistics.median(values) * 1e3 for name, values in times.items() if name != "balance"}
    measurement = statistics.median(measurements[args.warmup:]) * 1e3
    breakdown = [(label, gid_clock.median(*names) * 1e3) for label, names in BREAKDOWN]
    gid_total = times["gid"]
    parts = [n for _, names in BREAKDOWN for n in names]
    other = statistics.median(
        total - sum(h.get(n, 0.0) for n in parts) for total, h in zip(gid_total, gid_clock.history)
    ) * 1e3
    breakdown.append(("other (Distiller glue, loss sum)", other))
    return {
        "framework": framework,
        "student": med["student"],
        "teacher": med["teacher"],
        "inference": med["inference"],
        "gid": med["gid"],
        "ratio": med["gid"] / (med["student"] + med["teacher"]),
        "gid_images_per_s": args.batch_size / statistics.median(times["gid"]),
        "measurement": measurement,
        "balance_cost": measurement / args.every_steps / med["gid"],
        # Preemption on a shared machine only ever adds time: the minima are the low-noise view.
        "ratio_min": min(times["gid"]) / (min(times["student"]) + min(times["teacher"])),
        "student_parts": {k: student_clock.median(k) * 1e3 for k in ("forward", "backward", "step")},
        "breakdown": breakdown,
        "gis_per_image": statistics.median(gis_per_image) if gis_per_image else 0.0,
        "finite": finite,
        "profile": profile_rows,
        "busy": busy,
    }


def profile_extra_ops(
    steps: dict[str, Callable[[], None]], iters: int, rows: int = 12
) -> list[tuple[str, float, float]]:
    """Operators by self time per step: GID step minus (student step + teacher fwd), largest first."""
    from torch.profiler import ProfilerActivity, profile

    per_step = {}
    for name in ("student", "teacher", "gid"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                steps[name]()
        per_step[name] = {e.key: e.self_cpu_time_total / iters / 1e3 for e in prof.key_averages()}
    base = defaultdict(float)
    for name in ("student", "teacher"):
        for key, ms in per_step[name].items():
            base[key] += ms
    extra = [(key, per_step["gid"].get(key, 0.0) - base.get(key, 0.0), per_step["gid"].get(key, 0.0))
             for key in set(base) | set(per_step["gid"])]
    return sorted(extra, key=lambda row: -row[1])[:rows]


def device_busy(step: Callable[[], None], iters: int, device: torch.device) -> float | None:
    """The share of ``iters`` steps' wall time in which the GPU runs a kernel (overlapping kernels counted once);
    None on a CPU, where there is no device to wait for."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    clock = Clock(device)
    with profile(activities=activities) as prof:
        start = clock.now()
        for _ in range(iters):
            step()
        wall_us = (clock.now() - start) * 1e6
    if device.type != "cuda":
        return None
    kernels = sorted(
        (event.time_range.start, event.time_range.end)
        for event in prof.events()
        if event.device_type == torch.autograd.DeviceType.CUDA
    )
    busy_us, covered_until = 0.0, float("-inf")
    for start_us, end_us in kernels:  # the union of the kernels' intervals
        start_us = max(start_us, covered_until)
        if end_us > start_us:
            busy_us += end_us - start_us
            covered_until = end_us
    return busy_us / wall_us


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=REPO,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "gid/distill", "gid/models"],
            capture_output=True, text=True, cwd=REPO,
        ).stdout.strip()
        return out.stdout.strip() + (" + uncommitted changes in gid/distill or gid/models" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A Markdown table, the first column left-aligned and the rest right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def flag(met: bool) -> str:
    return "" if met else " ⚠"


def render(results: list[dict], args: argparse.Namespace, device: torch.device) -> str:
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {os.cpu_count()} cores"
    lines = [
        f"### step overhead: image {args.image_size}, batch {args.batch_size}, {args.device}",
        "",
        f"- command: `python -m benchmarks.step_overhead {' '.join(sys.argv[1:])}`",
        f"- machine: {machine}; torch {torch.__version__}, {args.threads} thread(s); "
        f"load average at the end {os.getloadavg()[0]:.2f}",
        f"- commit: {commit()}",
        f"- teacher {args.teacher_backbone} FPN {args.teacher_fpn}, student {args.student_backbone} FPN "
        f"{args.student_fpn}; SGD lr {args.lr}, momentum 0.9, clip {args.clip_grad_norm or 'off'}; "
        f"{'AMP (float16 autocast + gradient scaling)' if args.amp else 'float32'}; "
        f"median of {args.iters} iterations after {args.warmup} warm-up",
        "",
    ]
    lines += table(
        ("framework", "student step ms", "teacher fwd ms", "GID step ms", "ratio GID / (student + teacher)",
         "ratio of the minima", "teacher inference ms (ref.)", "GIs / image", "GID images/s"),
        [
            (r["framework"], f"{r['student']:.1f}", f"{r['teacher']:.1f}", f"{r['gid']:.1f}",
             f"**{r['ratio']:.3f}**" + flag(r["ratio"] <= TARGET_RATIO), f"{r['ratio_min']:.3f}",
             f"{r['inference']:.1f}", f"{r['gis_per_image']:.1f}", f"{r['gid_images_per_s']:.1f}")
            for r in results
        ],
    )
    lines += [
        "",
        f"Times are medians (the ratio of the minima uses each column's fastest iteration). Target: ratio ≤ "
        f"{TARGET_RATIO}.",
        "",
    ]
    if args.busy:
        lines += [
            f"GPU busy during {args.busy} GID steps (kernel time over wall time, torch.profiler; target ≥ "
            f"{100 * TARGET_BUSY:.0f} %): "
            + ", ".join(
                f"{r['framework']} " + (f"**{100 * r['busy']:.0f} %**" + flag(r["busy"] >= TARGET_BUSY)
                                        if r["busy"] is not None else "not applicable on a CPU")
                for r in results
            ),
            "",
        ]
    lines += [
        f"Dynamic balance (`distill.balance.mode: dynamic`): one measurement, and its cost per step at "
        f"`every_steps: {args.every_steps}` as a share of the GID step (target ≤ {100 * TARGET_BALANCE_COST:.0f} %).",
        "",
    ]
    lines += table(
        ("framework", "measurement ms", "in GID steps", "cost per step"),
        [
            (r["framework"], f"{r['measurement']:.1f}", f"{r['measurement'] / r['gid']:.2f}",
             f"**{100 * r['balance_cost']:.1f} %**" + flag(r["balance_cost"] <= TARGET_BALANCE_COST))
            for r in results
        ],
    )
    lines.append("")
    for r in results:
        sp = r["student_parts"]
        gid_backward = dict(r["breakdown"])["backward"]
        lines += [
            f"GID step breakdown, {r['framework']} (medians). GID step {r['gid']:.1f} ms, "
            f"{r['gid'] - r['student'] - r['teacher']:.1f} ms more than student step + teacher fwd. "
            f"Plain student step: forward {sp['forward']:.1f} / backward {sp['backward']:.1f} / "
            f"zero_grad, clip + step {sp['step']:.1f} ms, so the GID losses add about "
            f"{gid_backward - sp['backward']:.1f} ms of backward.",
            "",
            "| part | ms | share of GID step |",
            "|---|---:|---:|",
        ]
        for label, ms in r["breakdown"]:
            lines.append(f"| {label} | {ms:.1f} | {100 * ms / r['gid']:.1f}% |")
        if r["profile"]:
            lines += [
                "",
                f"Operators the GID step adds, {r['framework']} (torch.profiler, self CPU ms per step; "
                "GID step minus student step + teacher fwd):",
                "",
                "| operator | extra ms | ms in GID step |",
                "|---|---:|---:|",
            ]
            lines += [f"| `{key}` | {extra:.1f} | {total:.1f} |" for key, extra, total in r["profile"]]
        if not all(r["finite"].values()):
            lines.append(f"\nWarning: non-finite loss seen ({r['finite']}).")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = make_batch(args.image_size, args.batch_size, args.seed, device)
    results = []
    for framework in args.frameworks:
        print(f"timing {framework} ...", file=sys.stderr, flush=True)
        results.append(bench_framework(framework, args, batch, device))
    text = render(results, args, device)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
