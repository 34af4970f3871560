"""Visual explanations: Grad-CAM (CNNs and ViTs), attention rollout (ViTs) and overlays written as PNGs.

Example:
    >>> import timm, torch
    >>> from cvft.medical.explain import grad_cam
    >>> grad_cam(timm.create_model("test_resnet", pretrained=False), torch.randn(1, 3, 32, 32)).shape
    torch.Size([1, 32, 32])
"""

from cvft.medical.explain.gradcam import default_cam_layer, grad_cam, is_vit
from cvft.medical.explain.images import METHODS, Preprocessing, explain_images, explain_tensor
from cvft.medical.explain.overlay import overlay
from cvft.medical.explain.rollout import attention_maps, attention_rollout, rollout

__all__ = [
    "METHODS",
    "Preprocessing",
    "attention_maps",
    "attention_rollout",
    "default_cam_layer",
    "explain_images",
    "explain_tensor",
    "grad_cam",
    "is_vit",
    "overlay",
    "rollout",
]
