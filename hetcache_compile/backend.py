"""The ``hetcache`` torch.compile backend (registered through the ``torch_dynamo_backends`` entry point).

``torch.compile(model, backend="hetcache", options={...})`` calls ``hetcache_backend`` with the
Dynamo graph. It parses the options, runs the passes, and returns a ``HetCacheRuntime`` that
dispatches between the compiled variants. When the analysis refuses the graph it warns once,
with the reason, and returns the graph compiled by the inner compiler unchanged.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx

from .config import HetCacheConfig
from .passes import RewriteRefused, analyze, build_variants
from .runtime import LIVE_RUNTIMES, HetCacheRuntime

logger = logging.getLogger("hetcache_compile")

class FallbackRuntime:
    """A graph hetcache did not rewrite: the inner compiler's output, plus the reason why."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[object], reason: str, inner_backend: str):
        self.fallback_reason = reason
        self.report = f"rewrite refused: {reason}"
        self.parameter_ids = frozenset(id(x) for x in example_inputs if isinstance(x, torch.nn.Parameter))
        start = time.perf_counter()
        self.compiled = torch._dynamo.lookup_backend(inner_backend)(gm, list(example_inputs))
        self.compile_seconds = time.perf_counter() - start
        self.calls = 0
        LIVE_RUNTIMES.add(self)

    def __call__(self, *args):
        self.calls += 1
        return self.compiled(*args)

    def reset(self) -> None:
        pass


class HetCacheBackend:
    """Dynamo backend entry point: ``backend(gm, example_inputs, options=None)``.

    ``options`` are ``HetCacheConfig`` fields (plus ``preset``). ``torch._dynamo.reset()`` calls
    ``reset()``, after which refusals are warned about again.
    """

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[object],
                 options: dict | None = None) -> Callable:
        config = HetCacheConfig.from_options(options)
        try:
            analysis = analyze(gm, example_inputs)
            if config.schedule == "adaptive" and analysis.modulation is None:
                raise RewriteRefused("no timestep-modulation tensor found for the adaptive schedule; "
                                     "pass options={'schedule': 'FFRF...'} for a fixed schedule")
            variants = build_variants(gm, analysis, example_inputs, relevance_site=config.relevance_site,
                                      partial=config.partial, prune=config.prune)
        except RewriteRefused as refused:
            return self._fallback(gm, example_inputs, str(refused), config)
        logger.info("hetcache rewrote a graph of %d nodes:\n%s", len(gm.graph.nodes), analysis.report())
        return HetCacheRuntime(gm, example_inputs, analysis, variants, config)

    def reset(self) -> None:
        self._warned.clear()

    def _fallback(self, gm: fx.GraphModule, example_inputs: Sequence[object], reason: str,
                  config: HetCacheConfig) -> FallbackRuntime:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"hetcache: not rewriting this graph ({reason}); compiling it with plain "
                          f"{config.inner_backend}", stacklevel=3)
        logger.info("hetcache fallback: %s", reason)
        return FallbackRuntime(gm, example_inputs, reason, config.inner_backend)


hetcache_backend = HetCacheBackend()


__all__ = ["FallbackRuntime", "hetcache_backend"]
