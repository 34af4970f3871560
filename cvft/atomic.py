"""Writing outputs atomically: into a temporary file beside the target, then renamed over it.

Every file cvft writes (checkpoints, adapters, metrics, predictions, reports, pictures, caches) goes through
:func:`atomic_path`, so a reader, a crash or a ``kill -9`` sees either the previous file or the complete new one,
never half of one; the temporary file stays in the target's folder (never the system temp dir) and is removed when
the write fails; and the result gets the permissions any new file gets (``0o666`` minus the umask).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_text_atomic", "write_json_atomic", "read_json", "json_safe", "default_file_mode"]


def default_file_mode() -> int:
    """The mode ``open()`` gives new files: ``0o666`` minus the process umask (``mkstemp`` alone gives ``0o600``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike[str], fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block succeeds.

    Args:
        path: The file to (re)place. Its folder is created.
        fsync: Flush the file to disk before the rename (checkpoints, caches that must survive a power cut).

    Yields:
        The temporary file's path (``.<name>.<random>.tmp`` in the same folder); write the whole content to it.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "out" / "a.txt"
        >>> with atomic_path(target) as partial:
        ...     _ = partial.write_text("complete")
        >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
        ('complete', ['a.txt'])
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    partial = Path(name)
    try:
        yield partial
        if fsync:
            with open(partial, "rb") as written:
                os.fsync(written.fileno())
        os.chmod(partial, default_file_mode())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path.

    Example:
        >>> import tempfile
        >>> write_text_atomic(tempfile.mkdtemp() + "/a.txt", "hello").read_text()
        'hello'
    """
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return Path(path)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` (strict JSON has no NaN), tuples as lists, recursively.

    Example:
        >>> json_safe({"auroc": float("nan"), "acc": (1.0, 0.5)})
        {'auroc': None, 'acc': [1.0, 0.5]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def write_json_atomic(path: str | os.PathLike[str], data: Any, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (see :func:`json_safe`) atomically and return the path."""
    return write_text_atomic(path, json.dumps(json_safe(data), indent=indent) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON in ``path``; ``None`` when the file is missing or not valid JSON.

    Example:
        >>> read_json("no/such/file.json") is None
        True
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
