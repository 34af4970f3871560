"""cvft: transfer learning for computer vision on timm backbones and Lightning."""

import os as _os

# Albumentations asks PyPI for a newer version at import time: a network request (up to 2 s offline) on every run.
# cvft never downloads at run time; a user who wants the check sets NO_ALBUMENTATIONS_UPDATE=0 themselves.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
