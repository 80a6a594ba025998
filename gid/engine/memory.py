"""Memory: a worker's peak, and an allocation failure as the run's one-line reason."""

from __future__ import annotations

import re
import resource
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from gid.errors import GidError

_OUT_OF_MEMORY = ("out of memory", "can't allocate memory")  # CUDA's and the CPU allocator's wording


def out_of_memory_reason(exc: BaseException) -> str | None:
    """One line saying memory ran out and what to lower; None when ``exc`` is not an allocation failure."""
    text = str(exc).strip()
    if not isinstance(exc, (torch.OutOfMemoryError, MemoryError)) and not any(m in text for m in _OUT_OF_MEMORY):
        return None
    first = text.splitlines()[0] if text else type(exc).__name__
    first = re.sub(r"^\[enforce fail at [^\]]*\][^.]*\.\s*", "", first).split(" (originally from")[0]  # c10's prefix
    # Keep what ran out and how much was asked for, not the allocator's tuning advice.
    detail = ". ".join(s for s in first.split(". ") if re.search(r"\ballocate\b|out of memory", s)) or first
    return f"out of memory ({detail}); lower data.batch_size or data.image_size, or use a smaller model"


@contextmanager
def out_of_memory_as_user_error() -> Iterator[None]:
    """A failed allocation (CUDA or CPU) becomes a one-line GidError: the run fails with its reason."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        reason = out_of_memory_reason(exc)
        if reason is None:
            raise
        raise GidError(reason) from None


def memory_peak_mb(device: torch.device) -> float:
    """This worker's peak memory so far: GPU memory allocated by torch on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB
