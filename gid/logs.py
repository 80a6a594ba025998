"""Where gid's progress lines go: the ``gid`` logger and those packages add (:func:`add_logger`), set up by the CLI.

Library code only logs; the ``gid`` command (or a notebook, a benchmark) decides what is shown.
Ray Train workers are other processes: they take the driver's level from ``GID_LOG_LEVEL``,
which :func:`worker_env` hands to Ray when it starts.

A command that trains (:func:`command`) keeps its full log in a file, ``gid.log`` in the folder
the run or sweep starts in (:func:`open_log`); unless ``--verbose``, the terminal then shows
gid's own lines alone, and Ray's processes keep their output in Ray's session logs. Such a terminal
can also show a status line below them, rewritten in place (:func:`show_status`).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

LOGGERS = ["gid"]  # and the loggers of packages that build on gid, once they are imported
LEVEL_ENV = "GID_LOG_LEVEL"
LOG_FILE = "gid.log"
# Libraries that print their own log records to the terminal. Each sets up its logger when imported,
# so :func:`open_log` reroutes those already imported: a command imports them before its run starts.
LIBRARIES = ("ray", "optuna", "mlflow")


class _StatusLine:
    """What :func:`show_status` shows, and where: one for all of gid's loggers, which share the terminal."""

    def __init__(self) -> None:
        self.text = ""
        self.stream = None
        self.lock = threading.RLock()


_status = _StatusLine()
_CLEAR_LINE = "\r\x1b[K"  # back to the line's start, and erase to its end


class _PlainLines(logging.StreamHandler):
    """The handler :func:`configure` adds: the message alone, on the ``sys.stdout`` of that call.

    A status line shown on that stream is erased before the message and drawn again below it, so the
    two never share a line.
    """

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with _status.lock:
            status = _status.text if _status.stream is self.stream else ""
            if status:
                self.stream.write(_CLEAR_LINE)
            super().emit(record)
            if status:
                self.stream.write(status)
                self.flush()


def configure(level: int | str = logging.INFO) -> None:
    """Plain lines on stdout for gid's loggers, at ``level``; calling it again replaces its handler."""
    global _level
    _level = level
    for name in LOGGERS:
        _configure_one(logging.getLogger(name), level)


def add_logger(name: str) -> None:
    """Show a package's lines as gid's own: a package that builds on gid (search/) calls it when imported."""
    if name in LOGGERS:
        return
    LOGGERS.append(name)
    if _level is not None:  # configured already: this logger too
        _configure_one(logging.getLogger(name), _level)


_level: int | str | None = None  # the level of the last configure()


def _configure_one(logger: logging.Logger, level: int | str) -> None:
    for handler in [h for h in logger.handlers if isinstance(h, _PlainLines)]:
        logger.removeHandler(handler)
    logger.addHandler(_PlainLines())
    logger.propagate = False  # one line each, whatever the host application's root logger does
    logger.setLevel(level)


def shows_status() -> bool:
    """Whether :func:`show_status` may be used: gid's lines go to a terminal, and a quiet one (nothing but gid
    writes to it; a verbose command's Ray output would break into the line)."""
    return quiet() and sys.stdout.isatty()


def show_status(text: str) -> None:
    """Show ``text`` as the terminal's last line, in place of the one shown before; ``""`` erases it.

    gid's lines still go above it (see :class:`_PlainLines`); the log file never sees it. Only where
    :func:`shows_status`. The text is cut to the terminal's width: a line that wrapped could not be rewritten.
    """
    with _status.lock:
        if not text and not _status.text:
            return
        text = text[: shutil.get_terminal_size().columns - 1]
        _status.text, _status.stream = text, sys.stdout
        sys.stdout.write(_CLEAR_LINE + text)
        sys.stdout.flush()


def configure_worker() -> None:
    """In a Ray worker: the level the driver had when Ray started (INFO when it did not say)."""
    configure(os.environ.get(LEVEL_ENV, "INFO"))


def worker_env() -> dict[str, str]:
    """The environment that gives Ray's workers this process's level for gid's loggers."""
    return {LEVEL_ENV: logging.getLevelName(logging.getLogger("gid").getEffectiveLevel())}


@dataclass
class _Command:
    quiet: bool
    log_file: Path | None = None
    undo: list[Callable[[], None]] = field(default_factory=list)  # run in reverse when the command ends


_command: _Command | None = None


@contextmanager
def command(verbose: bool) -> Iterator[None]:
    """The logging of one gid command that trains; everything it changes is undone when it ends.

    Not ``verbose``: a quiet terminal, Tune's status table and gid's lines only (see the module's docstring).
    """
    global _command
    _command = _Command(quiet=not verbose)
    try:
        yield
    finally:
        for undo in reversed(_command.undo):
            undo()
        _command = None


def quiet() -> bool:
    """Whether the terminal is quiet: Ray then starts without forwarding its processes' output (``log_to_driver``)."""
    return _command is not None and _command.quiet


def log_file() -> Path | None:
    """The command's log file, once :func:`open_log` has started it."""
    return _command.log_file if _command is not None else None


def open_log(folder: Path) -> None:
    """Start the command's log file in ``folder``, appending (a resumed run continues its log).

    The first folder named keeps it: the demo's, not those of the runs it starts. Outside a command, nothing.
    """
    if _command is None or _command.log_file is not None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    _command.log_file = folder / LOG_FILE
    handler = logging.FileHandler(_command.log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _command.undo.append(handler.close)
    # gid's loggers do not propagate (see configure); every other record reaches the root logger.
    for logger in (logging.getLogger(), *map(logging.getLogger, LOGGERS)):
        logger.addHandler(handler)
        _command.undo.append(lambda logger=logger: logger.removeHandler(handler))
    for name in (n for n in LIBRARIES if n in sys.modules):
        library = logging.getLogger(name)
        saved = library.handlers[:], library.propagate
        if _command.quiet:
            library.handlers.clear()
        library.propagate = True
        _command.undo.append(lambda library=library, saved=saved: _restore(library, *saved))
    logging.captureWarnings(True)  # Python's warnings become records of the "py.warnings" logger
    _command.undo.append(lambda: logging.captureWarnings(False))
    if not _command.quiet:  # and still show on the terminal
        warnings_logger, shown = logging.getLogger("py.warnings"), logging.StreamHandler(sys.stderr)
        warnings_logger.addHandler(shown)
        _command.undo.append(lambda: warnings_logger.removeHandler(shown))
    logging.getLogger(__name__).info("full log: %s", _command.log_file)


@contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """In a quiet terminal, what the block writes to the process's stderr (file descriptor 2) goes to the log file.

    For native code that writes there itself: Ray's C++ client logs to stderr until it has a session to log
    into, so a driver that cannot connect to a cluster (a refused token, nothing at the address) would print
    a warning per try, up to twenty of them, before gid's one line. Elsewhere (``--verbose``, no log file yet),
    nothing changes. Not around code that starts processes: they would keep the log file as their stderr.
    """
    target = log_file()
    if not quiet() or target is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(target, "ab") as log:  # appended beside the log's own records (both append)
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _restore(logger: logging.Logger, handlers: list[logging.Handler], propagate: bool) -> None:
    logger.handlers[:] = handlers
    logger.propagate = propagate


def set_env(name: str, value: str) -> None:
    """Set an environment variable for the rest of the command (a library's output switch); undone when it ends."""
    if _command is None:
        raise RuntimeError("set_env: only within logs.command()")
    saved = os.environ.get(name)
    os.environ[name] = value

    def undo() -> None:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved

    _command.undo.append(undo)
