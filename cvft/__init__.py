"""cvft: transfer learning for computer vision on timm backbones and Lightning."""

__version__ = "0.1.0"
