"""The library reports through logging, which the CLI (or a notebook, a benchmark) sets up."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from gid.logs import LEVEL_ENV, LOGGERS, configure, configure_worker, worker_env

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


def test_configured_lines_are_plain_and_a_quieted_logger_shows_none(restored_loggers, capsys):
    configure()
    logging.getLogger("search.sweep").info("ended %d run(s)", 2)
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
