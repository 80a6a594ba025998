"""Running out of memory or disk: real allocation and write failures, each reported with its reason."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from mlflow.tracking import MlflowClient

from gid.engine.memory import out_of_memory_as_user_error
from gid.errors import GidError
from search.config import load_sweep
from search.sweep import run_sweep
from search.tracking import ERROR_TAG, ROLE_TAG, STATUS_TAG, SWEEP_TAG
from support import write_base_configs, write_sweep

# Far beyond any machine's memory and address space (2**47 bytes = 128 TiB), so the allocator refuses the
# first tensor it sizes at once, whatever the overcommit setting: nothing is ever filled. (An output size
# such as distill.feature.roi_size no longer does: CPU pooling allocates smaller intermediates first.)
HUGE_FPN_CHANNELS = 2**40  # the FPN's first lateral conv, [channels, 128, 1, 1] of float32: 512 TiB


@pytest.mark.parametrize("allocate", [lambda: torch.empty(2**47), lambda: bytearray(2**62)], ids=["torch", "python"])
def test_a_failed_allocation_becomes_one_line_with_a_hint(allocate):
    with pytest.raises(GidError) as caught, out_of_memory_as_user_error():
        allocate()
    message = str(caught.value)
    assert message.startswith("out of memory (") and "lower data.batch_size or data.image_size" in message
    assert "\n" not in message and "enforce fail" not in message


def test_other_runtime_errors_pass_through():
    with pytest.raises(RuntimeError, match="shape"), out_of_memory_as_user_error():
        torch.zeros(2, 3) @ torch.zeros(2, 3)


def test_an_out_of_memory_trial_fails_with_its_reason_and_the_sweep_goes_on(ray_local, synth_root, tmp_path, mlflow_server):
    write_base_configs(synth_root, tmp_path, ["retinanet"], epochs=1)
    space = {"model.fpn_channels": {"type": "choice", "values": [64, HUGE_FPN_CHANNELS]}}
    path = write_sweep(
        tmp_path, "oom", mlflow_server, frameworks=["retinanet"], space=space, trials=2, scheduler={"type": "none"},
        sampler={"type": "random", "seed": 0, "paper_defaults_first": False}, resources={"max_concurrent_trials": 1},
    )
    outcome = run_sweep(load_sweep(path))

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("gid-test")
    query = f"tags.`{SWEEP_TAG}` = 'oom' and tags.`{ROLE_TAG}` = 'trial'"
    runs = client.search_runs([experiment.experiment_id], query, order_by=["attributes.start_time ASC"])
    huge = [int(r.data.params["model.fpn_channels"]) == HUGE_FPN_CHANNELS for r in runs]
    assert huge == [True, False]  # the seeded sampler's picks: out of memory first, then a trial that fits
    for run, oom in zip(runs, huge):
        if oom:
            assert run.info.status == "FAILED" and run.data.tags[STATUS_TAG] == "failed"
            assert run.data.tags[ERROR_TAG].startswith("out of memory (") and "lower data.batch_size" in run.data.tags[ERROR_TAG]
        else:  # the trial after the failed one: the sweep went on
            assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "finished"
    assert "| 1 / 0 / 1 |" in outcome.summary  # finished / pruned / failed
    (failed_line,) = [line for line in outcome.summary.splitlines() if line.startswith("- retinanet ")]
    assert failed_line.split(": ", 1)[1].startswith("out of memory (DefaultCPUAllocator: can't allocate memory")
    assert failed_line.endswith("lower data.batch_size or data.image_size, or use a smaller model")


DISK_FULL = textwrap.dedent(
    """
    import resource, signal, sys
    import torch
    from gid.errors import GidError
    from gid.models.checkpoint import atomic_save

    path = sys.argv[1]
    atomic_save({"epoch": 1}, path)
    # From here the kernel refuses to grow any file past 1 MiB, cutting the write short as a full disk
    # does (EFBIG instead of ENOSPC); ignoring SIGXFSZ makes it an error instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    try:
        atomic_save({"epoch": 2, "weights": torch.zeros(1 << 20)}, path)  # 4 MiB
    except GidError as exc:
        print(exc)
    """
)


def test_a_write_the_disk_refuses_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"could not write {path} (the write stopped short: the disk is full")
    assert "the previous checkpoint.pt, if any, is intact" in proc.stdout
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # the partial temporary file is gone
