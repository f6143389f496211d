"""The examples in the package's docstrings run."""

import doctest
import importlib

import pytest

MODULES = ["hetcache_compile.config", "hetcache_compile.schedule", "hetcache_compile.priors", "hetcache_compile.api",
           "hetcache_compile.instances", "hetcache_compile.passes.specialize", "hetcache_compile.passes.cache_codec",
           "hetcache_compile.memory", "hetcache_compile.passes.variant_io", "hetcache_compile.families",
           "hetcache_compile.passes.hints", "hetcache_compile.parallel", "hetcache_compile.sharding"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), raise_on_error=False)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0


def test_passes_load_once_as_the_subpackage_the_install_maps():
    import subprocess
    import sys

    check = ("import sys, hetcache_compile.backend as backend, hetcache_compile.passes as passes; "
             "assert passes.__name__ == 'hetcache_compile.passes'; assert 'passes' not in sys.modules; "
             "assert backend.RewriteRefused is passes.RewriteRefused")
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)
