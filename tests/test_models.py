import pickle
import re

import pytest
import torch
from torch.utils.data import DataLoader, Subset
from torchvision.models.detection import FasterRCNN
from torchvision.ops import MultiScaleRoIAlign

from gid.config import ModelConfig
from gid.data import build_dataset, collate
from gid.engine.evaluation import coco_metrics, predict
from gid.errors import GidError
from gid.models import anchor_sizes, build_detector, load_model, load_weights, save_model
from gid.frameworks import FRAMEWORKS
from gid.models.roi_align import MatmulMultiScaleRoIAlign, with_matmul_poolers
from support import RunsCode, tiny_detector


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_each_framework_trains_and_evaluates(framework, tiny_config, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(framework)
    dataset = build_dataset(config.data, "train", train=False)
    images, targets = collate([dataset[i] for i in range(4)])
    model = build_detector(config.model, config.data.image_size, dataset.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(8):  # overfit one small batch: the loss must go down
        loss = sum(model(list(images), list(targets)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < losses[0]

    val = build_dataset(config.data, "val", train=False)
    loader = DataLoader(Subset(val, range(4)), batch_size=4, collate_fn=collate)
    records = predict(model, loader, val.label_to_category_id, torch.device("cpu"))
    assert all(r["category_id"] in val.label_to_category_id.values() for r in records)
    assert 0.0 <= coco_metrics(val.coco, records)["ap"] <= 1.0


@pytest.mark.parametrize("backbone", ["resnet34", "mobilenet_v3_large"])
def test_other_backbones_build_and_run(backbone):
    model = tiny_detector("retinanet", 3, backbone=backbone).eval()
    (output,) = model([torch.rand(3, 64, 48)])
    assert set(output) == {"boxes", "scores", "labels"}


def test_auto_anchor_sizes_scale_with_input_but_stay_twice_the_stride():
    assert anchor_sizes(ModelConfig(framework="retinanet"), 800) == [32, 64, 128, 256, 512]
    assert anchor_sizes(ModelConfig(framework="faster_rcnn"), 400) == [16, 32, 64, 128, 256]
    # small inputs: COCO's sizes x 128/800 would fall below the strides 8..128 (4..64)
    assert anchor_sizes(ModelConfig(framework="retinanet"), 128) == [16, 32, 64, 128, 256]
    assert anchor_sizes(ModelConfig(framework="faster_rcnn"), 128) == [8, 16, 32, 64, 128]
    assert anchor_sizes(ModelConfig(framework="retinanet"), 320) == [16, 32, 64, 128, 256]
    assert anchor_sizes(ModelConfig(framework="fcos"), 128) == [8, 16, 32, 64, 128]  # strides
    assert anchor_sizes(ModelConfig(anchor_sizes=[1, 2, 3, 4, 5]), 128) == [1, 2, 3, 4, 5]


def test_model_file_round_trip(tiny_config, tmp_path):
    config = tiny_config("fcos")
    model = build_detector(config.model, 64, 4).eval()
    save_model(model, config, 4, tmp_path / "m.pt")
    loaded, loaded_config, num_classes = load_model(tmp_path / "m.pt")
    image = [torch.rand(3, 64, 64)]
    assert loaded_config == config and num_classes == 4
    torch.testing.assert_close(loaded.eval()(image)[0]["scores"], model(image)[0]["scores"])

    other = build_detector(config.model.model_copy(update={"framework": "retinanet"}), 64, 4)
    with pytest.raises(GidError, match="weights do not fit this model"):
        load_weights(other, tmp_path / "m.pt", "retinanet", 4)


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "checkpoint not found"),
        (b"PK\x03\x04 truncated", "not a readable checkpoint"),
        ("pickle", "refusing to load"),
        ({"format": "other"}, "not a gid model file"),
    ],
)
def test_bad_model_files_are_refused(tmp_path, content, expected):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "pickle":
        torch.save({"format": "gid-model/1", "evil": RunsCode("echo pwned")}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(GidError, match=expected):
        load_model(path)


def test_a_user_builder_gives_the_users_own_detector():
    from support import user_retinanet

    config = ModelConfig(framework="retinanet", builder="support:user_retinanet")
    model = build_detector(config, 64, 7)
    assert isinstance(model, type(user_retinanet(7))) and set(model.backbone.body) == {"stem", "c3", "c4", "c5"}
    assert model.head.classification_head.num_classes == 7


def test_a_user_built_faster_rcnn_pools_with_gids_pooler_unless_it_brings_its_own():
    config = ModelConfig(framework="faster_rcnn", builder="support:user_faster_rcnn")
    assert type(build_detector(config, 64, 7).roi_heads.box_roi_pool) is MatmulMultiScaleRoIAlign

    class OwnPooler(MultiScaleRoIAlign):
        pass

    own = FasterRCNN(build_detector(config, 64, 7).backbone, 7, box_roi_pool=OwnPooler(["0"], 7, 2))
    assert type(with_matmul_poolers(own).roi_heads.box_roi_pool) is OwnPooler


@pytest.mark.parametrize(
    "builder, framework, expected",
    [
        ("support:not_a_detector", "retinanet", "returned a Linear, not the torchvision RetinaNet"),
        ("support:user_retinanet", "fcos", "returned a RetinaNet, not the torchvision FCOS"),
        ("no_such_package.models:build", "retinanet", "cannot import it (No module named 'no_such_package')"),
    ],
)
def test_a_builder_that_gives_no_such_detector_is_one_line(builder, framework, expected):
    with pytest.raises(GidError, match=re.escape(expected)):
        build_detector(ModelConfig(framework=framework, builder=builder), 64, 7)
