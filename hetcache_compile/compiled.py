"""``CompiledVariant``: a variant graph compiled by the inner backend lazily, once per shape.

Variants are compiled at their first call, after Dynamo's compile has returned. A graph that reads
a scalar with ``.item()`` (Dynamo reads float attributes such as LoRA scales that way) is compiled
under a tracing context of its own: a static-shape fake mode whose shape environment allows it.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch._guards import TracingContext, tracing

from .config import HetCacheConfig
from .passes.graph_utils import copy_graph_module, forget_unbacked_bindings, reads_scalars, static_fake_mode

logger = logging.getLogger("hetcache_compile")

DUMP_ENV = "HETCACHE_DUMP_GRAPHS"


class CompiledVariant:
    """A variant graph compiled by the inner backend on first use, once per input shape, timed.

    ``specialize_on`` is the position of the input whose shape may change between videos (the
    partial variant's index, of length ``|S|``); each new shape compiles once more, at most
    ``max_shapes`` kept.
    """

    def __init__(self, name: str, gm: fx.GraphModule, config: HetCacheConfig, specialize_on: int | None = None,
                 max_shapes: int = 4):
        self.name = name
        self.gm = gm
        self.config = config
        self.inner_backend = config.inner_backend
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
        compiled = compile_graph(copy_graph_module(self.gm), args, self.config)
        seconds = time.perf_counter() - start
        self.compile_seconds += seconds
        self.compile_count += 1
        logger.info("compiled %s variant with %s in %.1f s", self.name, self.inner_backend, seconds)
        return compiled


def compile_graph(gm: fx.GraphModule, args: Sequence[object], config: HetCacheConfig) -> Callable:
    """Compile ``gm`` (which the compiler may mutate: pass a copy) for ``args``, outside Dynamo's compile."""
    if not reads_scalars(gm):
        return inner_compiler(config)(gm, list(args))
    with tracing(TracingContext(static_fake_mode())):
        return inner_compiler(config)(forget_unbacked_bindings(gm), list(args))


def inner_compiler(config: HetCacheConfig) -> Callable:
    """The compiler for variants: ``config.inner_backend``, with Inductor's mode and config patches."""
    if config.inner_backend != "inductor":
        return torch._dynamo.lookup_backend(config.inner_backend)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = {**list_mode_options(config.mode), **dict(config.inductor_options or {})}
    return lambda gm, args: compile_fx(gm, args, config_patches=patches)


def _maybe_dump(name: str, gm: fx.GraphModule) -> None:
    folder = os.environ.get(DUMP_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}_{id(gm):x}.py")
        with open(path, "w") as handle:
            handle.write(gm.code)
        logger.info("wrote %s variant to %s", name, path)
