import pytest
import timm
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CVFT_CACHE", str(tmp_path / "cvft-cache"))


@pytest.fixture(scope="session")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False).eval()


@pytest.fixture(scope="session")
def image() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)
