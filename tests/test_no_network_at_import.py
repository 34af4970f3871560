"""Importing cvft (and the libraries it imports) opens no network connection."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    opened = []

    def audit(event, args):
        if event in ("socket.connect", "socket.getaddrinfo", "urllib.Request"):
            opened.append((event, repr(args)[:120]))

    sys.addaudithook(audit)
    import cvft.cli, cvft.data, cvft.data.medical, cvft.data.detection  # albumentations, timm, lightning ...
    import albumentations
    print(opened)
    """
)


def test_importing_cvft_asks_no_server_for_anything():
    """Albumentations checked PyPI for updates on import (up to 2 s offline) unless NO_ALBUMENTATIONS_UPDATE is set."""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
