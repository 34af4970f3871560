"""A shared backbone with one classifier head per task, for task-incremental continual learning.

In the *task-incremental* (multi-head) setting of Learning without Forgetting (Li & Hoiem, 2016), every task keeps
its own head on top of one shared backbone, and the task identity is known at test time: an image of task ``j`` is
classified by head ``j``. Forgetting is then the damage that training later tasks does to the *shared* features.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cvft.backbones.layer_groups import head_parameter_names

__all__ = ["MultiHeadNet", "is_multi_head", "active_head_parameter_names"]


class MultiHeadNet(nn.Module):
    """A headless timm backbone (``num_classes=0``) with one linear head per task.

    ``forward`` classifies with the head of :attr:`active_task`, so code written for a single-head model (the
    EWC Fisher pass, evaluation) works unchanged; :meth:`get_classifier` returns *all* heads, as timm does for
    models with several heads, so cvft's ``head_parameter_names`` finds them.

    Args:
        backbone: A timm model whose forward returns pooled features (built with ``num_classes=0``); parameter
            strategies (``lora``, ``linear_probe``) are set up on it.
        num_classes: Classes of each task, in task order.

    Example:
        >>> import timm, torch
        >>> net = MultiHeadNet(timm.create_model("test_resnet", num_classes=0), [3, 5])
        >>> net.active_task = 1
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 5])
        >>> sorted(active_head_parameter_names(net))
        ['heads.1.bias', 'heads.1.weight']
    """

    def __init__(self, backbone: nn.Module, num_classes: Sequence[int]) -> None:
        super().__init__()
        width = getattr(backbone, "num_features", None)
        if not isinstance(width, int) or width < 1:
            raise ValueError("MultiHeadNet needs a timm backbone (with `num_features`), built with num_classes=0.")
        self.backbone = backbone
        self.heads = nn.ModuleList(nn.Linear(width, int(n)) for n in num_classes)
        #: Index of the task whose head ``forward`` uses.
        self.active_task = 0

    def forward_features(self, images: Tensor) -> Tensor:
        """Pooled features of the shared backbone, ``(B, num_features)``."""
        return self.backbone(images)

    def forward(self, images: Tensor) -> Tensor:
        """Logits of the active task's head."""
        return self.heads[self.active_task](self.forward_features(images))

    def get_classifier(self) -> tuple[nn.Module, ...]:
        """All task heads (timm's convention for several heads)."""
        return tuple(self.heads)


def is_multi_head(model: nn.Module) -> bool:
    """Whether ``model`` is a :class:`MultiHeadNet`."""
    return isinstance(model, MultiHeadNet)


def active_head_parameter_names(model: nn.Module) -> set[str]:
    """Parameters of the head now being trained: the active task's head, or a timm model's classifier."""
    if is_multi_head(model):
        prefix = f"heads.{model.active_task}."
        return {name for name, _ in model.named_parameters() if name.startswith(prefix)}
    return head_parameter_names(model)
