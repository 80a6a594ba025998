"""A teacher's validation AP: read from its file, or measured once on the split and cached beside it."""

from __future__ import annotations

import json
import os

import torch
import torchvision

from gid.distill.teacher import CACHE_SUFFIX, cached_val_ap, ensure_teacher_val_ap, teacher_check, teacher_val_ap
from gid.models import save_model
from gid.models.exchange import import_torchvision


def test_a_teacher_file_without_an_ap_is_measured_once_and_the_cache_follows_the_file(tiny_config, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "retinanet_resnet50_fpn.pth"  # the format torchvision publishes: a bare state dict
    torch.save(torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=7).state_dict(), weights)
    teacher = tmp_path / "imported.pt"
    import_torchvision(weights, "retinanet_resnet50_fpn", teacher, image_size=64)
    config = tiny_config(distill={"teacher": str(teacher)})
    assert teacher_val_ap(config) is None  # an imported file records no AP

    measured = ensure_teacher_val_ap(config)
    cache = teacher.with_name(teacher.name + CACHE_SUFFIX)
    (key,) = json.loads(cache.read_text())
    assert measured == 0.0 and cached_val_ap(config) == measured == teacher_val_ap(config)
    # later calls read the cache rather than evaluating again
    cache.write_text(json.dumps({key: 0.123}))
    assert ensure_teacher_val_ap(config) == 0.123
    # another split, or a changed teacher file, is not what was measured
    assert cached_val_ap(config.model_copy(update={"data": config.data.model_copy(update={"image_size": 96})})) is None
    os.utime(teacher, ns=(1, 1))
    assert cached_val_ap(config) is None
    # a random (untrained) teacher is called out
    assert "look untrained or not loaded" in teacher_check(measured, None, "the student alone")


def test_a_stored_ap_is_used_as_it_is(tiny_config, tmp_path):
    from gid.models import build_detector

    config = tiny_config()
    teacher = tmp_path / "teacher.pt"
    save_model(build_detector(config.model, 64, 7).state_dict(), config, 7, teacher, metrics={"val_ap": 0.31})
    distill = tiny_config(distill={"teacher": str(teacher)})
    assert ensure_teacher_val_ap(distill) == 0.31
    assert not teacher.with_name(teacher.name + CACHE_SUFFIX).exists()  # nothing to measure, nothing cached
