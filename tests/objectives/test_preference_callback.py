"""The five preference objectives through ``StrategyCallback`` on a LightningModule that is not cvft's."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import timm
import torch
from quiet_trainer import make_trainer
from torch.utils.data import DataLoader, TensorDataset

from cvft.data.preference import pair_target
from cvft.strategies import StrategyCallback

CLASSES, ROWS, PREFERRED = 3, 16, 2
COST = [[1.0, 1.0, 0.0]] * CLASSES  # whatever the label, choosing class 2 is free and anything else costs 1


class ForeignModule(pl.LightningModule):
    """A user's own module: a timm network, its own optimizer, and the callback's hooks called by hand."""

    def __init__(self, callback: StrategyCallback) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = timm.create_model("test_resnet", pretrained=False, num_classes=CLASSES)
        self.callback = callback
        self.automatic_optimization = not callback.steps_itself

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        if self.callback.steps_itself:
            optimizer = self.optimizers()

            def optimizer_step() -> None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            self.callback.optimisation_step(images, targets, None, optimizer_step)
            return None
        terms = self.callback.loss_terms(batch, self(images))
        return sum(terms.values())

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def _images() -> torch.Tensor:
    return torch.randn(ROWS, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _batches(pairs: bool) -> DataLoader:
    images = _images()
    if pairs:
        others = torch.arange(ROWS) % (CLASSES - 1)  # 0 or 1: always a class other than the preferred one
        targets = torch.stack([pair_target(PREFERRED, int(other)) for other in others])
    else:
        targets = torch.randint(CLASSES, (ROWS,), generator=torch.Generator().manual_seed(2))
    return DataLoader(TensorDataset(images, targets), batch_size=8)


def _preferred_log_odds(module: ForeignModule) -> float:
    """Mean over the images of the output for the preferred class minus the others' mean (log-odds for a policy)."""
    module.eval()
    with torch.no_grad():
        logits = module(_images())
    others = torch.cat([logits[:, :PREFERRED], logits[:, PREFERRED + 1 :]], dim=1)
    return float((logits[:, PREFERRED] - others.mean(1)).mean())


@pytest.mark.parametrize(
    ("objective", "pairs"),
    [
        ({"name": "reinforce", "reward": {"cost_matrix": COST}}, False),
        ({"name": "ppo", "reward": {"cost_matrix": COST}, "kl_coef": 0.0, "epochs": 2}, False),
        ({"name": "trpo", "reward": {"cost_matrix": COST}, "max_kl": 0.05}, False),
        ({"name": "dpo", "beta": 1.0}, True),
        ({"name": "reward_model"}, True),
    ],
    ids=lambda value: value["name"] if isinstance(value, dict) else str(value),
)
def test_objective_moves_a_foreign_module_towards_the_preferred_class(objective, pairs):
    callback = StrategyCallback(["linear_probe", objective])
    module = ForeignModule(callback)
    before = _preferred_log_odds(module)
    frozen = {n: p.detach().clone() for n, p in module.net.named_parameters() if not n.startswith("fc.")}
    trainer = make_trainer(max_epochs=3, callbacks=[callback])
    trainer.fit(module, _batches(pairs))
    assert callback.steps_itself == (objective["name"] in ("ppo", "trpo"))
    assert _preferred_log_odds(module) > before + 0.1
    for name, parameter in module.net.named_parameters():  # the linear probe: only the head moved
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
