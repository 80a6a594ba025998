"""benchmarks/gpu_check.sh, the script that takes the GPU figures when a GPU is lent: its dry run on the CPU runs
every part on a tiny input, so the day a GPU comes the script is known to work."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from gid.frameworks import FRAMEWORKS

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_the_gpu_checks_dry_run_runs_every_part_on_the_cpu(ray_local, tmp_path):
    # The sweep and the teacher it needs join the suite's Ray: two local Ray instances would trip each other.
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert report == done.stdout  # everything printed is kept
    sections = re.findall(r"^## (.+) \(at \d+ s\)$", report, flags=re.M)
    assert sections == ["Step ratio and GPU busy share", "Host syncs per GID step", "Data loading against a GID step",
                        "A 4-trial sweep, 0 GPU per trial"]
    for framework in FRAMEWORKS:
        assert re.search(rf"^\| {framework} \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \*\*[\d.]+\*\*", report, flags=re.M)
        assert re.search(rf"^\| {framework} \| ordinary \(", report, flags=re.M)
    assert "GPU busy during 1 GID steps" in report and "not applicable on a CPU" in report
    assert re.search(r"^\| 1 \| \d+ \| [\d.]+× \|$", report, flags=re.M)  # the loader with one worker
    # the sweep's four trials all ran their epoch; its summary counts them finished
    assert "Number of trials: 4/4 (4 TERMINATED)" in report
    assert re.search(r"^\| fcos \| .* \| 4 / 0 / 0 \| ", report, flags=re.M)
