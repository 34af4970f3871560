"""Grad-CAM (Selvaraju et al. 2017) for timm CNNs and ViTs.

``cam = ReLU(sum_k alpha_k A^k)`` with ``alpha_k`` the spatial mean of ``d score / d A^k`` over a feature map ``A``
(channels ``k``); the map is upsampled to the input size (bilinear) and min-max normalised to ``[0, 1]`` per image.
CNNs use their last feature stage (timm's ``feature_info[-1]["module"]``); ViTs use the output tokens of the last
block, without the class / register tokens, laid out on the patch grid.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from cvft.errors import CvftError

__all__ = ["default_cam_layer", "grad_cam", "is_vit", "normalise_maps", "patch_grid", "timm_model"]


def timm_model(model: nn.Module) -> nn.Module:
    """The timm network inside ``model``: an ImageClassifier's ``backbone``, else ``model`` itself.

    Example:
        >>> import timm
        >>> net = timm.create_model("test_resnet", pretrained=False)
        >>> timm_model(net) is net
        True
    """
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else model


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` (or its backbone) is a timm vision transformer: patch embedding plus attention blocks.

    Example:
        >>> import timm
        >>> is_vit(timm.create_model("test_vit", pretrained=False)), is_vit(timm.create_model("test_resnet"))
        (True, False)
    """
    net = timm_model(model)
    return hasattr(net, "patch_embed") and isinstance(getattr(net, "blocks", None), nn.Sequential | nn.ModuleList)


def default_cam_layer(model: nn.Module) -> nn.Module:
    """The module whose output Grad-CAM explains: a ViT's last block, else a CNN's last feature stage.

    Example:
        >>> import timm
        >>> net = timm.create_model("test_resnet", pretrained=False)
        >>> default_cam_layer(net) is net.layer4
        True
    """
    net = timm_model(model)
    if is_vit(net):
        return net.blocks[-1]
    info = getattr(net, "feature_info", None)
    if isinstance(info, list) and info and "module" in info[-1]:
        name = info[-1]["module"]
    elif info is not None and hasattr(info, "module_name"):
        name = info.module_name()[-1]
    else:
        raise CvftError(
            f"{type(net).__name__} has no timm feature_info, so Grad-CAM cannot find its last feature stage; pass "
            "layer=<module or dotted module name> (a convolutional stage near the output)."
        )
    return net.get_submodule(name)


def grad_cam(
    model: nn.Module,
    images: Tensor,
    target_class: int | Tensor | None = None,
    layer: nn.Module | str | None = None,
) -> Tensor:
    """Class activation maps of ``images`` for ``target_class`` (default: the predicted class).

    The model runs in eval mode (restored afterwards); only the explained activations get gradients, so frozen or
    merged models work and no parameter gradient is touched.

    Args:
        model: An :class:`~cvft.tasks.ImageClassifier` or a timm model returning logits ``(B, classes)``.
        images: Normalised input batch ``(B, C, H, W)``.
        target_class: Class to explain: one index for all images, one per image, or ``None`` for the argmax.
        layer: Module (or its dotted name in the timm model) whose output is explained; default
            :func:`default_cam_layer`. Outputs ``(B, C, h, w)`` are feature maps, ``(B, N, C)`` are tokens.

    Returns:
        ``(B, H, W)`` maps in ``[0, 1]``.

    Example:
        >>> import timm
        >>> net = timm.create_model("test_resnet", pretrained=False, num_classes=2)
        >>> grad_cam(net, torch.randn(2, 3, 64, 64), target_class=1).shape
        torch.Size([2, 64, 64])
    """
    net = timm_model(model)
    if layer is None:
        layer = default_cam_layer(net)
    elif isinstance(layer, str):
        layer = net.get_submodule(layer)
    captured: dict[str, Tensor] = {}

    def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured["activation"] = output[0] if isinstance(output, tuple | list) else output

    handle = layer.register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            inputs = images.detach().clone().requires_grad_(True)  # gradients reach the layer even if all is frozen
            logits = model(inputs)
            classes = _classes(target_class, logits)
            score = logits.gather(1, classes[:, None]).sum()
            if "activation" not in captured:
                raise CvftError(f"The Grad-CAM layer {type(layer).__name__} did not run in the forward pass.")
            gradient = torch.autograd.grad(score, captured["activation"])[0]
    finally:
        handle.remove()
        model.train(was_training)
    activation = _as_map(net, captured["activation"].detach(), images.shape[-2:])
    gradient = _as_map(net, gradient, images.shape[-2:])
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(1, keepdim=True))
    return normalise_maps(nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False))


def normalise_maps(maps: Tensor) -> Tensor:
    """Min-max normalise each ``(1, H, W)`` or ``(H, W)`` map of a batch to ``[0, 1]`` (constant maps become 0).

    Example:
        >>> normalise_maps(torch.tensor([[[[1.0, 3.0]]]]))
        tensor([[[0., 1.]]])
    """
    maps = maps.reshape(maps.shape[0], *maps.shape[-2:]).float()
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))


def _classes(target_class: int | Tensor | None, logits: Tensor) -> Tensor:
    if target_class is None:
        return logits.argmax(1)
    classes = torch.as_tensor(target_class, device=logits.device).long().reshape(-1).expand(len(logits))
    if int(classes.max()) >= logits.shape[1] or int(classes.min()) < 0:
        raise CvftError(f"target_class {target_class} is outside the model's {logits.shape[1]} classes.")
    return classes


def _as_map(net: nn.Module, activation: Tensor, input_size: torch.Size) -> Tensor:
    """Feature maps stay ``(B, C, h, w)``; tokens ``(B, N, C)`` drop their prefix tokens and go on the patch grid."""
    if activation.ndim == 4:
        return activation.float()
    if activation.ndim != 3:
        raise CvftError(f"Grad-CAM needs (B, C, h, w) feature maps or (B, N, C) tokens, got {tuple(activation.shape)}.")
    tokens = activation[:, getattr(net, "num_prefix_tokens", 0) :].float()
    height, width = patch_grid(net, input_size, tokens.shape[1])
    return tokens.transpose(1, 2).reshape(len(tokens), -1, height, width)


def patch_grid(net: nn.Module, input_size: torch.Size | tuple[int, int], patches: int) -> tuple[int, int]:
    """``(rows, columns)`` of ``patches`` tokens for an input of ``input_size`` (patch size from ``patch_embed``).

    Example:
        >>> import timm
        >>> patch_grid(timm.create_model("test_vit", pretrained=False), (64, 32), 8)
        (4, 2)
    """
    patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
    if patch is not None:
        height, width = input_size[0] // patch[0], input_size[1] // patch[1]
        if height * width == patches:
            return height, width
    side = math.isqrt(patches)
    if side * side != patches:
        raise CvftError(f"Cannot lay {patches} tokens out on a patch grid for an input of {tuple(input_size)}.")
    return side, side
