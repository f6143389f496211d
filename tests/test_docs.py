"""The examples in the package's docstrings run."""

import doctest
import importlib

import pytest

MODULES = ["hetcache_compile.config", "hetcache_compile.schedule", "hetcache_compile.priors", "hetcache_compile.api",
           "hetcache_compile.instances", "hetcache_compile.passes.specialize"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), raise_on_error=False)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
