import pytest
import timm
import torch
from torch import nn


@pytest.fixture(scope="session")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False).eval()


@pytest.fixture(scope="session")
def image() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)
