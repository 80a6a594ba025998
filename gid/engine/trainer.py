"""Driver side of training: start Ray, run the TorchTrainer, export the final model file."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue

from gid.config import Config, validate
from gid.engine.loop import PICTURES_DIR, train_loop_per_worker
from gid.engine.state import CHECKPOINT_FILE
from gid.engine.preflight import check_run_inputs, check_writable
from gid.engine.progress import EpochReports, progress_lines
from gid.engine.ray_auth import check_token, refusal
from gid.errors import GidError
from gid.logs import native_stderr_to_log, open_log, quiet, worker_env
from gid.models.checkpoint import read_checkpoint, save_model

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"


@dataclass
class TrainingOutcome:
    metrics: dict
    model_path: Path  # the final model file (weights + config), for `gid eval` or as a teacher
    run_path: Path  # Ray Train's run folder: results and per-epoch checkpoints
    history: list[dict] = field(default_factory=list)  # every epoch's metrics this call trained, in order


# Train V2's structured worker logging would print every worker line twice on the driver. Its
# preemption watcher, one more actor process per run, only hands node-drain notices to training
# code that asks for them (``ray.train.get_preemption_info``), which gid's loop does not.
RAY_ENV_VARS = {"RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def driver_env_vars() -> dict[str, str]:
    """The environment gid hands Ray's workers (the job's runtime_env): switches and gid's log level, never a
    secret. Ray's own variables (RAY_AUTH_MODE, the token) reach its processes from each node's environment."""
    return {**RAY_ENV_VARS, **worker_env()}


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address``, or start an embedded local Ray instance once per process.

    The local instance includes Ray's dashboard (on 127.0.0.1 only): Train's placement group
    cleanup needs its state API to free the workers of a trial stopped early. In a quiet terminal
    (``gid.logs``) Ray's processes keep their output in Ray's logs, and its driver-side records
    go to the command's log file only, what Ray's C++ client prints while connecting to a cluster
    among them. A cluster that refuses this client's token (or lack of one) is a :class:`GidError`:
    one line saying what to set, found before ``ray.init`` retries (``gid.engine.ray_auth``).
    """
    if ray.is_initialized():
        return
    connecting = address is not None or bool(os.environ.get("RAY_ADDRESS"))
    try:
        # Not around a local start: the processes it starts would keep the log file as their stderr.
        with native_stderr_to_log() if connecting else nullcontext():
            if connecting and (refused := check_token(address)) is not None:
                raise GidError(refused)
            ray.init(
                address=address, runtime_env={"env_vars": driver_env_vars()},
                log_to_driver=not quiet(), configure_logging=not quiet(),
            )
    except GidError:
        raise
    except Exception as exc:  # noqa: BLE001 - only a refused token is translated; anything else goes on as it was
        if (message := refusal(exc, address)) is not None:
            raise GidError(message) from None
        raise
    logger.info("Ray's logs, the workers' output among them: %s", ray_logs())


def ray_logs() -> Path:
    """The session log folder of this node's Ray: every Ray process's output, the training workers' included."""
    context = ray.get_runtime_context()
    return Path(context.get_temp_dir()) / context.get_session_name() / "logs"


def use_gpu(config: Config) -> bool:
    if config.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return config.scaling.use_gpu


def build_trainer(
    config: Config, callbacks: list | None = None, progress_queue: Queue | None = None,
    around: Callable[[int], AbstractContextManager] | None = None,
) -> TorchTrainer:
    """The run's TorchTrainer; rank 0 puts its progress within epochs on ``progress_queue`` (gid.engine.progress);
    each worker trains within ``around(rank)`` when given (:func:`gid.engine.loop.train_loop_per_worker`)."""
    gpu = use_gpu(config)
    resources = {"CPU": config.scaling.cpus_per_worker}
    if gpu:
        resources["GPU"] = config.scaling.gpus_per_worker
    return TorchTrainer(
        # The queue goes with the function, to every worker group Train starts (a restart's too).
        partial(train_loop_per_worker, progress_queue=progress_queue, around=around),
        train_loop_config=config.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.scaling.num_workers, use_gpu=gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=str(config.run.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            callbacks=callbacks,
        ),
    )


def export_model(checkpoint_dir: Path, out: Path) -> None:
    """Write the weights and config of a training checkpoint, without its training state."""
    state = read_checkpoint(checkpoint_dir / CHECKPOINT_FILE)
    config = validate(state["config"], source=f"{checkpoint_dir / CHECKPOINT_FILE} (stored config)")
    save_model(
        state["model"], config, state["num_classes"], out, epoch=state["epoch"], metrics=state["metrics"],
        class_names=state.get("class_names"),
    )


USER_ERRORS = (GidError, FloatingPointError)  # what a training loop raises for bad input or a loss gone NaN


def _one_line(exc: BaseException) -> GidError:
    return GidError(str(exc).strip().splitlines()[-1])


@contextmanager
def raise_user_error() -> Iterator[None]:
    """Turn a training loop's user error into one line instead of a traceback, whether the loop ran in
    this process or on Ray Train's workers."""
    try:
        yield
    except ray.train.WorkerGroupError as exc:
        for failure in exc.worker_failures.values():
            cause = getattr(failure, "cause", None) or failure  # Ray keeps the worker's exception as .cause
            if isinstance(cause, USER_ERRORS):
                raise _one_line(cause) from None
        raise
    except USER_ERRORS as exc:
        raise _one_line(exc) from None


def finish_run(result: ray.train.Result, history: list[dict]) -> TrainingOutcome:
    """Export the final model file (and the GI pictures of a distillation) of a finished run."""
    run_path = Path(result.path)
    model_path = run_path / MODEL_FILE
    with result.checkpoint.as_directory() as directory:
        export_model(Path(directory), model_path)
        pictures = Path(directory) / PICTURES_DIR
        if pictures.is_dir():
            shutil.copytree(pictures, run_path / PICTURES_DIR, dirs_exist_ok=True)
    return TrainingOutcome(metrics=result.metrics, model_path=model_path, run_path=run_path, history=history)


def run_training(
    config: Config, address: str | None = None, around: Callable[[int], AbstractContextManager] | None = None
) -> TrainingOutcome:
    """Train (or distil) per ``config`` on Ray; resumes the run of the same name if it exists. Each worker trains
    within ``around(rank)`` when given (:func:`build_trainer`)."""
    if config.run.name is None:
        raise GidError("run.name is not set; pass --set run.name=NAME")
    config = config.with_absolute_paths()
    check_writable(config.run.storage_path, "run.storage_path")
    check_run_inputs(config)
    open_log(local_run_folder(config))
    if config.distill is not None:
        from gid.distill.teacher import ensure_teacher_val_ap

        ensure_teacher_val_ap(config)  # once, here, rather than on every worker
    ensure_ray(address)
    label = f"{config.model.framework} {config.model.backbone}"
    history: list[dict] = []
    with raise_user_error(), progress_lines(label, config.train.epochs, history) as queue:
        result = build_trainer(config, callbacks=[EpochReports(queue)], progress_queue=queue, around=around).fit()
    return finish_run(result, history)


def local_run_folder(config: Config) -> Path:
    """The run's folder on this machine: Ray Train's, or ``.gid-runs/<name>`` when the run is stored in a bucket."""
    storage = config.run.storage_path
    return (Path(".gid-runs") if "://" in storage else Path(storage)) / config.run.name
