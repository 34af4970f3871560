"""Deprecated alias of :mod:`cvft.detection.adapter_files` (detector adapter files), kept for one release.

Import from :mod:`cvft.detection.adapter_files` instead; importing this module warns once with a
:class:`DeprecationWarning`.
"""

import warnings

from cvft.detection.adapter_files import *  # noqa: F403
from cvft.detection.adapter_files import __all__  # noqa: F401

warnings.warn(
    "cvft.detection.adapter is deprecated and will be removed in the next release; import from "
    "cvft.detection.adapter_files instead.",
    DeprecationWarning,
    stacklevel=2,
)
