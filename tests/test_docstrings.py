"""The examples in the package's docstrings run (those marked ``+SKIP`` need a cluster)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import insitu

MODULES = sorted(m.name for m in pkgutil.walk_packages(insitu.__path__, "insitu."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (output above)"
