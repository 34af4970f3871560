"""Block expansion: identity at set-up, only the copies (and head) train, exact adapter files, export, refusals.

Expected names and sizes come from the test models' architectures (a fresh timm model's hyper-parameters), never
from the strategy's own bookkeeping.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from strategy_testkit import NUM_CLASSES, ForeignClassifier, make_trainer, toy_loader, toy_task, trainable_names
from torch import nn

from cvft.adapter_files import load_adapter, read_adapter, save_adapter
from cvft.detection.features import feature_levels
from cvft.errors import StrategyError
from cvft.export import export_classifier
from cvft.strategies import StrategyCallback, apply_strategies
from cvft.strategies.block_expansion import find_block_sites, inserted_block_names, timm_depth_kwargs
from cvft.tasks import ImageClassifier

SIZE = 64  # large enough for a 4-stage CNN to keep a 2x2 final map


def _model(name: str, seed: int = 0) -> nn.Module:
    """A tiny timm model with "pretrained-like" weights: no zero biases or LayerNorm/BatchNorm defaults left.

    timm's random init leaves biases at zero and BatchNorm statistics at (0, 1), which would hide a copy that is not
    the identity; perturbing every parameter and statistic makes the checks meaningful.
    """
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _images(seed: int = 3, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# Placement per model and the blocks it must insert (written from the architectures: test_vit has 6 blocks;
# test_resnet's only shape-keeping block is layer1.0; test_convnext has depths 1, 2, 4, 2, every block shape-keeping).
CASES = {
    "test_vit": ({"num_blocks": 2}, ["blocks.3", "blocks.7"]),  # after blocks 2 and 5
    "test_resnet": ({"num_blocks": 1}, ["layer1.1"]),
    # every 2nd of the 9 blocks: stages.1.blocks.0, stages.2.blocks.0, stages.2.blocks.2, stages.3.blocks.0
    "test_convnext": (
        {"every": 2},
        ["stages.1.blocks.1", "stages.2.blocks.1", "stages.2.blocks.4", "stages.3.blocks.1"],
    ),
}
MODEL_NAMES = list(CASES)
HEAD = {"test_vit": "head.", "test_resnet": "fc.", "test_convnext": "head.fc."}  # the classifier Linear


def _spec(name: str) -> dict:
    return {"name": "block_expansion", **CASES[name][0]}


def _expanded(name: str, seed: int = 0) -> nn.Module:
    model = _model(name, seed)
    apply_strategies(model, [_spec(name)])
    return model.eval()


def _block_param_count(name: str) -> int:
    """Parameters of one inserted block, in closed form from the architecture's hyper-parameters."""
    pristine = _model(name)
    if name == "test_vit":
        D, H = pristine.embed_dim, pristine.blocks[0].mlp.fc1.out_features  # noqa: N806
        return 4 * D * D + 2 * D * H + 9 * D + H  # norms 4D, qkv 3D^2+3D, proj D^2+D, fc1 DH+H, fc2 HD+D
    if name == "test_resnet":
        C = pristine.layer1[0].conv1.out_channels  # noqa: N806 - BasicBlock, two 3x3 convs and two BNs
        return 2 * 9 * C * C + 4 * C
    raise AssertionError(name)


def _convnext_block_count(channels: int) -> int:
    """7x7 depthwise conv (49C + C), LayerNorm 2C, MLP 4C wide (4C^2 + 4C, 4C^2 + C), layer-scale gamma C."""
    C = channels  # noqa: N806
    return 8 * C * C + 58 * C


# --------------------------------------------------------------------------- identity at initialisation
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_logits_unchanged_at_initialisation(name):
    reference = _model(name)
    model = _expanded(name)
    with torch.no_grad():
        assert (model(_images()) - reference(_images())).abs().max() < 1e-6
        assert (model.forward_features(_images()) - reference.forward_features(_images())).abs().max() < 1e-6
    assert [n for n, _ in model.named_modules() if n in CASES[name][1]] == CASES[name][1]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_inserted_blocks_are_the_identity_in_train_mode_too(name):
    model = _expanded(name).train()
    seen = []

    def check(module, args, output):
        seen.append((args[0] - output).abs().max().item())

    for block in CASES[name][1]:
        model.get_submodule(block).register_forward_hook(check)
    with torch.no_grad():
        model(_images())
    assert len(seen) == len(CASES[name][1]) and max(seen) < 1e-6


def test_vit_intermediates_keep_the_original_blocks_and_the_copies_repeat_their_source():
    reference, model = _model("test_vit"), _expanded("test_vit")
    with torch.no_grad():
        original = reference.forward_intermediates(_images(), intermediates_only=True)
        expanded = model.forward_intermediates(_images(), intermediates_only=True)
        last = model.forward_intermediates(_images(), indices=[-1], intermediates_only=True)
    assert len(original) == 6 and len(expanded) == 8 and len(model.feature_info) == 8
    # original block i is now block i (i <= 2), i + 1 (3 <= i <= 5); the copies at 3 and 7 repeat blocks 2 and 5
    renumbered = [0, 1, 2, 4, 5, 6]
    for i, j in enumerate(renumbered):
        assert (expanded[j] - original[i]).abs().max() < 1e-6
    assert (expanded[3] - original[2]).abs().max() < 1e-6 and (expanded[7] - original[5]).abs().max() < 1e-6
    assert (last[0] - original[-1]).abs().max() < 1e-6
    assert [entry["module"] for entry in model.feature_info] == [f"blocks.{i}" for i in range(8)]
    assert feature_levels(model).indices == [7], "detection's default (last block) must read the last block"


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext"])
def test_cnn_intermediates_unchanged(name):
    reference, model = _model(name), _expanded(name)
    with torch.no_grad():
        original = reference.forward_intermediates(_images(), intermediates_only=True)
        expanded = model.forward_intermediates(_images(), intermediates_only=True)
    assert len(expanded) == len(original) == len(reference.feature_info)
    for a, b in zip(original, expanded, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-6
    assert model.feature_info == reference.feature_info


# --------------------------------------------------------------------------- what trains
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_only_the_new_blocks_and_the_head_train(name):
    model = _expanded(name)
    inserted = tuple(f"{block}." for block in CASES[name][1])
    head = {n for n, _ in model.named_parameters() if n.startswith(HEAD[name])}
    expected = {n for n, _ in model.named_parameters() if n.startswith(inserted)} | head
    assert trainable_names(model) == expected
    pristine = _model(name)
    if name == "test_convnext":
        channels = [int(info["num_chs"]) for info in pristine.feature_info]  # 24, 32, 48, 64
        new = sum(_convnext_block_count(channels[int(block.split(".")[1])]) for block in CASES[name][1])
    else:
        new = len(CASES[name][1]) * _block_param_count(name)
    head_count = pristine.num_features * NUM_CLASSES + NUM_CLASSES
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == new + head_count
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in pristine.parameters()) + new


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_original_weights_bit_identical_after_training_and_new_blocks_move(name):
    model = _expanded(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    images, targets = toy_task(8)
    for _ in range(4):
        model.train()
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    inserted = tuple(f"{block}." for block in CASES[name][1])
    trainable = trainable_names(model)
    for key, value in model.state_dict().items():
        if key in trainable:
            continue
        if key.startswith(inserted):  # BatchNorm statistics of the copies follow the data
            continue
        assert torch.equal(value, before[key]), f"original {key} moved"
    for block in CASES[name][1]:
        layers = [n for n, p in model.named_parameters() if n.startswith(f"{block}.") and p.requires_grad]
        assert any(not torch.equal(model.get_parameter(n), before[n]) for n in layers), f"{block} did not train"
    # the zeroed output layer left zero: the copy is no longer the identity
    last = {"test_vit": "mlp.fc2.weight", "test_resnet": "bn2.weight", "test_convnext": "mlp.fc2.weight"}[name]
    assert model.get_parameter(f"{CASES[name][1][0]}.{last}").abs().sum() > 0


def test_resnet_batchnorm_policy_frozen_originals_training_copies():
    model = _expanded("test_resnet")
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    stats = {n: m.running_mean.clone() for n, m in bns.items()}
    model.train()
    with torch.no_grad():
        model(_images())
    for name, module in bns.items():
        moved = not torch.equal(module.running_mean, stats[name])
        assert moved == name.startswith("layer1.1."), f"{name}: moved={moved}"


# --------------------------------------------------------------------------- adapter files and export
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_adapter_round_trip_is_exact(name, tmp_path):
    model = _expanded(name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, targets = toy_task(8)
    for _ in range(3):
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(images), targets).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(_images())
    path = save_adapter(model, tmp_path / "adapter", name, [_spec(name)])
    tensors, info = read_adapter(path)
    inserted = tuple(f"{block}." for block in CASES[name][1])
    assert all(key.startswith((*inserted, HEAD[name])) for key in tensors), "the file holds only new blocks + head"
    fresh = _model(name)  # same base weights; the stored config re-creates the blocks
    apply_strategies(fresh, info.strategies)
    load_adapter(fresh, path, backbone=name)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(_images()), expected)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_export_writes_a_deeper_timm_model(name, tmp_path):
    torch.manual_seed(0)
    classifier = ImageClassifier(name, pretrained=False, num_classes=NUM_CLASSES, strategies=[_spec(name)]).eval()
    with torch.no_grad():
        for block in CASES[name][1]:  # as after training: the copies are no longer the identity
            for param in classifier.backbone.get_submodule(block).parameters():
                param.add_(0.01 * torch.randn_like(param))
        expected = classifier(_images())
    path = export_classifier(classifier, tmp_path / "model.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    kwargs = json.loads(metadata["timm_kwargs"])
    assert json.loads(metadata["expanded_blocks"]) == CASES[name][1]
    depth = {
        "test_vit": {"depth": 8},
        "test_resnet": {"layers": [2, 1, 1, 1]},
        "test_convnext": {"depths": [1, 3, 6, 3]},
    }
    assert kwargs == depth[name]
    plain = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs).eval()
    plain.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        assert (plain(_images()) - expected).abs().max() < 1e-5


# --------------------------------------------------------------------------- the three ways to use it
def test_in_image_classifier_and_from_adapter(tmp_path):
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in _model("test_vit").state_dict().items()}, str(base))
    model = ImageClassifier("test_vit", pretrained=False, weights=str(base), num_classes=NUM_CLASSES,
                            strategies=[_spec("test_vit")], lr=1e-2, warmup_epochs=0)  # fmt: skip
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    make_trainer(max_epochs=1, limit_train_batches=2).fit(model, toy_loader(32, 8))
    trainable = trainable_names(model.backbone)
    assert all(n.startswith(("blocks.3.", "blocks.7.", "head.")) for n in trainable)
    for key, value in model.backbone.state_dict().items():
        if key not in trainable:
            assert torch.equal(value, before[key]), key
    assert not torch.equal(model.backbone.blocks[7].mlp.fc2.weight, before["blocks.7.mlp.fc2.weight"])
    reloaded = ImageClassifier.from_adapter(model.save_adapter(tmp_path / "adapter"), weights=str(base)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(_images()), model.eval()(_images()))


def test_as_callback_on_a_foreign_module():
    module = ForeignClassifier("test_resnet", lr=1e-2)
    callback = StrategyCallback([_spec("test_resnet")])
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, callbacks=[callback])
    trainer.fit(module, toy_loader(32, 8))
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    new = {id(p) for p in module.net.layer1[1].parameters()}
    assert new <= held and held == {id(p) for p in module.net.parameters() if p.requires_grad}


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "options",
    [
        {"num_blocks": 1, "every": 2},  # two placement options
        {"num_blocks": 0},
        {"every": -1},
        {"num_blocks": True},
        {"after": []},
        {"after": "2"},
        {"after_stages": [0.5]},
    ],
)
def test_bad_options_are_refused(options):
    with pytest.raises(StrategyError, match="block_expansion"):
        apply_strategies(_model("test_vit"), [{"name": "block_expansion", **options}])


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("test_vit", {"after": [6]}, "do not exist"),
        ("test_vit", {"after": [1, -5]}, "twice"),
        ("test_vit", {"num_blocks": 7}, "at most 6"),
        ("test_vit", {"every": 7}, "every <= 6"),
        ("test_vit", {"after_stages": [1]}, "do not exist"),
        ("test_resnet", {"after": [1]}, "downsample"),  # layer2.0 changes the shape
        ("test_resnet", {"after_stages": [3]}, "downsample"),
        ("test_resnet", {"num_blocks": 2}, "at most 1"),
        ("test_efficientnet", {"num_blocks": 1}, "side_module"),  # no supported block at all
        ("test_vit_relpos", {"num_blocks": 1}, "supports"),
    ],
)
def test_unsuitable_placements_and_architectures_are_refused(name, options, message):
    with pytest.raises(StrategyError, match=message):
        apply_strategies(_model(name), [{"name": "block_expansion", **options}])


def test_expanding_twice_is_refused():
    model = _expanded("test_vit")
    with pytest.raises(StrategyError, match="already expanded"):
        apply_strategies(model, [_spec("test_vit")])


def test_object_detector_reads_the_expanded_vit():
    from cvft.tasks import ObjectDetector

    torch.manual_seed(0)
    detector = ObjectDetector(num_classes=3, backbone="test_vit", pretrained=False, image_size=64, fpn_channels=32,
                              strategies=[{"name": "block_expansion", "num_blocks": 1}])  # fmt: skip
    backbone = detector.backbone
    assert len(backbone.blocks) == 7 and feature_levels(backbone).indices == [6]  # the copy of block 5, the last
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("blocks.6.") for n in trainable)
    with torch.no_grad():
        assert isinstance(detector.eval()([torch.rand(3, 64, 64)]), list)


def test_efficientnet_inverted_residuals_start_as_the_identity():
    """EfficientNet-Lite0: copies of skip blocks (zeroed last BatchNorm), eval and train mode; downsampling refused."""
    reference = _model("tf_efficientnet_lite0")
    model = _model("tf_efficientnet_lite0")
    apply_strategies(model, [{"name": "block_expansion", "num_blocks": 3}])
    sites = find_block_sites(reference)
    eligible = [s.name for s in sites if s.eligible]
    assert eligible and all(reference.get_submodule(n).has_skip for n in eligible)
    assert not any(s.eligible for s in sites if not reference.get_submodule(s.name).has_skip)
    new = set(inserted_block_names(model))
    assert len(new) == 3
    seen = []
    for block in new:
        model.get_submodule(block).register_forward_hook(lambda m, a, out: seen.append((a[0] - out).abs().max()))
    with torch.no_grad():
        assert (model.eval()(_images()) - reference(_images())).abs().max() < 1e-6
        model.train()(_images())
    assert len(seen) == 6 and max(seen) < 1e-6
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if n.startswith("classifier.") or any(n.startswith(b + ".") for b in new)}
    with pytest.raises(StrategyError, match="onnx"):
        timm_depth_kwargs(model)
