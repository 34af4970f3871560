"""Every ``Example:`` in cvft's docstrings runs (the docs must not drift from the code)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import cvft

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(cvft.__path__, prefix="cvft.") if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CVFT_CACHE", str(tmp_path / "cache"))
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"
