"""Checking images before training: warning state, truncation, the result cache, skipping, worker errors."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch import nn
from torch.utils.data import DataLoader

from cvft.data.dataset import ImageDataset
from cvft.data.image_folder import ImageFolderDataModule
from cvft.data.io import load_image
from cvft.data.samples import Sample
from cvft.errors import DatasetError, ImageLoadError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own check cache, never the user's ~/.cache/cvft."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CVFT_CACHE", str(folder))
    return folder


def _jpeg_folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (48, 40)) -> Path:
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:04d}.jpg", quality=90)
    return root


def _truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _module(root: Path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(root, **{"image_size": 16, "batch_size": 4, "num_workers": 0, **kwargs})


def _warning_is_shown(message: str) -> bool:
    """Whether ``warnings.warn(message)`` gets past the process's current filters (which are left as they are)."""
    with warnings.catch_warnings(record=True) as caught:  # records, keeping the filters in place
        warnings.warn(message, UserWarning, stacklevel=1)
    return any(message in str(w.message) for w in caught)


@pytest.mark.parametrize("check_images", ["header", "full"])
def test_folder_check_leaves_the_warning_filters_alone(tmp_path, check_images):
    root = _jpeg_folder(tmp_path / "images", {"a": 100, "b": 100}, size=(16, 16))
    before = list(warnings.filters)
    for _ in range(3):  # the old thread pool left "ignore" behind in most, not all, runs
        assert _module(root, check_images=check_images, val_fraction=0.0).num_classes == 2
    assert warnings.filters == before
    assert _warning_is_shown(f"still shown after check_images={check_images}")


@pytest.mark.parametrize("reader", ["load_image", "read_raster_values"])
def test_readers_in_threads_leave_the_warning_filters_alone(tmp_path, reader):
    from concurrent.futures import ThreadPoolExecutor

    from cvft.data.medical.raster import read_raster_values

    read = {"load_image": load_image, "read_raster_values": read_raster_values}[reader]
    paths = []
    for i in range(16):
        paths.append(tmp_path / f"{i}.bmp")  # .bmp: read_raster_values decodes it with Pillow
        Image.new("RGB", (8, 8), (i, i, i)).save(paths[-1])
    before = list(warnings.filters)
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(image.shape[:2] == (8, 8) for image in pool.map(read, paths * 25))
    assert warnings.filters == before
    assert _warning_is_shown(f"still shown after {reader} in threads")


def test_loading_never_writes_pillows_global_truncation_flag(tmp_path, monkeypatch):
    """Writing ImageFile.LOAD_TRUNCATED_IMAGES from threads races; cvft reads it and never sets it."""
    import cvft.data.io as io_module

    writes: list[object] = []

    class _WatchedImageFile:
        def __getattr__(self, name: str) -> object:
            return getattr(ImageFile, name)

        def __setattr__(self, name: str, value: object) -> None:
            writes.append((name, value))

    monkeypatch.setattr(io_module, "ImageFile", _WatchedImageFile())
    good = _jpeg_folder(tmp_path, {"a": 1}) / "a" / "0000.jpg"
    assert load_image(good).shape == (40, 48, 3)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(_truncate(good))
    assert writes == []


def test_truncated_jpeg_fails_the_default_check_before_training(tmp_path):
    root = _jpeg_folder(tmp_path / "images", {"cat": 4, "dog": 4})
    _truncate(root / "dog" / "0002.jpg")
    with pytest.raises(ImageLoadError) as info:
        _ = _module(root).num_classes  # default check_images
    assert "0002.jpg" in str(info.value) and "truncated" in str(info.value)


def test_second_check_of_a_folder_is_served_from_the_cache(tmp_path, monkeypatch, _private_cache):
    import cvft.data.image_check as image_check

    root = _jpeg_folder(tmp_path / "images", {"a": 5, "b": 5})
    bad = _truncate(root / "b" / "0001.jpg")
    paths = sorted(root.rglob("*.jpg"))
    first = image_check.find_unreadable_images(paths)
    assert list(first) == [bad]
    cache_files = list((_private_cache / "image_checks").glob("*.json"))
    assert len(cache_files) == 1 and not list(cache_files[0].parent.glob("*.tmp"))
    assert len(json.loads(cache_files[0].read_text())["files"]) == 10  # plain JSON, one entry per file

    decoded: list[str] = []
    monkeypatch.setattr(image_check, "_check_one", lambda path, full: decoded.append(path))
    assert image_check.find_unreadable_images(paths) == first  # bad files are remembered too
    assert decoded == []

    _jpeg_folder(tmp_path / "fixed", {"b": 2})
    bad.write_bytes((tmp_path / "fixed" / "b" / "0001.jpg").read_bytes())  # re-exported: new size / mtime
    assert image_check.find_unreadable_images(paths) == {}
    assert decoded == [str(bad)]


def test_a_corrupt_cache_file_is_ignored(tmp_path, _private_cache):
    from cvft.data.image_check import find_unreadable_images

    root = _jpeg_folder(tmp_path / "images", {"a": 3})
    paths = sorted(root.rglob("*.jpg"))
    find_unreadable_images(paths)
    (cache_file,) = (_private_cache / "image_checks").glob("*.json")
    cache_file.write_text("{not json")
    _truncate(paths[0])
    assert list(find_unreadable_images(paths)) == [paths[0]]


def test_check_in_worker_processes_matches_the_check_in_process(tmp_path, monkeypatch):
    import cvft.data.image_check as image_check

    root = _jpeg_folder(tmp_path / "images", {"a": 70, "b": 70}, size=(16, 16))
    bad = [_truncate(root / "a" / "0003.jpg"), _truncate(root / "b" / "0069.jpg")]
    (root / "b" / "0010.jpg").write_bytes(b"not a jpeg")
    bad.append(root / "b" / "0010.jpg")
    paths = sorted(root.rglob("*.jpg"))
    pooled = image_check.find_unreadable_images(paths, cache=False)
    monkeypatch.setattr(image_check, "_POOL_MIN_FILES", 10**9)
    assert image_check.find_unreadable_images(paths, cache=False) == pooled
    assert sorted(pooled) == sorted(bad)


def test_on_bad_image_skip_leaves_bad_files_out_and_says_how_many(tmp_path, caplog):
    root = _jpeg_folder(tmp_path / "images", {"cat": 6, "dog": 6})
    bad = [_truncate(root / "cat" / "0001.jpg"), root / "dog" / "0004.jpg"]
    bad[1].write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="cvft"):
        data = _module(root, on_bad_image="skip", val_fraction=0.25)
        paths = {s.path for split in ("train", "val") for s in data.samples(split)}
    assert len(paths) == 10 and not paths & set(bad)
    assert sorted(data.skipped_images) == sorted(bad)
    assert all(path.name in reason for path, reason in data.skipped_images.items())
    assert "Skipping 2 of 12 image(s)" in caplog.text
    with pytest.raises(ImageLoadError, match="on_bad_image='skip'"):
        _ = _module(root).num_classes  # the default still refuses


def test_training_report_writes_skipped_images_txt(tmp_path):
    from cvft.callbacks import TrainingReport

    root = _jpeg_folder(tmp_path / "images", {"cat": 4, "dog": 4})
    bad = _truncate(root / "cat" / "0002.jpg")
    data = _module(root, on_bad_image="skip", val_fraction=0.0, augment="none")

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3 * 16 * 16, 2)

        def training_step(self, batch, batch_idx):
            images, targets = batch
            return nn.functional.cross_entropy(self.head(images.flatten(1)), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path / "run", callbacks=[TrainingReport(curves=False)],
    )  # fmt: skip
    trainer.fit(Tiny(), datamodule=data)
    lines = (tmp_path / "run" / "skipped_images.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{bad}\t") and "truncated" in lines[0]


def test_error_in_a_dataloader_worker_arrives_as_one_clean_image_load_error(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    loader = DataLoader(ImageDataset([Sample(bad, 0)]), num_workers=1)
    with pytest.raises(ImageLoadError) as info:
        next(iter(loader))
    message = str(info.value)
    assert message.startswith(f"{bad} is not an image Pillow can read")
    assert "Traceback" not in message and "worker" not in message and "\n" not in message


def test_cli_reports_a_worker_decoding_failure_as_a_cvft_error(tmp_path, capsys):
    from cvft.cli import main

    root = _jpeg_folder(tmp_path / "images", {"cat": 4, "dog": 4}, size=(32, 32))
    bad = _truncate(root / "dog" / "0003.jpg", keep=0.3)
    args = [
        "fit", f"--data.root={root}", "--data.check_images=none", "--data.num_workers=1", "--data.val_fraction=0",
        "--data.batch_size=8", "--data.image_size=32", "--model.backbone=test_resnet", "--model.pretrained=false",
        "--trainer.max_epochs=1", "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path / 'runs'}",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    line = next(line for line in error.splitlines() if line.startswith("cvft: error:"))
    assert str(bad) in line and "truncated" in line
    assert "Traceback" not in error and "Original" not in error


def test_a_single_class_folder_is_refused_naming_the_root_and_class(tmp_path):
    root = _jpeg_folder(tmp_path / "images", {"only_cats": 4})
    with pytest.raises(DatasetError) as info:
        _ = _module(root).num_classes
    message = str(info.value)
    assert str(root) in message and "'only_cats'" in message and "at least 2 classes" in message


def test_multi_label_with_one_class_is_allowed(tmp_path):
    root = _jpeg_folder(tmp_path / "images", {"x": 4})
    rows = ["path,label"] + [f"x/{i:04d}.jpg,cat" for i in range(4)]
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    data = _module(root, csv=str(tmp_path / "labels.csv"), multi_label=True, val_fraction=0.0)
    assert data.class_names == ["cat"]
