"""Multi-label preference pairs (label sets): pair targets, DPO / IPO and reward models against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from quiet_trainer import make_trainer
from torch import nn
from torch.utils.data import DataLoader

from cvft.data.preference import PreferencePairDataset, pair_target, pairs_from_labels, split_pair_targets
from cvft.errors import DatasetError
from cvft.strategies.outputs import StepOutputs
from cvft.strategies.preference import DPO, RewardModel
from cvft.tasks import ImageClassifier


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _set_log_prob(logits: list[float], labels: list[int]) -> float:
    """log pi(y | x) of independent Bernoulli labels, written out label by label."""
    return sum(_log_sigmoid(z) if y else _log_sigmoid(-z) for z, y in zip(logits, labels, strict=True))


class FixedLogits(nn.Module):
    """A 'network' whose logits are a parameter per row (the batch index is the input)."""

    def __init__(self, logits: list[list[float]]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.logits[rows.long()]


def test_multi_label_pair_targets_are_multi_hot_rows_of_width_2c_plus_1():
    row = pair_target((0, 2), (1,), 0.5, num_classes=3)
    assert row.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.5]
    preferred, rejected, weights = split_pair_targets(row[None], num_classes=3)
    assert preferred.tolist() == [[1.0, 0.0, 1.0]] and rejected.tolist() == [[0.0, 1.0, 0.0]]
    assert weights.tolist() == [0.5]
    # width 3 is both [preferred, rejected, weight] and a one-label set pair: num_classes / multi_label decide
    one_label = torch.tensor([[1.0, 0.0, 2.0]])
    assert split_pair_targets(one_label, num_classes=1)[0].tolist() == [[1.0]]
    assert split_pair_targets(one_label, num_classes=2)[0].tolist() == [1]
    with pytest.raises(DatasetError, match=r"multi-label pair targets.*\(B, 7\).*--data.preference_pairs"):
        split_pair_targets(one_label, num_classes=3, multi_label=True)
    with pytest.raises(DatasetError, match=r"single-label pair targets.*\(B, 3\), got \(2,\)"):
        split_pair_targets(torch.tensor([0, 1]))


def test_pairs_from_labels_flip_one_label_of_the_true_set():
    targets = [(0,), (1, 2), (), (0, 1, 2)]
    pairs = pairs_from_labels(targets, num_classes=3, seed=5, multi_label=True)
    for index, (pair, truth) in enumerate(zip(pairs, targets, strict=True)):
        assert pair.path == index and pair.preferred == truth and pair.weight == 1.0
        assert len(set(pair.preferred) ^ set(pair.rejected)) == 1
    assert pairs == pairs_from_labels(targets, num_classes=3, seed=5, multi_label=True)
    data = PreferencePairDataset(pairs, images=[(torch.zeros(1), t) for t in targets], num_classes=3)
    assert data[1][1][:3].tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(DatasetError, match="num_classes"):
        PreferencePairDataset(pairs, images=[(torch.zeros(1), t) for t in targets])


def test_multi_label_dpo_and_ipo_losses_by_hand():
    policy = [[0.5, -1.0, 2.0], [0.0, 1.5, -0.5]]
    reference = [[0.0, 0.0, 1.0], [1.0, -1.0, 0.0]]
    preferred, rejected, weights = [[1, 0, 1], [0, 1, 0]], [[1, 1, 1], [0, 0, 0]], [1.0, 3.0]
    targets = torch.stack(
        [pair_target(tuple(i for i, y in enumerate(w) if y), tuple(i for i, y in enumerate(lo) if y), wt, 3)
         for w, lo, wt in zip(preferred, rejected, weights, strict=True)]
    )  # fmt: skip
    model = FixedLogits(reference)
    rows = torch.arange(2)
    strategy = DPO(beta=0.5)
    strategy.reference_policy.take_snapshot(model)  # the reference: the model as it is now
    with torch.no_grad():
        model.logits.copy_(torch.tensor(policy))
    margins = [
        (_set_log_prob(p, w) - _set_log_prob(r, w)) - (_set_log_prob(p, lo) - _set_log_prob(r, lo))
        for p, r, w, lo in zip(policy, reference, preferred, rejected, strict=True)
    ]
    dpo = sum(wt * math.log1p(math.exp(-0.5 * h)) for wt, h in zip(weights, margins, strict=True)) / sum(weights)
    ipo = sum(wt * (h - 1 / (2 * 0.25)) ** 2 for wt, h in zip(weights, margins, strict=True)) / sum(weights)
    outputs = StepOutputs(model(rows), rows, targets)
    assert float(strategy.loss_terms(model, None, outputs)["dpo"].detach()) == pytest.approx(dpo, rel=1e-5)
    ipo_strategy = DPO(loss="ipo", tau=0.25)
    ipo_strategy.reference_policy.take_snapshot(FixedLogits(reference))
    assert float(ipo_strategy.loss_terms(model, None, outputs)["ipo"].detach()) == pytest.approx(ipo, rel=1e-5)


def test_multi_label_dpo_is_log_2_when_the_policy_is_the_reference():
    model = FixedLogits([[0.3, -2.0, 1.0, 0.0]])
    rows = torch.arange(1)
    targets = pair_target((0, 2), (3,), num_classes=4)[None]
    terms = DPO(beta=2.0).loss_terms(model, None, StepOutputs(model(rows), rows, targets))
    assert float(terms["dpo"]) == pytest.approx(math.log(2), abs=1e-6)


def test_multi_label_reward_model_scores_a_set_by_the_sum_of_its_labels():
    scores = [[1.0, -2.0, 0.5]]
    targets = pair_target((0, 2), (1,), 2.0, num_classes=3)[None]
    margin = (1.0 + 0.5) - (-2.0)
    terms = RewardModel().loss_terms(None, None, StepOutputs(torch.tensor(scores), None, targets))
    assert float(terms["bradley_terry"]) == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-6)


def test_dpo_moves_a_multi_label_policy_towards_the_preferred_sets():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(64, 4, generator=generator)
    truth = (features[:, :3] > 0).long()  # label c is on when feature c is positive
    targets = [tuple(int(c) for c in torch.nonzero(row).flatten()) for row in truth]
    pairs = pairs_from_labels(targets, num_classes=3, seed=0, multi_label=True)
    pair_rows = torch.stack([pair_target(p.preferred, p.rejected, p.weight, 3) for p in pairs])
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    strategy = DPO(beta=1.0)

    def true_set_log_prob() -> float:
        with torch.no_grad():
            logits = model(features)
            return float(
                (truth * nn.functional.logsigmoid(logits) + (1 - truth) * nn.functional.logsigmoid(-logits))
                .sum(-1)
                .mean()
            )

    before = true_set_log_prob()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(60):
        loss = strategy.loss_terms(model, None, StepOutputs(model(features), features, pair_rows))["dpo"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < 0.5 * math.log(2)
    assert true_set_log_prob() > before + 0.5
    with torch.no_grad():
        accuracy = float(((model(features) > 0).long() == truth).float().mean())
    assert accuracy > 0.85


def test_image_classifier_trains_a_multi_label_dpo_on_label_set_pairs(tmp_path):
    torch.manual_seed(0)
    images = torch.randn(16, 3, 32, 32)
    targets = [tuple(c for c in range(3) if (i >> c) & 1) for i in range(16)]
    pairs = PreferencePairDataset(
        pairs_from_labels(targets, 3, multi_label=True), images=list(zip(images, targets, strict=True)), num_classes=3
    )
    model = ImageClassifier(
        "test_resnet", pretrained=False, num_classes=3, multi_label=True, strategies=["linear_probe", "dpo"]
    )
    trainer = make_trainer(default_root_dir=tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=DataLoader(pairs, batch_size=8))
    assert trainer.global_step == 2 and "train/dpo/dpo" in trainer.callback_metrics
    # single-label pairs for a multi-label classifier are refused, naming the DataModule option
    single = PreferencePairDataset(pairs_from_labels([0, 1] * 4, 3), images=[(image, 0) for image in images[:8]])
    with pytest.raises(DatasetError, match="multi-label pair targets.*preference_pairs"):
        make_trainer(default_root_dir=tmp_path, max_epochs=1, limit_val_batches=0).fit(
            model, train_dataloaders=DataLoader(single, batch_size=8)
        )


def test_a_labelled_objective_refuses_pairs(tmp_path):
    images = torch.randn(8, 3, 32, 32)
    pairs = PreferencePairDataset(pairs_from_labels([0, 1] * 4, 3), images=[(image, 0) for image in images])
    model = ImageClassifier("test_resnet", pretrained=False, num_classes=3, strategies=["linear_probe"])
    with pytest.raises(DatasetError, match="preference pairs, but no strategy trains on pairs.*preference_pairs"):
        make_trainer(default_root_dir=tmp_path, max_epochs=1, limit_val_batches=0).fit(
            model, train_dataloaders=DataLoader(pairs, batch_size=8)
        )
