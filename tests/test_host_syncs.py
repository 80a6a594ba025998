"""Host synchronisations: the counter counts what makes a GPU's host wait, and a GID step's own stay few."""

from collections import Counter

import pytest
import torch
from torchvision.models.detection._utils import Matcher

from benchmarks.host_syncs import TARGET, SyncCounter, count_step_syncs
from gid.distill import Distiller
from gid.engine.loop import total_loss
from gid.frameworks import FRAMEWORKS
from gid.frameworks.view import iou_foreground
from support import SIZE, tiny_detector

CPU = torch.device("cpu")


def test_the_counter_counts_each_synchronising_operation_and_nothing_else():
    x = torch.arange(6.0, requires_grad=True)
    y = x.detach()
    with SyncCounter(CPU) as counter:
        y.sum().item(), float(y.max()), bool((y > 2).any())  # 3 Python values
        y.nonzero(), torch.where(y > 2)  # 2 data-dependent shapes...
        selected = x[x > 2]  # ...and a boolean index, whose backward assigns through the mask
        y.tolist()
        torch.unique(y)
        torch.tensor([1.0, 2.0], device=CPU)  # a copy to a device
        selected.sum().backward()
        # none of these
        y + 1, y.topk(2), y[1:3], y.to(torch.float64), y.to(CPU), torch.tensor([1.0]), y.new_full((2,), 1.0)
    counts = Counter(sync.op for sync in counter.syncs)
    assert counts == {
        "item": 3, "nonzero": 2, "bool mask index": 1, "bool mask index, backward": 1, "tolist": 1, "unique": 1,
        "tensor from data": 1,
    }
    assert {(sync.owner, sync.where.split(":")[0]) for sync in counter.syncs} == {("other", __file__)}


def test_each_sync_is_put_down_to_the_gid_or_torchvision_line_that_made_it():
    boxes, anchors = torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[0.0, 0, 10, 10], [0, 0, 5, 5], [20, 20, 30, 30]])
    with SyncCounter(CPU) as counter:
        total_loss({"loss_x": torch.tensor(1.0)}, epoch=0, it=0)  # its finiteness check
        iou_foreground(Matcher(0.5, 0.4, allow_low_quality_matches=True), boxes, anchors)
    first, *matcher = counter.syncs
    assert (first.op, first.owner, first.caller) == ("item", "gid", None)
    assert first.where.startswith("gid/engine/loop.py:") and first.where.endswith(" total_loss")
    assert [sync.op for sync in matcher] == ["bool mask index", "bool mask index", "nonzero"]
    for sync in matcher:
        assert sync.owner == "torchvision" and sync.where.startswith("torchvision/models/detection/_utils.py:")
        assert sync.caller.startswith("gid/frameworks/view.py:") and sync.caller.endswith(" iou_foreground")


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_an_ordinary_gid_step_makes_at_most_three_host_syncs_in_gids_own_code(framework, tiny_config, batch):
    # steps 0 and 3 measure the balance, step 4 logs: steps 1, 2 and 5 are ordinary
    distill = {"teacher": "unused.pt", "balance": {"every_steps": 3}}
    config = tiny_config(framework, train={"log_every": 5}, distill=distill)
    torch.manual_seed(0)
    teacher = tiny_detector(framework, backbone="resnet34", fpn_channels=128)
    distiller = Distiller(teacher, tiny_detector(framework), config.distill, SIZE)
    steps = count_step_syncs(distiller, config, [batch] * 6, CPU)
    assert [step.kind for step in steps[1:-1]] == ["balance", "ordinary", "ordinary", "balance", "logging", "ordinary"]
    for step in steps:
        if step.kind == "ordinary":
            gid = [sync.source for sync in step.syncs if sync.owner == "gid"]
            assert len(gid) <= TARGET, f"step {step.index}: {gid}"
