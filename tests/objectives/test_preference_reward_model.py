"""A Bradley-Terry reward model trained in a Lightning fit, saved as a checkpoint, then the reward of PPO / REINFORCE.

The pairs prefer one known action (:data:`PREFERRED`) for every image, so the reward model learns to score it highest
and a policy trained on that reward must put more probability on it. The reward model stays frozen and outside the
policy throughout, and its file is read without unpickling.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from quiet_trainer import make_trainer
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from cvft.checkpoints import load_checkpoint
from cvft.data.preference import PreferencePairDataset, pairs_from_cost_matrix
from cvft.errors import StrategyError
from cvft.strategies.distillation.teacher import register_teacher_loader
from cvft.strategies.preference import PPO, ModelReward, build_reward
from cvft.tasks import ImageClassifier

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, PREFERRED, IMAGES = 3, 2, 16
#: Action ``PREFERRED`` is the cheapest decision for every true label, so every pair prefers it.
COST = [[2.0, 1.0, 0.0]] * CLASSES


def _images() -> TensorDataset:
    """A tiny generated labelled image set: ``IMAGES`` random 3 x 32 x 32 images with random labels."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(IMAGES, 3, 32, 32, generator=generator)
    return TensorDataset(images, torch.randint(CLASSES, (IMAGES,), generator=generator))


def _classifier(strategies: list[Any], seed: int) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(
        "test_resnet", pretrained=False, num_classes=CLASSES, strategies=strategies, lr=0.05, warmup_epochs=0
    )


def _mean_probs(model: nn.Module, images: Tensor) -> Tensor:
    """The policy's mean probability of each action over ``images``, in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probs = model(images).softmax(-1).mean(0)
    model.train(was_training)
    return probs


def _tensors(value: Any) -> list[Tensor]:
    """Every tensor in a nested checkpoint structure."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []


@pytest.fixture(scope="module")
def reward_files(tmp_path_factory) -> dict[str, Path]:
    """A ``linear_probe`` + ``reward_model`` classifier fitted on pairs preferring ``PREFERRED``, saved as a user would.

    Returns:
        ``checkpoint``: the Trainer's ``.ckpt``; ``adapter``: its adapter ``.safetensors``; ``base``: the backbone's
        weights before the fit (what the adapter sits on), as ``.safetensors``.
    """
    root = tmp_path_factory.mktemp("reward_model")
    data = _images()
    pairs = PreferencePairDataset(pairs_from_cost_matrix(data.tensors[1].tolist(), COST), images=data)
    assert {int(pairs[i][1][0]) for i in range(len(pairs))} == {PREFERRED}
    model = _classifier(["linear_probe", "reward_model"], seed=0)
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, root / "base.safetensors")
    trainer = make_trainer(default_root_dir=root, max_epochs=3, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=DataLoader(pairs, batch_size=8))
    assert trainer.global_step == 6
    trainer.save_checkpoint(root / "reward.ckpt")
    model.save_adapter(root / "reward.safetensors")
    return {
        "checkpoint": root / "reward.ckpt",
        "adapter": root / "reward.safetensors",
        "base": root / "base.safetensors",
    }


@pytest.fixture(scope="module")
def reward_checkpoint(reward_files) -> Path:
    """The reward model's Trainer checkpoint."""
    return reward_files["checkpoint"]


def _scores(reward: Any, images: Tensor) -> Tensor:
    """``(N, CLASSES)`` rewards of every action."""
    return torch.stack([reward(images, torch.full((len(images),), a), None, None) for a in range(CLASSES)], -1)


def test_reward_model_scores_the_preferred_action_highest(reward_checkpoint):
    reward = PPO(reward={"model": str(reward_checkpoint)}).reward_fn
    assert isinstance(reward, ModelReward)
    scores = _scores(reward, _images().tensors[0])
    others = [a for a in range(CLASSES) if a != PREFERRED]
    assert bool((scores[:, PREFERRED, None] > scores[:, others]).all())


@pytest.mark.parametrize("objective", [{"name": "ppo", "epochs": 2}, {"name": "reinforce", "baseline": "none"}])
def test_policy_trained_on_a_reward_model_checkpoint_prefers_its_action(tmp_path, reward_checkpoint, objective):
    spec = {**objective, "reward": {"model": str(reward_checkpoint)}}
    model = _classifier(["linear_probe", spec], seed=1)
    data = _images()
    images = data.tensors[0]
    before = _mean_probs(model, images)[PREFERRED]
    trainer = make_trainer(default_root_dir=tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=8))
    after = _mean_probs(model, images)[PREFERRED]
    assert after > before + 0.05, (float(before), float(after))

    # the reward model: frozen, bit-identical to its file, not part of the policy or its optimizer
    strategy = next(s for s in model.strategy_stack if s.name == objective["name"])
    reward_model = strategy.reward_fn.model
    saved = load_checkpoint(reward_checkpoint, require_lightning=True)["state_dict"]
    saved = {k.removeprefix("backbone."): v for k, v in saved.items() if k.startswith("backbone.")}
    state = reward_model.state_dict()
    assert set(state) == set(saved)
    for name, value in state.items():
        assert torch.equal(value, saved[name]), f"reward model {name} changed"
    assert not any(p.requires_grad for p in reward_model.parameters())
    assert not reward_model.training
    assert all(module is not reward_model for module in model.modules())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised and not optimised & {id(p) for p in reward_model.parameters()}

    policy_path = tmp_path / "policy.ckpt"
    trainer.save_checkpoint(policy_path)
    policy = load_checkpoint(policy_path, require_lightning=True)
    assert set(policy["state_dict"]) == set(model.state_dict())
    head = reward_model.fc.weight
    assert not any(t.shape == head.shape and torch.equal(t, head) for t in _tensors(policy))
    # the policy reloads without its reward model: the reward file is read only when a fit needs the reward
    os.replace(reward_checkpoint, tmp_path / "moved.ckpt")
    try:
        reloaded = ImageClassifier.from_checkpoint(policy_path)
    finally:
        os.replace(tmp_path / "moved.ckpt", reward_checkpoint)
    assert torch.equal(reloaded.backbone.fc.weight, model.backbone.fc.weight)


def test_reward_model_checkpoint_with_pickled_objects_is_refused_unread(tmp_path, reward_checkpoint):
    marker = tmp_path / "unpickled"
    checkpoint = load_checkpoint(reward_checkpoint, require_lightning=True)

    class _Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return os.mkdir, (str(marker),)  # runs only if the file is unpickled

    checkpoint["callbacks"] = {"payload": _Payload()}
    path = tmp_path / "pickled.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(StrategyError, match="pickled Python objects"):
        PPO(reward={"model": str(path)}).reward_fn  # noqa: B018 (the property loads the reward model)
    assert not marker.exists()


def test_reward_model_adapter_on_its_base_weights_scores_as_the_checkpoint(reward_files):
    images = _images().tensors[0]
    from_checkpoint = _scores(PPO(reward={"model": str(reward_files["checkpoint"])}).reward_fn, images)
    spec = {"model": str(reward_files["adapter"]), "weights": str(reward_files["base"])}
    assert torch.allclose(_scores(PPO(reward=spec).reward_fn, images), from_checkpoint, atol=1e-5)


def test_reward_model_adapter_without_base_weights_is_refused(reward_files):
    with pytest.raises(StrategyError, match="randomly initialised backbone"):
        PPO(reward={"model": str(reward_files["adapter"]), "pretrained": False}).reward_fn  # noqa: B018


def test_reward_model_base_weights_come_from_the_hub_unless_given():
    calls: list[tuple[str | None, bool]] = []

    class _RecordingLoader:
        def check(self, teacher: str) -> None:
            return None

        def load(self, teacher: str, weights: str | None, pretrained: bool) -> nn.Module:
            calls.append((weights, pretrained))
            return nn.Linear(2, CLASSES)

    previous = register_teacher_loader(_RecordingLoader())
    try:
        build_reward({"model": "reward.safetensors"})
        build_reward({"model": "reward.safetensors", "weights": "base.safetensors"})
        build_reward({"model": "reward.safetensors", "pretrained": False})
    finally:
        register_teacher_loader(previous)
    assert calls == [(None, True), ("base.safetensors", False), (None, False)]
