"""The batch-size finder (cvft.tuning.batch_size): the largest size that trains, with out-of-memory emulated on CPU."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from tuning_kit import build, make_data, state, trainer_for, unchanged

from cvft.errors import ConfigError, CvftError
from cvft.tuning import BatchSizeFinderOptions, find_batch_size

pytestmark = pytest.mark.usefixtures("one_thread")


def run_out_of_memory_above(model, limit):
    """Make ``model`` fail as CUDA does when a batch holds more than ``limit`` images."""
    forward = model.forward

    def limited(images):
        if len(images) > limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(images)

    model.forward = limited


@pytest.mark.parametrize(("mode", "limit", "expected", "trained"), [
    ("power", 8, 8, [2, 4, 8]),  # 16 fails: the largest power of two that fits
    ("power", 11, 8, [2, 4, 8]),
    ("binsearch", 12, 12, [2, 4, 8, 12]),  # 16 fails, 12 fits, 14 and 13 fail
])  # fmt: skip
def test_the_largest_batch_that_fits_is_chosen(mode, limit, expected, trained, image_root, tmp_path):
    model, data = build(0.01), make_data(image_root)  # 18 training images
    run_out_of_memory_above(model, limit)
    before = state(model)
    options = BatchSizeFinderOptions(init_val=2, max_batch_size=64, steps_per_trial=1, margin=0.0)
    result = find_batch_size(trainer_for(tmp_path, epochs=1), model, data, mode, options)
    assert result.batch_size == data.batch_size == data.hparams.batch_size == expected
    assert list(dict.fromkeys(result.trained)) == trained
    assert unchanged(before, model)


def test_on_cpu_the_search_stops_at_the_cap_after_training_at_it(image_root, tmp_path):
    model, data = build(0.01), make_data(image_root)
    result = find_batch_size(trainer_for(tmp_path), model, data, "power", BatchSizeFinderOptions(max_batch_size=8))
    assert result.batch_size == 8 and result.trained[-1] == 8  # Lightning alone stops at its cap untried


def test_a_fit_after_the_finder_is_the_plain_fit_at_the_size_found(image_root, tmp_path):
    mixing = {"strategies": "lora", "mixup": 0.4, "cutmix": 1.0}
    pl.seed_everything(0, workers=True)
    tuned, data = build(0.01, **mixing), make_data(image_root)
    trainer = trainer_for(tmp_path / "tuned")
    options = BatchSizeFinderOptions(init_val=2, max_batch_size=8, steps_per_trial=2)
    assert find_batch_size(trainer, tuned, data, "power", options).batch_size == 8
    trainer.fit(tuned, datamodule=data)

    pl.seed_everything(0, workers=True)
    plain, plain_data = build(0.01, **mixing), make_data(image_root)
    plain_data.batch_size = 8
    trainer_for(tmp_path / "plain").fit(plain, datamodule=plain_data)
    assert unchanged(state(plain), tuned)


def test_an_odd_size_becomes_even_for_mixup(image_root, tmp_path):
    model, data = build(0.01, mixup=0.4), make_data(image_root)
    run_out_of_memory_above(model, 10)  # 11 trains too: Mixup trains on the first 10 of an odd batch
    options = BatchSizeFinderOptions(init_val=2, max_batch_size=64, steps_per_trial=1, margin=0.0)
    result = find_batch_size(trainer_for(tmp_path, epochs=1), model, data, "binsearch", options)
    assert result.batch_size == 10 and "even" in result.note


def test_several_devices_and_bad_options_are_refused(image_root, tmp_path):
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, default_root_dir=tmp_path)
    with pytest.raises(CvftError, match="one device"):
        find_batch_size(trainer, build(0.01), make_data(image_root))
    with pytest.raises(ConfigError, match="init_val"):
        BatchSizeFinderOptions(init_val=16, max_batch_size=8)
