"""Deprecated alias of :mod:`cvft.adapter_files` (adapter files), kept for one release.

Import from :mod:`cvft.adapter_files` instead; importing this module warns once with a :class:`DeprecationWarning`.
"""

import warnings

from cvft.adapter_files import *  # noqa: F403
from cvft.adapter_files import __all__  # noqa: F401

warnings.warn(
    "cvft.adapters is deprecated and will be removed in the next release; import from cvft.adapter_files instead.",
    DeprecationWarning,
    stacklevel=2,
)
