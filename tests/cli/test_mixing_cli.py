"""``cvft fit --model.mixup ... --model.cutmix ...``: the options reach ImageClassifier from the command line, a run
trains with them, and a refused set-up exits with code 2 naming the fix."""

from __future__ import annotations

import pytest
from cli_kit import cvft_args

from cvft.cli import CvftCLI, main
from cvft.data import ImageFolderDataModule
from cvft.tasks import ImageClassifier


def test_cli_passes_the_mix_options_to_the_classifier(shapes_folder, resnet_weights, tmp_path):
    args = cvft_args("fit", shapes_folder, resnet_weights, tmp_path, "--model.mixup", "0.2", "--model.cutmix", "1.0")
    cli = CvftCLI(ImageClassifier, ImageFolderDataModule, run=False, args=[*args[1:], "--model.mix_off_epoch=3"])
    mixer = cli.model.mixer
    assert mixer is not None and mixer.off_epoch == 3
    assert (mixer.mixup.mixup_alpha, mixer.mixup.cutmix_alpha, mixer.mixup.mix_prob) == (0.2, 1.0, 1.0)
    assert (cli.model.hparams.mixup, cli.model.hparams.cutmix) == (0.2, 1.0)


def test_cvft_fit_with_mixup_and_cutmix_on_lora(shapes_folder, resnet_weights, tmp_path):
    extra = ("--model.strategies=lora", "--model.mixup=0.2", "--model.cutmix=1.0", "--model.label_smoothing=0.1")
    main(cvft_args("fit", shapes_folder, resnet_weights, tmp_path, *extra))
    assert (tmp_path / "cvft" / "version_0" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--model.mixup=0.2", "--model.loss=focal"), "loss='cross_entropy'"),
        (("--model.mixup=0.2", "--data.batch_size=7"), "--data.batch_size such as 8"),
        (("--model.cutmix=-1",), "--model.cutmix"),
    ],
)
def test_refused_mix_set_ups_exit_with_code_2(extra, expected, shapes_folder, resnet_weights, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(cvft_args("fit", shapes_folder, resnet_weights, tmp_path, *extra))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert expected in err and "Traceback" not in err
