"""``cvft export``: a trained classifier as a plain timm model (no cvft needed to load it), and optionally ONNX.

Every low-rank update, sparse or row delta and SSF affine is folded into the weights it modifies and the wrappers are
removed, so the written state dict has exactly the keys of ``timm.create_model(backbone, num_classes=...)`` and runs
at the plain model's speed. A model grown by ``block_expansion`` is a deeper model of the same timm family: its state
dict loads into ``timm.create_model(backbone, num_classes=..., **timm_kwargs)``, with the depth arguments
(``depth``, ``layers`` or ``depths``) recorded in the file's ``timm_kwargs`` metadata. Methods that add computation
(bottleneck adapters, prompts, prefixes, side modules) cannot become a plain timm model: for them export ONNX only
(``--onnx`` without ``--output``) or share the adapter file::

    cvft export --ckpt runs/cvft/version_0/checkpoints/best.ckpt --output model.safetensors --onnx model.onnx
    cvft export --adapter adapter.safetensors --weights base.safetensors --output model.safetensors
    cvft export --ckpt best.ckpt --output model-int8.safetensors --quantize int8-weight-only --val-root data/val

``--quantize int8-weight-only|int8-dynamic`` writes int8 weights plus per-channel scales in safetensors (no pickle;
see :mod:`cvft.export_quantized`) and prints the file size and the CPU latency against float32; with ``--val-root``
(a folder of class folders) also the accuracy of the int8 model against float32.

Loading the result without cvft::

    model = timm.create_model("vit_small_patch16_224", num_classes=10)
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))
    # after block_expansion: timm.create_model(..., **json.loads(metadata["timm_kwargs"])), e.g. depth=8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
from torch import nn

from cvft.backbones.weights import write_safetensors_atomic
from cvft.errors import CvftError
from cvft.strategies.block_expansion import inserted_block_names, timm_depth_kwargs
from cvft.strategies.merge import fold_all, unfoldable_modules
from cvft.tasks import ImageClassifier
from cvft.tasks.schedules import timm_kwargs

__all__ = ["export_classifier", "export_onnx", "main"]


def export_classifier(model: ImageClassifier, output: str | Path) -> Path:
    """Merge ``model``'s updates into a plain timm backbone (in place) and write its state dict to ``output``.

    The safetensors metadata records the timm name, the class names and, for a model calibrated by temperature
    scaling, its ``temperature`` (divide the plain model's logits by it to get the calibrated probabilities). A model
    expanded by ``block_expansion`` also records ``timm_kwargs`` (the new depth, e.g. ``{"depth": 8}``: pass them to
    ``timm.create_model``) and ``expanded_blocks`` (module names of the inserted blocks).

    Example:
        >>> import tempfile, timm
        >>> from safetensors.torch import load_file
        >>> classifier = ImageClassifier("test_resnet", pretrained=False, num_classes=2, strategies=["lora"])
        >>> path = export_classifier(classifier, tempfile.mkdtemp() + "/model.safetensors")
        >>> _ = timm.create_model("test_resnet", num_classes=2).load_state_dict(load_file(path))
    """
    backbone = fold_all(model.backbone)
    hp = model.hparams
    kwargs = timm_kwargs(hp.get("backbone_kwargs"), hp.get("drop_path_rate"), hp.get("drop_rate"))
    depth_kwargs = timm_depth_kwargs(backbone)  # a deeper model of the same family after block_expansion
    kwargs.update(depth_kwargs)
    with torch.device("meta"):
        plain = timm.create_model(
            hp.backbone, pretrained=False, num_classes=model.num_classes, in_chans=hp.in_chans, **kwargs
        )
    extra = unfoldable_modules(backbone, plain.state_dict())
    if extra:
        methods = [s["name"] for s in hp.strategies]
        raise CvftError(
            f"The fine-tuned model cannot be written as a plain timm {hp.backbone} state dict: its strategies "
            f"{methods} add tensors a plain model lacks ({', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}). "
            "Export ONNX instead (cvft export --onnx model.onnx, without --output), or ship the adapter file."
        )
    metadata = {
        "format": "timm-state-dict",
        "backbone": model.hparams.backbone,
        "num_classes": str(model.num_classes),
        "class_names": json.dumps(model.class_names),
    }
    temperature = float(getattr(model, "temperature", 1.0))
    if temperature != 1.0:
        metadata["temperature"] = repr(temperature)
    if depth_kwargs:
        metadata["timm_kwargs"] = json.dumps(depth_kwargs)
        metadata["expanded_blocks"] = json.dumps(inserted_block_names(backbone))
    return write_safetensors_atomic(backbone.state_dict(), output, metadata, hint="Choose a writable output path.")


def export_onnx(backbone: nn.Module, output: str | Path, image_size: int, in_chans: int = 3) -> Path:
    """Write ``backbone`` as ONNX with a dynamic batch axis (needs the ``onnx`` package: ``cvft[onnx]``)."""
    try:
        import onnx  # noqa: F401 - torch's exporter needs it
    except ImportError as err:
        raise CvftError("ONNX export needs the onnx package: pip install 'cvft[onnx]'.") from err
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(1, in_chans, image_size, image_size)
    torch.onnx.export(
        backbone.eval(),
        (example,),
        str(output),
        dynamo=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    return output


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cvft export``."""
    parser = argparse.ArgumentParser(prog="cvft export", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="Lightning checkpoint written by `cvft fit`")
    source.add_argument("--adapter", help="adapter .safetensors written by `cvft fit` (needs the base weights)")
    parser.add_argument("--weights", help="base weights file or built-in source, for --adapter")
    parser.add_argument("--pretrained", action="store_true", help="base weights from the hub, for --adapter")
    parser.add_argument("--output", help="output .safetensors state dict (plain timm keys)")
    parser.add_argument("--onnx", help="also write this ONNX file")
    parser.add_argument("--image-size", type=int, help="ONNX input size (default: the backbone's pretrained size)")
    parser.add_argument(
        "--quantize",
        choices=["int8-weight-only", "int8-dynamic"],
        help="write --output with int8 weights (torchao, cvft[qlora]) and report size and CPU latency vs float32",
    )
    parser.add_argument(
        "--val-root",
        help="with --quantize: a folder of class folders (named like the model's classes) to report accuracy on",
    )
    args = parser.parse_args(argv)
    if args.val_root and not args.quantize:
        parser.error("--val-root reports the accuracy of a --quantize export; add --quantize")
    if args.quantize and not args.output:
        parser.error("--quantize needs --output (the int8 .safetensors file)")
    if not (args.output or args.onnx):
        parser.error("give --output (a plain timm state dict), --onnx, or both")

    if args.ckpt:
        model = ImageClassifier.from_checkpoint(args.ckpt)
    else:
        model = ImageClassifier.from_adapter(args.adapter, pretrained=args.pretrained, weights=args.weights)
    model.eval()
    if args.output and args.quantize:
        from cvft.export_quantized import export_quantized, folder_batches

        backbone = fold_all(model.backbone)
        metadata = {"backbone": model.hparams.backbone, "num_classes": str(model.num_classes),
                    "class_names": json.dumps(model.class_names)}  # fmt: skip
        validation = folder_batches(args.val_root, backbone, list(model.class_names)) if args.val_root else None
        print(export_quantized(backbone, args.output, args.quantize, metadata, validation=validation).summary())
    elif args.output:
        path = export_classifier(model, args.output)
        depth = timm_depth_kwargs(model.backbone)
        rebuild = f", create it with {', '.join(f'{k}={v}' for k, v in depth.items())}" if depth else ""
        print(f"wrote {path} (timm {model.hparams.backbone}, {model.num_classes} classes{rebuild})")
    if args.onnx:
        fold_all(model.backbone)
        size = args.image_size or model.backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        onnx_path = export_onnx(model.backbone, args.onnx, size, model.hparams.in_chans)
        print(f"wrote {onnx_path}")
    return 0
