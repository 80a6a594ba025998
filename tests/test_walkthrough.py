"""The walk-through of docs/models.md (a pretrained teacher in, a deployable student out), command by command, on
small stand-ins of torchvision's files (same format: state dicts of torchvision's builders, randomly initialised)."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
import yaml
from torchvision.ops.misc import FrozenBatchNorm2d

from gid.cli import main
from gid.models import load_model, read_checkpoint
from support import tiny_config_dict


def write_config(path: Path, synth_root: Path, tmp_path: Path, name: str, model: dict, **more) -> Path:
    run = {"name": name, "storage_path": str(tmp_path / "runs")}
    config = tiny_config_dict(synth_root, data={"batch_size": 8}, model=model, run=run, **more)
    path.write_text(yaml.safe_dump(config))
    return path


def test_torchvision_weights_in_a_deployable_student_out(ray_local, synth_root, tmp_path, capsys):
    torch.manual_seed(0)
    coco = tmp_path / "retinanet_resnet50_fpn_v2_coco.pth"  # 91 COCO classes, like the published file
    torch.save(torchvision.models.detection.retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict(), coco)
    imagenet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), imagenet)
    imported, runs = tmp_path / "teachers" / "coco.pt", tmp_path / "runs"

    # 1. import
    assert main(["model", "import", str(coco), "--builder", "retinanet_resnet50_fpn_v2", "--out", str(imported)]) == 0
    assert read_checkpoint(imported)["num_classes"] == 91

    # 2. fine-tune on the data's 6 classes (+ background)
    teacher_model = {"backbone": "resnet50", "fpn_channels": 256, "variant": "v2"}
    teacher_yaml = write_config(tmp_path / "teacher.yaml", synth_root, tmp_path, "teacher", teacher_model)
    capsys.readouterr()
    assert main(["train", str(teacher_yaml), "--set", f"model.weights={imported}"]) == 0
    assert "head.classification_head.cls_logits" in capsys.readouterr().out  # the re-initialised layers, named
    teacher = runs / "teacher" / "model.pt"
    assert read_checkpoint(teacher)["num_classes"] == 7

    # 3. distil a student whose backbone starts from ImageNet weights
    student_yaml = write_config(
        tmp_path / "student.yaml", synth_root, tmp_path, "student", {"backbone": "resnet18", "fpn_channels": 64},
        distill={"teacher": "set-on-the-command-line.pt"},
    )
    argv = ["distill", str(student_yaml), "--set", f"model.backbone_weights={imagenet}", "--set", f"distill.teacher={teacher}"]
    assert main(argv) == 0
    student_file = runs / "student" / "model.pt"
    student, config, _ = load_model(student_file)
    body, pretrained = student.backbone.body, torch.load(imagenet, weights_only=True)
    assert isinstance(body.bn1, FrozenBatchNorm2d) and config.model.backbone_weights == imagenet
    assert torch.equal(body.conv1.weight, pretrained["conv1.weight"])  # frozen: torchvision's 3 trained stages
    assert torch.equal(body.layer1[0].conv1.weight, pretrained["layer1.0.conv1.weight"])
    assert not torch.equal(body.layer4[0].conv1.weight, pretrained["layer4.0.conv1.weight"])  # trained
    assert read_checkpoint(student_file)["metrics"]["loss_feature"] > 0  # GID from the fine-tuned teacher

    # 4. export: the same tensors for torchvision, the same detections from TorchScript
    state_dict, scripted = tmp_path / "student.pth", tmp_path / "student.ts"
    assert main(["model", "export", str(student_file), "--format", "torchvision", "--out", str(state_dict)]) == 0
    assert main(["model", "export", str(student_file), "--format", "torchscript", "--out", str(scripted)]) == 0
    exported = torch.load(state_dict, weights_only=True)
    assert exported.keys() == student.state_dict().keys()
    assert all(torch.equal(exported[key], value) for key, value in student.state_dict().items())
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        (expected,) = student.eval()([image])
        _, (got,) = torch.jit.load(scripted)([image])
    assert all(torch.allclose(got[key].float(), expected[key].float(), atol=1e-5) for key in ("boxes", "scores", "labels"))
