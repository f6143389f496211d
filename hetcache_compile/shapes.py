"""Graphs Dynamo traced with dynamic shapes: rewritten once per concrete input shape.

With ``torch.compile``'s default ``dynamic=None`` a second resolution makes Dynamo recompile the
model with symbolic shapes (``dynamic=True`` does so from the start). hetcache's variants and
caches are specialized to a token count, so ``ShapeSpecializingRuntime`` specializes the dynamic
graph to each concrete shape it is called with (``passes.specialize_shapes``) and rewrites that
static graph as usual: every resolution runs full, partial and reuse steps, each shape keeps its
own state, and an output never depends on which shapes ran before. At most ``max_shapes`` are
kept; the least recently used one's variants and caches are dropped beyond it. Scalars Dynamo
made inputs of the dynamic graph (norm epsilons, LoRA scales) are specialized too: a new LoRA
scale is a new specialization.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx

from .config import HetCacheConfig
from .instances import InstanceTable
from .passes import specialization_key, specialize_shapes
from .runtime import LIVE_RUNTIMES

logger = logging.getLogger("hetcache_compile")


class ShapeSpecializingRuntime:
    """Dispatches each call to the runtime built for its concrete shapes, building it on first use.

    ``build(static_gm, static_args)`` returns the runtime of one shape (rewritten or fallback).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[object], config: HetCacheConfig,
                 build: Callable[[fx.GraphModule, list], Callable]):
        self.gm = gm
        self.config = config
        self.build = build
        self.key_positions = [i for i, x in enumerate(example_inputs) if not isinstance(x, torch.nn.Parameter)]
        self.specialized: OrderedDict[tuple, tuple[Callable, tuple[int, ...]]] = OrderedDict()
        self.specializations = 0
        self.retired: RetiredStats | None = None

    def __call__(self, *args):
        key = specialization_key([args[i] for i in self.key_positions])
        entry = self.specialized.get(key)
        if entry is None:
            entry = self._specialize(key, args)
        self.specialized.move_to_end(key)
        runtime, kept = entry
        return runtime(*[args[i] for i in kept])

    def runtimes(self) -> list[Callable]:
        return [runtime for runtime, _ in self.specialized.values()]

    def reset(self) -> None:
        for runtime in self.runtimes():
            runtime.reset()

    def _specialize(self, key: tuple, args: Sequence[object]) -> tuple[Callable, tuple[int, ...]]:
        static_gm, static_args, kept = specialize_shapes(self.gm, args)
        runtime = self.build(static_gm, static_args)
        self.specializations += 1
        logger.info("hetcache: specialized a dynamic-shape graph to input shapes %s (%d kept)",
                    [k for k in key if isinstance(k, tuple) and len(k) >= 3 and k[0] != "0-d"],
                    len(self.specialized) + 1)
        self.specialized[key] = (runtime, kept)
        if len(self.specialized) > self.config.max_shapes:
            _, (evicted, _) = self.specialized.popitem(last=False)
            evicted.reset()
            if self.retired is None:
                self.retired = RetiredStats(evicted.frame_id)
            self.retired.absorb(evicted)
            LIVE_RUNTIMES.discard(evicted)
            logger.info("hetcache: dropped the variants of the least recently used shape (max_shapes=%d)",
                        self.config.max_shapes)
        return runtime, kept


class RetiredStats:
    """What ``stats()`` still reports about shape specializations dropped by ``max_shapes``: their
    model calls and branch statistics, per model instance (their variants and caches are gone)."""

    fallback_reason = None
    report = "shape specializations dropped by max_shapes (statistics only)"

    def __init__(self, frame_id: int):
        self.frame_id = frame_id
        self.instances: InstanceTable[list] = InstanceTable(lambda: [0, []])  # [calls, branch stats]
        LIVE_RUNTIMES.add(self)

    def absorb(self, runtime) -> None:
        for key, value in runtime.instances.items():
            record = self.instances.get(key)
            if isinstance(value, list):  # a fallback runtime counts calls only
                record[0] += value[0]
            else:
                record[0] += value.calls
                record[1].extend(value.branches.stats())

    def serves(self, parameter_ids: set[int]) -> bool:
        return bool(self.instances.matching(parameter_ids))

    def calls(self, parameter_ids: set[int]) -> int:
        return sum(record[0] for record in self.instances.matching(parameter_ids))

    def branch_stats(self, parameter_ids: set[int]) -> list:
        return [s for record in self.instances.matching(parameter_ids) for s in record[1]]

    def variants(self) -> list:
        return []

    def reset(self, parameter_ids: set[int] | None = None) -> None:
        pass
