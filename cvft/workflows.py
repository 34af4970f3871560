"""Workflows of several runs: fits chained by what one run hands the next, built from tasks and export.

:func:`linear_probe_after_contrastive` is the second half of the SupCon paper's recipe (``supcon`` with
``mode="alone"``, :mod:`cvft.strategies.contrastive`): fold the contrastively fine-tuned backbone into plain weights,
then train a linear probe on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cvft.export import export_classifier
from cvft.tasks import ImageClassifier

__all__ = ["linear_probe_after_contrastive"]


def linear_probe_after_contrastive(
    stage1: ImageClassifier | str | Path, weights_path: str | Path, **classifier_kwargs: Any
) -> ImageClassifier:
    """Second stage of "contrastive fine-tuning, then linear probe": a linear-probe classifier on stage 1's backbone.

    Stage 1 is an :class:`~cvft.tasks.ImageClassifier` trained with ``mode="alone"`` (e.g. strategies
    ``["full", {"name": "supcon", "mode": "alone"}]`` or ``["lora", {"name": "supcon", "mode": "alone"}]``). Its
    backbone is folded into a plain timm model (LoRA merged, projection head dropped), written to ``weights_path``
    (safetensors) and loaded as the weights of a new classifier with ``strategies=["linear_probe"]``. The same in
    two CLI runs::

        cvft fit --config configs/supcon.yaml --model.strategies '[full, {name: supcon, mode: alone}]'
        cvft export --ckpt runs/.../last.ckpt --output stage1.safetensors
        cvft fit --config configs/supcon.yaml --model.strategies '[linear_probe]' --model.weights stage1.safetensors

    Args:
        stage1: The trained stage-1 classifier, or the path of its Lightning checkpoint.
        weights_path: Where to write the stage-1 backbone (``.safetensors``).
        **classifier_kwargs: Overrides for the new classifier (``lr``, ``num_classes``, ``strategies`` ...).

    Returns:
        A fresh classifier, backbone frozen to stage 1's weights, head trainable (the probe). A classifier given as
        ``stage1`` is folded in place (its projection head removed) on the way.

    Note:
        Pass stage 1's *last* checkpoint: with ``mode="alone"`` its head never trained, so "best by validation
        accuracy" means nothing. The ``.ckpt`` itself cannot be given as ``weights=`` to the probe directly: it holds
        the projection head (and any LoRA factors), which a plain backbone refuses as unexpected keys.

    Example:
        >>> import tempfile
        >>> stage1 = ImageClassifier("test_resnet", pretrained=False, num_classes=3,
        ...                          strategies=["full", {"name": "supcon", "mode": "alone"}])
        >>> probe = linear_probe_after_contrastive(stage1, tempfile.mkdtemp() + "/stage1.safetensors")
        >>> [n for n, p in probe.named_parameters() if p.requires_grad]
        ['backbone.fc.weight', 'backbone.fc.bias']
    """
    if not isinstance(stage1, ImageClassifier):
        stage1 = ImageClassifier.from_checkpoint(stage1)
    hp = stage1.hparams
    path = export_classifier(stage1, weights_path)
    kwargs: dict[str, Any] = {
        "backbone": hp.backbone,
        "pretrained": False,
        "weights": str(path),
        "num_classes": stage1.num_classes,
        "class_names": stage1.class_names,
        "in_chans": hp.in_chans,
        "backbone_kwargs": hp.get("backbone_kwargs"),
        "strategies": ["linear_probe"],
    }
    return ImageClassifier(**{**kwargs, **classifier_kwargs})
