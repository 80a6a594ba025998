"""The training loop: one function trains a detector or a GID student.

Every Ray Train worker runs :func:`train_loop_per_worker`; a single-worker sweep trial runs
:func:`train_loop` in its Tune trial's process (``gid.engine.session``). The session provides
the device, DDP and the distributed sampler on Train workers, checkpoint persistence and
resumption, and where each epoch is reported.

Shaped as torchvision's references/detection: :func:`train_one_epoch` and :func:`evaluate` are the
two steps of an epoch, ``gid.engine.state.TrainingState`` is what a checkpoint holds, and a detector trained
on its own (:class:`StudentAlone`) is trained through the same interface as a GID student (a Distiller).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from ray.util.queue import Queue
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from gid.config import Config, TrainConfig
from gid.data import DetectionDataset, build_dataset, collate
from gid.engine.evaluation import coco_metrics, format_metrics, predict
from gid.engine.latency import cpu_cost
from gid.engine.memory import memory_peak_mb, out_of_memory_as_user_error
from gid.engine.session import Session, TrainWorker
from gid.engine.state import CHECKPOINT_FILE, TrainingState, resume, start_training_state
from gid.engine.step_progress import ProgressSender
from gid.logs import configure_worker as configure_worker_logging
from gid.models import build_detector, load_backbone_weights, load_weights

logger = logging.getLogger(__name__)

PICTURES_DIR = "gi_pictures"  # in the last checkpoint of a distillation: what GISM picked


def build_trainable(config: Config, num_classes: int, device: torch.device) -> nn.Module:
    """The module whose forward returns the training losses: the detector, or a Distiller."""
    student = build_detector(config.model, config.data.image_size, num_classes)
    if config.model.backbone_weights is not None:
        load_backbone_weights(student, config.model.backbone_weights, config.model.backbone)
    if config.model.weights is not None:  # a whole detector: over the backbone's weights, if both are given
        load_weights(student, config.model.weights, config.model.framework, num_classes)
    if config.distill is None:
        return student
    from gid.distill import Distiller  # the method package is only needed for distillation

    return Distiller.from_config(student, config.distill, config.data.image_size, device)


class StudentAlone(nn.Module):
    """A detector trained on its own, behind the Distiller's interface, so that the loop trains both one way:
    ``student``, ``adapter``, ``teacher_val_ap``, and a forward that names the detector's losses ``loss_gt_*``."""

    adapter: nn.Module | None = None  # no GID adapter
    teacher_val_ap: float | None = None  # no teacher

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {f"loss_gt_{k.removeprefix('loss_')}": v for k, v in self.student(images, targets).items()}


def known_teacher_ap(config: Config, trainable: nn.Module) -> float | None:
    """The teacher's validation AP: its model file's, else the one the driver measured on this split."""
    if config.distill is None or trainable.teacher_val_ap is not None:
        return trainable.teacher_val_ap
    from gid.distill.teacher import cached_val_ap

    return cached_val_ap(config)


MAX_AUTO_LOADER_WORKERS = 4


def loader_workers(config: Config, device: torch.device) -> int:
    """``data.loader_workers``, ``auto`` resolved. On a GPU, loading beside the step keeps the device fed: the
    worker's CPUs but the one that trains. On a CPU the step needs every core, and reading and augmenting an
    image costs a hundredth of what training on it does (docs/benchmarks.md, "Data loading"): none."""
    workers = config.data.loader_workers
    if workers != "auto":
        return workers
    if device.type != "cuda":
        return 0
    return max(0, min(MAX_AUTO_LOADER_WORKERS, int(config.scaling.cpus_per_worker) - 1))


def _loader(dataset, batch_size: int, workers: int, shuffle: bool, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=collate,
        persistent_workers=workers > 0, pin_memory=device.type == "cuda",  # pinned: copies that overlap compute
    )


def _to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device) -> tuple[list, list]:
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


def _all_gather(value: object) -> list:
    """``value`` from every worker, in rank order (just ``[value]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _detections_on_rank_zero(records: list[dict]) -> list[dict] | None:
    """Every worker's detections (each predicted its shard of the validation set) on rank 0, None elsewhere.

    Only rank 0's metrics reach Ray Train's report, so only rank 0 runs COCO evaluation.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    shards: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(records, shards, dst=0)
    if shards is None:
        return None
    # The distributed sampler pads the last shard with repeated images: keep one copy of each.
    seen: set[int] = set()
    merged: list[dict] = []
    for shard in shards:
        merged += [r for r in shard if r["image_id"] not in seen]
        seen |= {r["image_id"] for r in shard}
    return merged


class _RunningMean:
    """Each step's values summed on their device: the host waits for them only when it reads the means."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().double()  # float64, as the sums of Python floats were
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1

    def means(self) -> dict[str, float]:
        if not self.sums:
            return {}
        totals = torch.stack(list(self.sums.values())).tolist()  # one host synchronisation for all
        return {name: total / max(self.count, 1) for name, total in zip(self.sums, totals)}


def total_loss(losses: dict[str, Tensor], epoch: int, it: int) -> Tensor:
    """The sum of the ``loss_*`` terms; a loss that is no longer finite stops the run, naming every term."""
    loss = sum(v for k, v in losses.items() if k.startswith("loss_"))
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"training loss became {loss.item()} at epoch {epoch + 1}, iteration {it + 1} "
            f"({', '.join(f'{k}={float(v):.4g}' for k, v in losses.items())}); lower train.lr or the loss weights"
        )
    return loss


def apply_gradients(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.nn.Parameter],
    clip_grad_norm: float | None,
) -> None:
    """Backward pass and one optimizer step; the LR schedule advances only when the weights do."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    # AMP skips the optimizer's step when the gradients are inf/NaN. Whether it stepped is learnt from the
    # optimizer's own hook: reading the scale before and after would make the host wait for the device twice.
    stepped = []
    hook = optimizer.register_step_post_hook(lambda *_: stepped.append(True))
    scaler.step(optimizer)
    hook.remove()
    scaler.update()
    if stepped:
        scheduler.step()


def train_one_epoch(
    model: nn.Module, state: TrainingState, loader: DataLoader, device: torch.device, train: TrainConfig, rank: int,
    progress: ProgressSender | None = None,
) -> tuple[dict[str, float], float | None]:
    """Train ``model`` (``state.trainable``, wrapped for DDP) one pass over ``loader`` and advance ``state`` by an epoch.

    Returns the epoch's mean losses and time, and the wall clock of its first step. ``progress`` (rank 0's)
    is told of each step.
    """
    epoch, balance = state.epoch, state.balance
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    model.train()
    if balance is not None:
        balance.start_epoch()
    running = _RunningMean()
    first_step_at = None
    started = time.perf_counter()
    for it, (images, targets) in enumerate(loader):
        first_step_at = first_step_at or time.time()
        images, targets = _to_device(images, targets, device)
        with torch.autocast(device.type, enabled=state.scaler.is_enabled()):
            losses = model(images, targets)
        loss = total_loss(losses, epoch, it)
        if balance is not None and balance.observe(losses, state.params) and rank == 0:
            logger.info(balance.summary())
        apply_gradients(loss, state.optimizer, state.scaler, state.scheduler, state.params, train.clip_grad_norm)
        running.add({"loss": loss, **losses})
        if rank == 0 and (it + 1) % train.log_every == 0:
            speed = (time.perf_counter() - started) / (it + 1)
            logger.info(
                "epoch %d/%d iter %d/%d loss %.4f lr %.4g (%.2f s/it)", epoch + 1, train.epochs, it + 1,
                len(loader), running.means()["loss"], state.scheduler.get_last_lr()[0], speed,
            )
        if progress is not None:
            progress.step(epoch, it, len(images))
    if balance is not None and balance.end_epoch() and rank == 0:
        logger.info(balance.summary())
    epoch_time_s = time.perf_counter() - started
    state.epoch, state.train_time_s = epoch + 1, state.train_time_s + epoch_time_s
    return {**running.means(), "epoch_time_s": epoch_time_s}, first_step_at


def evaluate(
    student: nn.Module, loader: DataLoader, dataset: DetectionDataset, device: torch.device
) -> dict[str, float] | None:
    """The student's COCO metrics on the validation set, on rank 0 (whose report counts); None on the others."""
    records = _detections_on_rank_zero(predict(student, loader, dataset.label_to_category_id, device))
    return None if records is None else coco_metrics(dataset.coco, records)


def save_and_report(
    session: Session,
    state: TrainingState,
    config: Config,
    num_classes: int,
    metrics: dict,
    pictures_of: DetectionDataset | None,
    class_names: list[str] | None,
) -> None:
    """Write the epoch's checkpoint (rank 0; with GISM's pictures of ``pictures_of``) and report it with ``metrics``."""
    with tempfile.TemporaryDirectory() as directory:
        saving = time.perf_counter()
        if session.rank == 0:
            state.save(Path(directory) / CHECKPOINT_FILE, config, num_classes, metrics, class_names)
            if pictures_of is not None:
                from gid.distill.pictures import save_gi_pictures

                save_gi_pictures(state.trainable, pictures_of, Path(directory) / PICTURES_DIR)
        # the file holds the metrics as they were before it was written
        metrics["checkpoint_time_s"] = time.perf_counter() - saving
        session.report(metrics, directory if session.rank == 0 else None)


def train_loop_per_worker(
    config_dict: dict, progress_queue: Queue | None = None,
    around: Callable[[int], AbstractContextManager] | None = None,
) -> None:
    """A Ray Train worker's training function; rank 0 puts its progress within each epoch on ``progress_queue``,
    the driver's (gid.engine.progress), when one is given. ``around(rank)``: a context each worker trains in,
    a caller's watch on its workers (a sweep samples their system metrics)."""
    session = TrainWorker()
    with around(session.rank) if around is not None else nullcontext():
        train_loop(config_dict, session, progress_queue)


@out_of_memory_as_user_error()
def train_loop(config_dict: dict, session: Session, progress_queue: Queue | None = None) -> None:
    worker_started_at = time.time()  # with the data and model set-up times: where a run's start-up goes
    configure_worker_logging()
    config = Config.model_validate(config_dict)
    rank, device, epochs = session.rank, session.device, config.train.epochs
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    torch.manual_seed(config.train.seed + rank)

    setup = time.perf_counter()
    train_set = build_dataset(config.data, config.data.train_split, train=True)
    val_set = build_dataset(config.data, config.data.val_split, train=False)
    num_classes = config.model.num_classes or train_set.num_classes
    # what the labels mean, kept in the model file (a model of more classes than the data names has no full list)
    class_names = train_set.class_names if num_classes == len(train_set.class_names) + 1 else None
    batch_size, workers = config.data.batch_size, loader_workers(config, device)
    train_loader = session.prepare_loader(_loader(train_set, batch_size, workers, shuffle=True, device=device))
    val_loader = session.prepare_loader(_loader(val_set, batch_size, workers, shuffle=False, device=device))

    setup_data_s, setup = time.perf_counter() - setup, time.perf_counter()
    trainable = build_trainable(config, num_classes, device)
    if config.distill is None:
        trainable = StudentAlone(trainable)
    setup_model_s = time.perf_counter() - setup  # the teacher's load included
    teacher_ap = known_teacher_ap(config, trainable)
    if config.distill is not None and rank == 0:
        logger.info(
            "teacher %s: %s", config.distill.teacher,
            f"val AP {100 * teacher_ap:.1f}" if teacher_ap is not None
            else "val AP not known (its model file stores none and it was not measured on this split)",
        )
    state = start_training_state(config, trainable, len(train_loader), device)
    model = session.prepare_model(trainable)
    # After the move to the device: the optimizer's loaded state (SGD's momentum) goes where its parameters are.
    resume(state, session)
    # Where the workers run (a trial's workers may span nodes): reported, and tagged in MLflow.
    nodes = _all_gather(ray.get_runtime_context().get_node_id())
    worker_nodes = ",".join(nodes)
    progress = None
    if progress_queue is not None and rank == 0:
        progress = ProgressSender(progress_queue, len(train_loader), workers=len(nodes))

    first_step_at = None  # wall clock of this sitting's first training step: startup cost, for benchmarks
    cost: dict[str, float] = {}  # the student's params and CPU latency (train.latency_runs), once measured
    while state.epoch < epochs:
        trained, epoch_first_step_at = train_one_epoch(model, state, train_loader, device, config.train, rank, progress)
        first_step_at = first_step_at or epoch_first_step_at
        metrics = {
            "epoch": state.epoch, **trained, "train_time_s": state.train_time_s, "first_step_at": first_step_at,
            "worker_started_at": worker_started_at, "setup_data_s": setup_data_s, "setup_model_s": setup_model_s,
            "memory_peak_mb": memory_peak_mb(device), "worker_nodes": worker_nodes,
            **(state.balance.metrics() if state.balance is not None else {}),
            **({"teacher_val_ap": teacher_ap} if teacher_ap is not None else {}),
        }
        last = state.epoch == epochs
        if last or state.epoch % config.train.eval_every == 0:
            evaluating = time.perf_counter()
            val = evaluate(trainable.student, val_loader, val_set, device)
            if val is not None:
                metrics.update({f"val_{k}": v for k, v in val.items()})
                metrics["eval_time_s"] = time.perf_counter() - evaluating
                logger.info("epoch %d/%d val %s", state.epoch, epochs, format_metrics(val))
        if config.train.latency_runs and rank == 0 and (last or not cost):
            # On the CPU, the deployed student's cost whatever trains it; measured after the first epoch too, as a sweep
            # objective must be in every epoch's report, and on the final weights (they set how many boxes reach NMS).
            cost = cpu_cost(trainable.student, config.data.image_size, config.train.latency_runs)
        metrics.update(cost)
        pictures_of = val_set if last and config.distill is not None else None  # what GISM picked, once
        save_and_report(session, state, config, num_classes, metrics, pictures_of, class_names)
