"""Feature levels, the ViTDet simple pyramid, the FPN and the torchvision detector construction."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import timm
import torch
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from cvft.detection import (
    MultiScaleFeatures,
    SimpleFeaturePyramid,
    build_neck,
    default_anchor_sizes,
    extra_block,
    feature_levels,
    head_mode,
    image_normalisation,
    label_offset,
    neck_strides,
    shift_labels,
)
from cvft.errors import CvftError
from cvft.tasks import ObjectDetector

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def test_cnn_levels_follow_feature_info():
    body = timm.create_model("test_resnet", num_classes=0)
    info = body.feature_info
    levels = feature_levels(body)
    assert levels.indices == [2, 3, 4] and not levels.is_vit
    assert levels.channels == [info[i]["num_chs"] for i in levels.indices]
    assert levels.strides == [8, 16, 32]
    assert feature_levels(body, [-2, -1]).indices == [3, 4]
    with pytest.raises(CvftError, match="distinct, increasing"):
        feature_levels(body, [4, 2])
    with pytest.raises(CvftError, match="has 5"):
        feature_levels(body, [7])


def test_vit_reads_one_block():
    body = timm.create_model("test_vit", num_classes=0)
    levels = feature_levels(body)
    assert levels.is_vit and levels.indices == [len(body.blocks) - 1] and levels.strides == [16]
    with pytest.raises(CvftError, match="single index"):
        feature_levels(body, [2, 5])


def test_fpn_features_strides_and_channels():
    body = timm.create_model("test_resnet", num_classes=0)
    levels = feature_levels(body)
    neck = build_neck(levels, 32, extra_block("fcos", 32), ())
    strides = neck_strides(levels, (), 2)
    features = MultiScaleFeatures(body, neck, levels, 32, strides)
    out = features(torch.randn(2, 3, 128, 96))
    assert list(out) == ["0", "1", "2", "p6", "p7"] and strides == [8, 16, 32, 64, 128]
    for stride, value in zip(strides, out.values(), strict=True):
        assert value.shape == (2, 32, -(-128 // stride), -(-96 // stride))


def test_vit_simple_pyramid_strides_and_channels():
    body = timm.create_model("test_vit", num_classes=0, dynamic_img_size=True)
    levels = feature_levels(body)
    pyramid = SimpleFeaturePyramid(levels.channels[-1], 48, extra_blocks=LastLevelP6P7(48, 48))
    strides = neck_strides(levels, pyramid.scale_factors, 2)
    assert strides == [4, 8, 16, 32, 64, 128]
    features = MultiScaleFeatures(body, pyramid, levels, 48, strides)
    out = features(torch.randn(1, 3, 128, 128))
    assert [tuple(t.shape) for t in out.values()] == [(1, 48, 128 // s, 128 // s) for s in strides]
    maxpool = SimpleFeaturePyramid(64, 16, scale_factors=(1.0, 0.5), extra_blocks=LastLevelMaxPool())
    assert [t.shape[-1] for t in maxpool(OrderedDict(x=torch.randn(1, 64, 8, 8))).values()] == [8, 4, 2]
    with pytest.raises(CvftError, match="scale_factors"):
        SimpleFeaturePyramid(64, 16, scale_factors=(3.0,))


@pytest.mark.parametrize(
    ("backbone", "head", "strides"),
    [
        ("test_resnet", "fcos", [8, 16, 32, 64, 128]),
        ("test_resnet", "faster_rcnn", [8, 16, 32, 64]),
        ("test_vit", "retinanet", [8, 16, 32, 64, 128]),
        ("test_vit", "faster_rcnn", [4, 8, 16, 32, 64]),
    ],
)
def test_detector_levels_and_registration(backbone, head, strides):
    model = ObjectDetector(1, backbone=backbone, pretrained=False, head=head, image_size=64, fpn_channels=32)
    assert model.features.strides == strides and model.features.out_channels == 32
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and {n.split(".")[0] for n in names} == {"backbone", "neck", "detector"}
    # the backbone keeps the timm parameter names (minus the layers after the last level read, pruned)
    reference = {n for n, _ in timm.create_model(backbone, num_classes=0).named_parameters()}
    assert {n.removeprefix("backbone.") for n in names if n.startswith("backbone.")} <= reference
    maps = model.features(torch.randn(1, 3, 64, 64))
    assert len(maps) == len(strides) and all(t.shape[1] == 32 for t in maps.values())


def test_anchor_defaults_and_normalisation():
    assert default_anchor_sizes("faster_rcnn", [4, 8, 16, 32, 64], 800) == [32, 64, 128, 256, 512]
    assert default_anchor_sizes("faster_rcnn", [8, 16, 32, 64], 96) == [8, 16, 32, 64]
    assert default_anchor_sizes("fcos", [8, 16], 800) == [8, 16]
    mean, std = image_normalisation(timm.create_model("test_resnet"))
    assert mean == [0.5, 0.5, 0.5] and std == [0.5, 0.5, 0.5]
    with pytest.raises(CvftError, match="one positive size per feature level"):
        ObjectDetector(1, backbone="test_resnet", pretrained=False, image_size=64, anchor_sizes=[8, 16])
    with pytest.raises(CvftError, match="one box per location"):
        ObjectDetector(1, backbone="test_resnet", pretrained=False, image_size=64, aspect_ratios=[0.5, 1.0])


def test_label_shift_round_trip():
    targets = [{"boxes": torch.zeros(2, 4), "labels": torch.tensor([0, 2])}]
    shifted = shift_labels(targets, label_offset("faster_rcnn"))
    assert shifted[0]["labels"].tolist() == [1, 3] and targets[0]["labels"].tolist() == [0, 2]
    assert shift_labels(shifted, -1)[0]["labels"].tolist() == [0, 2]
    assert shift_labels(targets, label_offset("fcos"))[0] is targets[0]


def test_head_mode_leaves_backbone_alone():
    model = torch.nn.Module()
    model.backbone, model.head = torch.nn.BatchNorm2d(2), torch.nn.Conv2d(2, 2, 1)
    model.eval()
    with head_mode(model, training=True):
        assert model.training and model.head.training and not model.backbone.training
    assert not model.training and not model.head.training
