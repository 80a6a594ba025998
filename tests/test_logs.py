"""The library reports through logging, which the CLI (or a notebook, a benchmark) sets up; `gid`'s terminal."""

from __future__ import annotations

import logging
import os
import re
import select
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from ray import tune

from search.config import SweepConfig
from search.experiment import TUNE_NEW_OUTPUT_ENV, tune_output

from gid.engine.progress import ProgressDisplay, progress_line
from gid.engine.step_progress import ProgressSender, StepProgress
from gid.logs import (
    LEVEL_ENV,
    LOG_FILE,
    LOGGERS,
    add_logger,
    command,
    configure,
    configure_worker,
    log_file,
    open_log,
    quiet,
    shows_status,
    worker_env,
)

ROOT = Path(__file__).parents[1]


@pytest.fixture
def restored_loggers():
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers)) for name in LOGGERS}
    yield
    for name, (level, handlers) in saved.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).handlers[:] = handlers


def test_library_code_prints_nothing_itself():
    library = [p for package in ("gid", "search") for p in sorted((ROOT / package).rglob("*.py")) if p.name != "cli.py"]
    printing = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in library
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(r"(?<![\w.])print\(", line)
    ]
    assert library and printing == []


def test_a_package_that_builds_on_gid_shows_its_lines_like_gids_own(restored_loggers, capsys):
    import search  # noqa: F401 - adds its logger when imported

    assert "search" in LOGGERS
    configure()
    add_logger("gid_plugin")  # after configure: set up at once
    try:
        logging.getLogger("gid_plugin.part").info("a plug-in's line")
        assert capsys.readouterr().out == "a plug-in's line\n"
    finally:
        LOGGERS.remove("gid_plugin")


def test_configured_lines_are_plain_and_a_quieted_logger_shows_none(restored_loggers, capsys):
    configure()
    logging.getLogger("search.experiment").info("ended %d run(s)", 2)
    logging.getLogger("gid").setLevel(logging.WARNING)
    logging.getLogger("gid.engine.loop").info("epoch 1/2 val AP 0.0")
    assert capsys.readouterr().out == "ended 2 run(s)\n"


def test_ray_workers_take_the_level_the_driver_had(restored_loggers, monkeypatch):
    configure(logging.WARNING)
    env = worker_env()
    assert env == {LEVEL_ENV: "WARNING"}
    configure(logging.DEBUG)  # the worker process starts from another state
    monkeypatch.setenv(LEVEL_ENV, env[LEVEL_ENV])
    configure_worker()
    assert all(logging.getLogger(name).level == logging.WARNING for name in LOGGERS)
    monkeypatch.delenv(LEVEL_ENV)
    configure_worker()  # nothing said: the CLI's default
    assert logging.getLogger("gid").level == logging.INFO


def test_a_quiet_command_shows_gids_lines_and_keeps_everything_in_its_log_file(restored_loggers, tmp_path, capsys):
    import ray  # noqa: F401 - sets up its logger, which the command reroutes

    ray_logger = logging.getLogger("ray")
    ray_handlers = ray_logger.handlers[:]
    configure()
    with command(verbose=False):
        assert quiet() and isinstance(tune_output(SweepConfig.model_construct())["progress_reporter"], tune.CLIReporter)
        assert os.environ[TUNE_NEW_OUTPUT_ENV] == "0"  # the classic reporter, for the rest of the command
        open_log(tmp_path / "run")
        open_log(tmp_path / "other")  # the first folder keeps the log
        logging.getLogger("gid.engine.progress").info("retinanet resnet18  epoch 1/2")
        logging.getLogger("ray.tune").warning("a Ray warning")
        warnings.warn("a FutureWarning", FutureWarning)
        assert log_file() == tmp_path / "run" / LOG_FILE
        assert ray_logger.handlers == []  # Ray's own terminal handler is off
    captured = capsys.readouterr()
    assert captured.out == f"full log: {tmp_path / 'run' / LOG_FILE}\nretinanet resnet18  epoch 1/2\n"
    assert captured.err == ""
    text = (tmp_path / "run" / LOG_FILE).read_text()
    assert all(line in text for line in ("epoch 1/2", "WARNING ray.tune: a Ray warning", "FutureWarning: a FutureWarning"))
    assert not (tmp_path / "other").exists()

    # the command over, everything is as it was
    assert not quiet() and log_file() is None and TUNE_NEW_OUTPUT_ENV not in os.environ
    assert ray_logger.handlers == ray_handlers and not ray_logger.propagate
    logging.getLogger("ray.tune").warning("after the command")
    assert "after the command" not in (tmp_path / "run" / LOG_FILE).read_text()


def test_a_verbose_command_shows_everything_and_keeps_it_in_its_log_file_too(restored_loggers, tmp_path, capsys):
    import ray  # noqa: F401

    ray_logger = logging.getLogger("ray")
    ray_handlers = ray_logger.handlers[:]
    configure()
    with command(verbose=True):
        assert not quiet() and tune_output(SweepConfig.model_construct()) == {}
        assert TUNE_NEW_OUTPUT_ENV not in os.environ
        open_log(tmp_path)
        assert ray_logger.handlers == ray_handlers  # Ray's own terminal handler is kept
        logging.getLogger("ray.tune").warning("a Ray warning")
        warnings.warn("a FutureWarning", FutureWarning)
    assert "a FutureWarning" in capsys.readouterr().err
    text = (tmp_path / LOG_FILE).read_text()
    assert "a Ray warning" in text and "a FutureWarning" in text


def test_outside_a_command_no_log_file_is_started(tmp_path):
    open_log(tmp_path / "run")
    assert log_file() is None and not (tmp_path / "run").exists()


CLEAR = "\r\x1b[K"  # what rewrites a terminal's line: back to its start, erase to its end
LABEL = "retinanet resnet18"
EPOCH_2 = {"epoch": 2, "loss": 1.2345, "val_ap": 0.123, "epoch_time_s": 41.0}


def read_available(fd: int) -> str:
    """What was written to the other end of ``fd`` so far."""
    chunks = []
    while select.select([fd], [], [], 0.2)[0]:
        chunks.append(os.read(fd, 65536))
    return b"".join(chunks).decode()


def screen(text: str) -> list[str]:
    """The lines a terminal shows of ``text``: each as its last rewrite left it."""
    return [line.rsplit(CLEAR, 1)[-1] for line in text.split("\n")]


def test_a_terminal_shows_the_progress_within_an_epoch_on_one_line_rewritten_in_place(
    restored_loggers, monkeypatch
):
    controller, terminal = os.openpty()
    monkeypatch.setattr(sys, "stdout", os.fdopen(terminal, "w"))
    monkeypatch.setenv("COLUMNS", "100")
    configure()
    with command(verbose=True):
        assert not shows_status()  # Ray's output would break into the line
    with command(verbose=False):
        assert shows_status()
        display = ProgressDisplay(LABEL, 3, in_place=True)
        display.progress(StepProgress(epoch=2, done=2, steps=500, images=8, seconds=0.6))
        display.progress(StepProgress(epoch=2, done=120, steps=500, images=952, seconds=25.0))
        display.epoch(EPOCH_2)
        display.progress(StepProgress(epoch=3, done=2, steps=500, images=8, seconds=0.4))  # already, before its line
        logging.getLogger("search.sweep").info("another line")
        display.close()
    sys.stdout.flush()
    text = read_available(controller).replace("\r\n", "\n")  # the terminal's own newlines
    os.close(controller)

    epoch_2 = f"{LABEL}  epoch 2/3  loss 1.234  val AP 12.3  (41 s training)"
    epoch_3_progress = f"{LABEL}  epoch 3/3  step 2/500  20.0 img/s  ETA 3.3 min"
    assert text == (
        f"{CLEAR}{LABEL}  epoch 2/3  step 2/500  13.3 img/s  ETA 5.0 min"
        f"{CLEAR}{LABEL}  epoch 2/3  step 120/500  38.1 img/s  ETA 80 s"
        f"{CLEAR}{epoch_2}\n"  # the epoch over, its progress is erased and its line takes the place
        f"{CLEAR}{epoch_3_progress}"
        f"{CLEAR}another line\n{epoch_3_progress}"  # any other line goes above the progress
        f"{CLEAR}"  # erased at the end
    )
    assert screen(text) == [epoch_2, "another line", ""]


def test_elsewhere_the_progress_within_an_epoch_is_a_plain_line_at_most_once_a_minute(restored_loggers, monkeypatch):
    reader, writer = os.pipe()
    monkeypatch.setattr(sys, "stdout", os.fdopen(writer, "w"))
    configure()
    now = 0.0
    with command(verbose=False):
        assert not shows_status()
        display = ProgressDisplay(LABEL, 3, in_place=False, every_s=60.0, clock=lambda: now)
        for now, done in [(30, 2), (59, 50), (61, 60), (100, 90), (121, 120), (130, 130)]:
            display.progress(StepProgress(epoch=2, done=done, steps=500, images=8 * (done - 1), seconds=now - 10))
        now = 140.0
        display.epoch(EPOCH_2)
        for now, done in [(190, 2), (201, 20)]:  # a minute after the epoch line, not after the last progress line
            display.progress(StepProgress(epoch=3, done=done, steps=500, images=8 * (done - 1), seconds=now - 150))
        display.close()
    sys.stdout.flush()
    lines = read_available(reader).splitlines()
    os.close(reader)

    assert lines == [
        f"{LABEL}  epoch 2/3  step 60/500  9.3 img/s  ETA 6.3 min",
        f"{LABEL}  epoch 2/3  step 120/500  8.6 img/s  ETA 5.9 min",
        f"{LABEL}  epoch 2/3  loss 1.234  val AP 12.3  (41 s training)",
        f"{LABEL}  epoch 3/3  step 20/500  3.0 img/s  ETA 21.5 min",
    ]


def test_rank_zero_sends_its_progress_once_the_epochs_rate_is_known_then_every_few_seconds():
    sent, now = [], 0.0
    queue = SimpleNamespace(put_nowait=sent.append)
    sender = ProgressSender(queue, steps=100, workers=2, every_s=5.0, clock=lambda: now)
    for it in range(10):  # a step a second, batches of 4 images on each of the 2 workers
        now = 10.0 + it
        sender.step(0, it, 4)
    for it in range(3):  # the next epoch starts its count again
        now = 100.0 + 2 * it
        sender.step(1, it, 4)
    assert sent == [
        StepProgress(epoch=1, done=2, steps=100, images=8, seconds=1.0),
        StepProgress(epoch=1, done=7, steps=100, images=48, seconds=6.0),
        StepProgress(epoch=2, done=2, steps=100, images=8, seconds=2.0),
    ]
    assert progress_line(LABEL, sent[1], 3) == f"{LABEL}  epoch 1/3  step 7/100  8.0 img/s  ETA 93 s"


def gid_train(config, tmp_path: Path, address: str, *flags: str) -> subprocess.CompletedProcess:
    """`gid train` in a process of its own, as a person runs it, on the session's Ray instance."""
    path = tmp_path / f"{config.run.name}.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return subprocess.run(
        [sys.executable, "-m", "gid.cli", "train", str(path), "--address", address, *flags],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


EPOCH_LINE = re.compile(r"retinanet resnet18  epoch (\d)/2  loss \d+\.\d{3}  val AP \d+\.\d  \(\d+ s training\)")


def test_gid_train_shows_a_line_per_epoch_and_keeps_the_full_logs_in_files(ray_local, tiny_config, tmp_path):
    config = tiny_config(train={"epochs": 2, "log_every": 1}, run={"name": "quiet"})
    started = time.time()
    proc = gid_train(config, tmp_path, ray_local.get_runtime_context().gcs_address)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    run = Path(config.run.storage_path) / "quiet"
    assert [m[1] for m in map(EPOCH_LINE.fullmatch, lines) if m] == ["1", "2"]
    assert f"model file: {run / 'model.pt'}" in lines
    # nothing of Ray's: no worker prefixes, warnings, checkpoint or per-step lines
    assert proc.stderr == ""
    assert not any(word in proc.stdout for word in ("pid=", "WARNING", "Checkpoint", "iter 1/8", "Warning"))

    log = run / LOG_FILE
    assert lines.count(f"full log: {log}") == 2  # at the start and in the summary
    text = log.read_text()
    assert "INFO ray." in text and all(m[0] in text for m in map(EPOCH_LINE.search, lines) if m)
    (ray_logs,) = {line.split(": ", 1)[1] for line in lines if line.startswith("Ray's logs, ")}
    worker_output = [
        f.read_text(errors="replace") for f in Path(ray_logs).glob("worker-*.out") if f.stat().st_mtime >= started
    ]
    assert any("epoch 2/2 iter 8/8 loss" in out for out in worker_output)  # the per-step lines, kept there


def gid_train_on_a_terminal(config, tmp_path: Path, address: str) -> tuple[int, str]:
    """`gid train` as :func:`gid_train` runs it, its output on a pseudo-terminal: its exit code and what it wrote."""
    path = tmp_path / f"{config.run.name}.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    controller, terminal = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gid.cli", "train", str(path), "--address", address],
        stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    os.close(terminal)
    output, deadline = bytearray(), time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: no process holds the terminal any more
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:  # ended, and all it wrote is read
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
    return proc.wait(timeout=30), output.decode(errors="replace").replace("\r\n", "\n")


PROGRESS_LINE = re.compile(
    re.escape(CLEAR) + r"retinanet resnet18  epoch (\d)/2  step [2-8]/8  \d+\.\d img/s  ETA \d+ s"
)


def test_gid_train_on_a_terminal_shows_the_progress_within_each_epoch_on_one_line(ray_local, tiny_config, tmp_path):
    config = tiny_config(train={"epochs": 2}, run={"name": "terminal"})
    returncode, text = gid_train_on_a_terminal(config, tmp_path, ray_local.get_runtime_context().gcs_address)
    assert returncode == 0, text
    # Rank 0 sends its progress from each epoch's second step: the line is drawn in both epochs...
    assert {m[1] for m in PROGRESS_LINE.finditer(text)} == {"1", "2"}
    # ...and erased before each epoch line, which the terminal then shows whole, and at the end
    shown = screen(text)
    assert [m[1] for m in map(EPOCH_LINE.fullmatch, shown) if m] == ["1", "2"]
    assert not any("img/s" in line for line in shown)
    assert "pid=" not in text  # still nothing of Ray's
    log = (Path(config.run.storage_path) / "terminal" / LOG_FILE).read_text()
    # the log file keeps no status line (Ray's own start-up line there has colours of its own)
    assert EPOCH_LINE.search(log) and "img/s" not in log and "\r" not in log and "\x1b[K" not in log


def test_gid_train_verbose_shows_rays_worker_lines(ray_local, tiny_config, tmp_path):
    proc = gid_train(tiny_config(train={"log_every": 4}, run={"name": "verbose"}), tmp_path, ray_local.get_runtime_context().gcs_address, "--verbose")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(RayTrainWorker pid=" in proc.stdout and "epoch 1/1 iter 8/8 loss" in proc.stdout
    assert (Path(tmp_path) / "runs" / "verbose" / LOG_FILE).is_file()


def test_gid_knows_nothing_of_tune_mlflow_optuna_or_search():
    # The README's layering: search/ builds on gid/, never the other way (its commands come in by entry point).
    imports = re.compile(r"^\s*(?:from|import)\s+(search|mlflow|optuna|ray\.tune)\b|from ray import tune", re.M)
    found = [
        f"{path.relative_to(ROOT)}: {match.group(0).strip()}"
        for path in sorted((ROOT / "gid").rglob("*.py"))
        for match in imports.finditer(path.read_text())
    ]
    assert found == []


def test_gid_and_the_registry_leave_the_root_logger_without_a_terminal_handler():
    # mlflow.pytorch's import adds one (the canary in test_ray_canaries.py): every library's records would then
    # print on gid's quiet terminal, Optuna's "new study" and Tune's warnings among them.
    code = ("import logging, gid.cli, search.cli, search.sweep, search.registry as registry; registry.mlflow_pytorch(); "
            "print(len(logging.getLogger().handlers))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "0"
