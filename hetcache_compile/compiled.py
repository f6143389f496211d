"""``CompiledVariant``: a variant graph compiled by the inner backend lazily, once per shape."""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx

from .passes.graph_utils import copy_graph_module

logger = logging.getLogger("hetcache_compile")

DUMP_ENV = "HETCACHE_DUMP_GRAPHS"


class CompiledVariant:
    """A variant graph compiled by the inner backend on first use, once per input shape, timed.

    ``specialize_on`` is the position of the input whose shape may change between videos (the
    partial variant's index, of length ``|S|``); each new shape compiles once more, at most
    ``max_shapes`` kept.
    """

    def __init__(self, name: str, gm: fx.GraphModule, inner_backend: str, specialize_on: int | None = None,
                 max_shapes: int = 4):
        self.name = name
        self.gm = gm
        self.inner_backend = inner_backend
        self.specialize_on = specialize_on
        self.max_shapes = max_shapes
        self.compiled: OrderedDict[tuple, Callable] = OrderedDict()
        self.compile_seconds = 0.0
        self.compile_count = 0

    def __call__(self, *args):
        key = tuple(args[self.specialize_on].shape) if self.specialize_on is not None else ()
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self._compile(args)
            self.compiled[key] = compiled
            if len(self.compiled) > self.max_shapes:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(key)
        return compiled(*args)

    def _compile(self, args: Sequence[object]) -> Callable:
        _maybe_dump(self.name, self.gm)
        start = time.perf_counter()
        compiler = torch._dynamo.lookup_backend(self.inner_backend)
        # Inductor takes ownership of the graph it is given and may mutate it.
        compiled = compiler(copy_graph_module(self.gm), list(args))
        seconds = time.perf_counter() - start
        self.compile_seconds += seconds
        self.compile_count += 1
        logger.info("compiled %s variant with %s in %.1f s", self.name, self.inner_backend, seconds)
        return compiled


def _maybe_dump(name: str, gm: fx.GraphModule) -> None:
    folder = os.environ.get(DUMP_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}_{id(gm):x}.py")
        with open(path, "w") as handle:
            handle.write(gm.code)
        logger.info("wrote %s variant to %s", name, path)
