"""Speed switches: ``channels_last`` and ``compile`` give the default layout's outputs (with strategies, EMA and
Mixup), keep ``state_dict`` keys and checkpoints plain, and a compiler that fails falls back to eager with one
warning instead of crashing the run."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from quiet_trainer import make_trainer
from torch.utils.data import DataLoader, TensorDataset

import cvft.callbacks.speed as speed
from cvft.callbacks.speed import CompileFallbackWarning, SpeedSwitches, compile_forward, use_channels_last
from cvft.tasks import ImageClassifier, MultiTaskClassifier, ObjectDetector

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def eager_backend(monkeypatch):
    """Compile with the ``eager`` backend: Dynamo traces and guards as for inductor, without minutes of codegen."""
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "eager")


def _classifier(backbone: str = "test_resnet", **kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    options = dict(pretrained=False, num_classes=3, lr=0.01, warmup_epochs=0.0)
    return ImageClassifier(backbone, **{**options, **kwargs})


def _loader(n: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 3, (n,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=4)


def _trained(**kwargs) -> ImageClassifier:
    """A classifier for comparing fits: SGD, since Adam turns rounding noise in near-zero gradients into full steps."""
    return _classifier(optimizer="sgd", **kwargs)


def _fit(model: ImageClassifier, **trainer_options) -> ImageClassifier:
    pl.seed_everything(1)  # Mixup draws from numpy
    make_trainer(max_epochs=1, **trainer_options).fit(model, _loader())
    return model.eval()


IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


# --------------------------------------------------------------------------- channels_last
@pytest.mark.parametrize("backbone", ["test_resnet", "test_convnext", "test_vit"])
@pytest.mark.parametrize("strategies", [None, "lora"])
def test_channels_last_gives_the_default_layouts_outputs(backbone, strategies):
    plain = _classifier(backbone, strategies=strategies).eval()
    converted = _classifier(backbone, strategies=strategies, channels_last=True).eval()
    SpeedSwitches(channels_last=True).setup(None, converted, "predict")  # what the Trainer does
    convs = [m.weight for m in converted.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1)
    seen = []
    converted.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))  # after the layout hook
    with torch.no_grad():
        torch.testing.assert_close(converted(IMAGES), plain(IMAGES), atol=1e-5, rtol=1e-4)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not IMAGES.is_contiguous(
        memory_format=torch.channels_last
    )
    assert list(converted.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("extra", [{}, {"strategies": "lora", "ema_decay": 0.9, "mixup": 0.4}])
def test_a_channels_last_fit_trains_the_same_model(extra):
    plain = _fit(_trained(**extra))
    converted = _fit(_trained(channels_last=True, **extra))
    assert converted.backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    for (name, expected), got in zip(plain.state_dict().items(), converted.state_dict().values(), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=name)


def test_detector_and_multitask_take_channels_last():
    tasks = {"shape": {"num_classes": 3}}
    multitask = MultiTaskClassifier(tasks, "test_resnet", pretrained=False, channels_last=True)
    detector = ObjectDetector(2, backbone="test_resnet", pretrained=False, image_size=64, channels_last=True)
    for model in (multitask, detector):
        (switches,) = model.configure_callbacks()
        switches.setup(None, model, "fit")
        assert model.backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(
        m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in detector.neck.modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
    )


# --------------------------------------------------------------------------- compile
def test_compiled_fit_equals_eager_and_keeps_plain_state_dict_keys(eager_backend, tmp_path):
    eager = _fit(_trained(strategies="lora"))
    compiled = _trained(strategies="lora", compile=True)
    trainer = make_trainer(max_epochs=1)
    pl.seed_everything(1)
    trainer.fit(compiled, _loader())
    assert isinstance(compiled.backbone._compiled_call_impl, speed._EagerFallback), "compiled, and not fallen back"
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in key for key in compiled.state_dict())
    for (name, expected), got in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=name)
    trainer.save_checkpoint(tmp_path / "compiled.ckpt")
    reloaded = ImageClassifier.from_checkpoint(tmp_path / "compiled.ckpt").eval()
    assert reloaded.hparams.compile is True
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IMAGES), eager.eval()(IMAGES), atol=1e-5, rtol=1e-5)


def _broken_backend(graph, example_inputs):
    raise RuntimeError("no C++ compiler found")


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    monkeypatch.setattr(speed, "COMPILE_BACKEND", _broken_backend)
    eager = _fit(_trained())
    model = _trained(compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model)
    fallbacks = [w for w in caught if issubclass(w.category, CompileFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in fallbacks]
    message = str(fallbacks[0].message)
    assert "no C++ compiler found" in message and "--model.compile false" in message
    assert model.backbone._compiled_call_impl is None  # eager from the failure on
    for (name, expected), got in zip(eager.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6, msg=name)


def test_a_real_error_of_the_model_is_raised_not_hidden(eager_backend):
    model = _classifier().eval()
    compile_forward(model.backbone)
    with pytest.raises(RuntimeError, match="channels"):
        model(torch.randn(1, 5, 32, 32))  # five channels into a three-channel stem fails eagerly too


def test_compiling_twice_and_copying_are_safe(eager_backend):
    import copy

    model = _classifier()
    assert compile_forward(model.backbone) and compile_forward(model.backbone)
    wrapper = model.backbone._compiled_call_impl
    assert compile_forward(model.backbone) and model.backbone._compiled_call_impl is wrapper
    copied = copy.deepcopy(model.backbone)  # a teacher copy (LwF) runs eagerly
    assert copied._compiled_call_impl is None
    torch.testing.assert_close(copied.eval()(IMAGES), model.backbone.eval()(IMAGES))


def test_use_channels_last_is_idempotent():
    model = _classifier().backbone
    use_channels_last(model)
    use_channels_last(model)
    assert len(model._forward_pre_hooks) == 1


@pytest.mark.slow
def test_inductor_compiles_on_cpu_with_equal_outputs():
    """The real compiler (about a minute on two CPU cores): same outputs, or the one fallback warning."""
    model = _classifier().eval()
    with torch.no_grad():
        expected = model(IMAGES)
        compile_forward(model.backbone)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = model(IMAGES)
    fell_back = [w for w in caught if issubclass(w.category, CompileFallbackWarning)]
    assert fell_back or isinstance(model.backbone._compiled_call_impl, speed._EagerFallback)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
