"""Where gid's progress lines go: the ``gid`` and ``search`` loggers, set up by the CLI.

Library code only logs; the ``gid`` command (or a notebook, a benchmark) decides what is shown.
Ray Train workers are other processes: they take the driver's level from ``GID_LOG_LEVEL``,
which :func:`worker_env` hands to Ray when it starts.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGERS = ("gid", "search")
LEVEL_ENV = "GID_LOG_LEVEL"


class _PlainLines(logging.StreamHandler):
    """The handler :func:`configure` adds: the message alone, on the ``sys.stdout`` of that call."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(message)s"))


def configure(level: int | str = logging.INFO) -> None:
    """Plain lines on stdout for gid's loggers, at ``level``; calling it again replaces its handler."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, _PlainLines)]:
            logger.removeHandler(handler)
        logger.addHandler(_PlainLines())
        logger.propagate = False  # one line each, whatever the host application's root logger does
        logger.setLevel(level)


def configure_worker() -> None:
    """In a Ray worker: the level the driver had when Ray started (INFO when it did not say)."""
    configure(os.environ.get(LEVEL_ENV, "INFO"))


def worker_env() -> dict[str, str]:
    """The environment that gives Ray's workers this process's level for gid's loggers."""
    return {LEVEL_ENV: logging.getLevelName(logging.getLogger("gid").getEffectiveLevel())}
