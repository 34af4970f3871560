"""StrategyCallback with several optimizers, with networks built in ``configure_model``, and the hyper-parameters
of the param groups it adds to an optimizer."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from strategy_testkit import NUM_CLASSES, make_backbone, make_trainer, toy_loader
from torch import nn

from cvft.errors import StrategyError
from cvft.strategies import GradualUnfreeze, StrategyCallback, add_param_groups, apply_strategies

UNFREEZE_AT_EPOCH_1 = {"name": "gradual_unfreeze", "milestones": [1], "groups_per_milestone": 1}


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def _held(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


class TwoOptimizers(LightningModule):
    """Manual optimisation: AdamW on the network's trainable parameters, SGD on an auxiliary module.

    ``split`` puts the network's trainable parameters into both optimizers (weights in one, biases in the other), the
    ambiguous case; ``aux_only`` gives the network no optimizer at all.
    """

    def __init__(self, layout: str = "net_and_aux") -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = make_backbone("test_resnet")
        self.aux = nn.Linear(NUM_CLASSES, NUM_CLASSES)
        self.aux_second = nn.Linear(NUM_CLASSES, NUM_CLASSES)
        self.layout = layout

    def training_step(self, batch, batch_idx):
        images, targets = batch
        for optimizer in self.optimizers():
            optimizer.zero_grad()
        net_loss = F.cross_entropy(self.net(images), targets)
        aux_input = torch.eye(NUM_CLASSES)
        aux_loss = self.aux(aux_input).pow(2).mean() + self.aux_second(aux_input).pow(2).mean()
        self.manual_backward(net_loss + aux_loss)
        for optimizer in self.optimizers():
            optimizer.step()

    def configure_optimizers(self):
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        if self.layout == "net_and_aux":
            return [torch.optim.AdamW(trainable, lr=1e-3), torch.optim.SGD(self.aux.parameters(), lr=1.0, momentum=0.9)]
        if self.layout == "split":
            weights = [p for p in trainable if p.ndim > 1]
            biases = [p for p in trainable if p.ndim <= 1]
            return [torch.optim.AdamW(weights, lr=1e-3), torch.optim.SGD(biases, lr=1e-3)]
        return [torch.optim.SGD(self.aux.parameters(), lr=0.1), torch.optim.SGD(self.aux_second.parameters(), lr=0.1)]


# --------------------------------------------------------------------------- which optimizer gets the groups
@pytest.mark.parametrize("strategies", [["linear_probe"], [UNFREEZE_AT_EPOCH_1]])
def test_added_groups_go_only_to_the_optimizer_that_holds_the_backbone(strategies):
    module = TwoOptimizers()
    frozen_before = {n: p.detach().clone() for n, p in module.net.named_parameters() if "layer1" in n}
    trainer = make_trainer(2, [StrategyCallback(strategies)], limit_train_batches=2)
    trainer.fit(module, toy_loader(32, 16))
    net_optimizer, aux_optimizer = trainer.optimizers
    assert _held(aux_optimizer) == _ids(module.aux.parameters()), "the auxiliary optimizer got backbone tensors"
    assert _held(net_optimizer) == _ids(p for p in module.net.parameters() if p.requires_grad)
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
    for name, before in frozen_before.items():  # never unfrozen by either strategy: must not move at all
        assert torch.equal(module.net.get_parameter(name), before), name


def test_several_optimizers_holding_the_backbone_is_refused():
    trainer = make_trainer(1, [StrategyCallback(["linear_probe"])], limit_train_batches=1)
    with pytest.raises(StrategyError, match="optimizer_index"):
        trainer.fit(TwoOptimizers("split"), toy_loader(16, 16))


def test_no_optimizer_holding_the_backbone_among_several_is_refused():
    trainer = make_trainer(1, [StrategyCallback(["linear_probe"])], limit_train_batches=1)
    with pytest.raises(StrategyError, match="optimizer_index"):
        trainer.fit(TwoOptimizers("aux_only"), toy_loader(16, 16))


def test_optimizer_index_chooses_the_optimizer():
    module = TwoOptimizers("aux_only")
    trainer = make_trainer(1, [StrategyCallback(["linear_probe"], optimizer_index=1)], limit_train_batches=1)
    trainer.fit(module, toy_loader(16, 16))
    first, second = trainer.optimizers
    assert _held(first) == _ids(module.aux.parameters())
    head = _ids(module.net.get_classifier().parameters())
    assert _held(second) == _ids(module.aux_second.parameters()) | head


def test_optimizer_index_leaves_parameters_of_other_optimizers_alone():
    module = TwoOptimizers("split")
    trainer = make_trainer(1, [StrategyCallback(["linear_probe"], optimizer_index=0)], limit_train_batches=1)
    trainer.fit(module, toy_loader(16, 16))
    weights, biases = trainer.optimizers
    assert _held(weights) == {id(module.net.fc.weight)}
    assert _held(biases) == {id(module.net.fc.bias)}


def test_optimizer_index_out_of_range_is_refused():
    trainer = make_trainer(1, [StrategyCallback(["linear_probe"], optimizer_index=2)], limit_train_batches=1)
    with pytest.raises(StrategyError, match="optimizer_index=2"):
        trainer.fit(TwoOptimizers(), toy_loader(16, 16))
    with pytest.raises(StrategyError, match="optimizer_index"):
        StrategyCallback(["linear_probe"], optimizer_index=-1)


# --------------------------------------------------------------------------- networks built in configure_model
class BuiltInConfigureModel(LightningModule):
    """Creates its network in Lightning's ``configure_model`` hook, which runs after ``Callback.setup``."""

    def configure_model(self):
        torch.manual_seed(0)
        self.net = timm.create_model("test_resnet", pretrained=False, num_classes=NUM_CLASSES)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return F.cross_entropy(self.net(images), targets)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_network_built_in_configure_model_gets_the_strategies():
    module = BuiltInConfigureModel()
    trainer = make_trainer(2, [StrategyCallback(["linear_probe"])], limit_train_batches=2)
    snapshot = {}

    class Snapshot(Callback):  # records the weights as training starts, after configure_model
        def on_train_start(self, trainer, pl_module):
            snapshot.update({n: p.detach().clone() for n, p in pl_module.net.named_parameters()})

    trainer.callbacks.append(Snapshot())
    trainer.fit(module, toy_loader(32, 16))
    head = {"fc.weight", "fc.bias"}
    assert {n for n, p in module.net.named_parameters() if p.requires_grad} == head
    assert _held(trainer.optimizers[0]) == _ids(module.net.fc.parameters())
    for name, param in module.net.named_parameters():
        changed = not torch.equal(param, snapshot[name])
        assert changed == (name in head), name


class BuiltInSetup(BuiltInConfigureModel):
    """Creates its network in the LightningModule's ``setup`` hook, which Lightning calls after the callbacks'."""

    configure_model = LightningModule.configure_model

    def setup(self, stage):
        BuiltInConfigureModel.configure_model(self)


@pytest.mark.parametrize("module_attr", [None, "net"])
def test_network_built_in_setup_is_refused_with_the_way_out(module_attr):
    trainer = make_trainer(1, [StrategyCallback(["linear_probe"], module_attr=module_attr)], limit_train_batches=1)
    with pytest.raises(StrategyError, match="build it in __init__ or in configure_model"):
        trainer.fit(BuiltInSetup(), toy_loader(16, 16))


# --------------------------------------------------------------------------- rate and decay of added groups
def _optimizer_with_distinct_groups(model: nn.Module, aux: nn.Module) -> torch.optim.Optimizer:
    """First group: an auxiliary module at a high rate and decay; second: the backbone's head at its own."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": list(aux.parameters()), "lr": 1.0, "weight_decay": 0.5, "betas": (0.5, 0.6)},
            {"params": trainable, "lr": 0.01, "weight_decay": 0.1},
        ]
    )


def test_added_groups_inherit_from_the_group_that_holds_the_backbone():
    model, aux = make_backbone("test_resnet"), nn.Linear(2, 2)
    strategy = GradualUnfreeze(milestones=[1], groups_per_milestone=1)
    strategy.setup(model)
    optimizer = _optimizer_with_distinct_groups(model, aux)
    newly = strategy.on_epoch_start(model, 1)
    added = add_param_groups(optimizer, model, newly)
    assert added and {n for g in added for n in _names(g, model)} == set(newly)
    for group in added:
        assert group["lr"] == group["initial_lr"] == pytest.approx(0.01)
        assert group["weight_decay"] == (0.1 if group["name"].endswith("/decay") else 0.0)
        assert group["betas"] == (0.9, 0.999)  # the template is the backbone's group, not the auxiliary one
    assert {g["weight_decay"] for g in added} == {0.0, 0.1}


def test_added_groups_take_explicit_rate_and_decay():
    model, aux = make_backbone("test_resnet"), nn.Linear(2, 2)
    apply_strategies(model, "linear_probe")
    optimizer = _optimizer_with_distinct_groups(model, aux)
    added = add_param_groups(
        optimizer, model, ["layer4.0.conv1.weight", "layer4.0.bn1.bias"], lr=0.003, weight_decay=0.2
    )
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in added} == {
        "cvft/layer4.0/decay": (pytest.approx(0.003), 0.2),
        "cvft/layer4.0/no_decay": (pytest.approx(0.003), 0.0),
    }


def test_callback_passes_added_rate_and_decay():
    class DistinctGroups(TwoOptimizers):
        def configure_optimizers(self):
            return _optimizer_with_distinct_groups(self.net, self.aux)

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(F.cross_entropy(self.net(batch[0]), batch[1]))
            optimizer.step()

    module = DistinctGroups()
    callback = StrategyCallback([UNFREEZE_AT_EPOCH_1], added_lr=0.003, added_weight_decay=0.2)
    trainer = make_trainer(2, [callback], limit_train_batches=1)
    trainer.fit(module, toy_loader(16, 16))
    groups = trainer.optimizers[0].param_groups
    added = [g for g in groups if g.get("name", "").startswith("cvft/")]
    assert [g["name"].rsplit("/", 1)[1] for g in added] == ["decay", "no_decay"]
    assert [(g["lr"], g["weight_decay"]) for g in added] == [(pytest.approx(0.003), 0.2), (pytest.approx(0.003), 0.0)]
    assert [(g["lr"], g["weight_decay"]) for g in groups[:2]] == [(1.0, 0.5), (0.01, 0.1)]  # the user's, untouched


def _names(group, model) -> list[str]:
    ids = _ids(group["params"])
    return [n for n, p in model.named_parameters() if id(p) in ids]
