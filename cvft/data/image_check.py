"""Checking that every image of a data set decodes before training starts: in worker processes, remembered on disk.

A full decode (:func:`~cvft.data.io.check_image` with ``full=True``; JPEG at 1/8 scale, which still reads the whole
file) catches truncated and corrupt files that a header check passes. Results are cached per file by
``(size, modification time)`` in a JSON file under cvft's cache folder (``$CVFT_CACHE``, else
``$XDG_CACHE_HOME/cvft``, see :func:`cvft.backbones.sources.cache_dir`), so checking the same folder again costs
one ``stat`` per image. The decoding runs in forked worker processes: Pillow's decoders hold the GIL, and warnings
the decoders raise are silenced there without touching this process's warning filters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import PIL

from cvft.atomic import write_json_atomic
from cvft.backbones.sources import cache_dir as cvft_cache_dir
from cvft.data.io import check_image
from cvft.errors import DatasetError, ImageLoadError

__all__ = ["find_unreadable_images"]

_logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1
_POOL_MIN_FILES = 64  # fewer files are checked in this process: forking would cost more than it saves
_MAX_WORKERS = 8


def find_unreadable_images(
    paths: Sequence[str | Path], full: bool = True, cache_dir: str | Path | None = None, cache: bool = True
) -> dict[Path, str]:
    """Check image files and return the unreadable ones with the reason, in the order given.

    Args:
        paths: Image files (duplicates are checked once).
        full: Decode every image (catches truncation); ``False``: Pillow's cheap header ``verify()`` only.
        cache_dir: Cache folder (default: cvft's, ``$CVFT_CACHE``); only full checks are cached.
        cache: Read and write the cache. Files whose size or modification time changed are checked again.

    Returns:
        ``{path: message}`` for each file that cannot be read; the message names the file and the fix.

    Raises:
        DatasetError: A worker process died (a decoder crashed or memory ran out) before all files were checked.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> folder = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (8, 8)).save(folder / "good.jpg")
        >>> _ = (folder / "bad.jpg").write_bytes((folder / "good.jpg").read_bytes()[:200])
        >>> sorted(p.name for p in find_unreadable_images([folder / "good.jpg", folder / "bad.jpg"], cache=False))
        ['bad.jpg']
    """
    unique = [Path(p) for p in dict.fromkeys(os.fspath(p) for p in paths)]
    if not unique:
        return {}
    use_cache = cache and full
    store = _ResultCache(unique, cache_dir) if use_cache else None
    known = store.known() if store is not None else {}
    todo = [path for path in unique if path not in known]
    results = dict(known)
    results.update(zip(todo, _check_all(todo, full), strict=True))
    if store is not None and todo:
        store.save(results)
    return {path: results[path] for path in unique if results[path] is not None}


def _check_one(path: str, full: bool) -> str | None:
    try:
        check_image(path, full=full)
    except ImageLoadError as error:
        return str(error)
    except Exception as error:  # check_image wraps decoder errors; anything else still means an unusable file
        return f"{path} cannot be checked ({type(error).__name__}: {error}). Re-export it or delete it."
    return None


def _quiet_worker() -> None:
    """Initialiser of the checking processes: decoder warnings (bad EXIF ...) are expected here, and muted."""
    warnings.simplefilter("ignore")


def _check_all(paths: list[Path], full: bool) -> list[str | None]:
    names = [os.fspath(p) for p in paths]
    workers = min(os.cpu_count() or 1, _MAX_WORKERS, math.ceil(len(names) / _POOL_MIN_FILES))
    fork = "fork" in multiprocessing.get_all_start_methods() and sys.platform.startswith("linux")
    if workers < 2 or not fork:  # spawned workers would re-import torch: slower than checking here
        return [_check_one(name, full) for name in names]
    chunk = max(1, min(256, len(names) // (4 * workers)))
    context = multiprocessing.get_context("fork")
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_quiet_worker) as pool:
            return list(pool.map(_check_one, names, [full] * len(names), chunksize=chunk))
    except BrokenProcessPool as error:
        folder = os.path.commonpath(names) if len(names) > 1 else names[0]
        raise DatasetError(
            f"A process checking the images under {folder} died (a decoder crashed on a corrupt file, or memory ran "
            "out). Run with check_images='header' (cheap header check only) or find the file with "
            "cvft.data.io.check_image(path, full=True)."
        ) from error


class _ResultCache:
    """Check results of one set of files, stored as JSON beside other sets' in the cache folder."""

    def __init__(self, paths: list[Path], cache_dir: str | Path | None) -> None:
        absolute = [os.path.abspath(p) for p in paths]
        self.absolute = dict(zip(paths, absolute, strict=True))
        root = os.path.commonpath(absolute) if len(absolute) > 1 else os.path.dirname(absolute[0])
        digest = hashlib.sha256(root.encode("utf-8", "surrogateescape")).hexdigest()[:20]
        self.file = Path(cache_dir or cvft_cache_dir()) / "image_checks" / f"{digest}.json"
        self.root = root
        self.entries = self._load()
        self.stats: dict[Path, list[int] | None] = {path: _stat(path) for path in paths}

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        current = data.get("format") == _CACHE_FORMAT and data.get("pillow") == PIL.__version__
        files = data.get("files") if isinstance(data, dict) and current and data.get("root") == self.root else None
        return files if isinstance(files, dict) else {}

    def known(self) -> dict[Path, str | None]:
        """Cached results of the files whose size and modification time are unchanged."""
        found: dict[Path, str | None] = {}
        for path, stat in self.stats.items():
            entry = self.entries.get(self.absolute[path])
            valid = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], (str, type(None)))
            if stat is not None and valid and entry[:2] == stat:
                found[path] = entry[2]
        return found

    def save(self, results: dict[Path, str | None]) -> None:
        """Write the results atomically (temporary file, then ``os.replace``); a read-only cache is skipped."""
        for path, result in results.items():
            stat = self.stats.get(path)
            if stat is not None:
                self.entries[self.absolute[path]] = [*stat, result]
        data = {"format": _CACHE_FORMAT, "pillow": PIL.__version__, "root": self.root, "files": self.entries}
        try:
            write_json_atomic(self.file, data, indent=None)
        except OSError as error:
            _logger.debug("Cannot write the image check cache %s: %s", self.file, error)


def _stat(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]
