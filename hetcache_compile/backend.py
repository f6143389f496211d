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

from .budget import choose_cache_plan, cuda_devices, resolve_limit
from .compile_jobs import inner_compiler
from .piecewise import PieceCompiler
from .config import CACHE_DTYPES, HetCacheConfig, HetCacheOptionsError
from .families import family_of
from .instances import CompiledFrom, InstanceTable, instance_position
from .passes import RewriteRefused, Variants, analyze, build_variants, is_symbolic
from .passes.graph_utils import output_node
from .passes.errors import NoBlockStack, ShardingRefused
from .passes.shards import collective_name
from .runtime import LIVE_RUNTIMES, HetCacheRuntime
from .shapes import ShapeSpecializingRuntime

logger = logging.getLogger("hetcache_compile")

class FallbackRuntime:
    """A graph hetcache did not rewrite: the inner compiler's output, plus the reason why."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[object], reason: str, config: HetCacheConfig,
                 frame_id: int = 0, in_dynamo: bool = True, per_block: bool = False):
        self.fallback_reason = reason
        self.per_block = per_block  # called once per block of a model call: the model's calls are any block's
        self.report = f"rewrite refused: {reason}"
        self.frame_id = frame_id
        self.compiled_from = CompiledFrom(example_inputs)
        self.instance = instance_position(example_inputs)
        self.instances: InstanceTable[list[int]] = InstanceTable(lambda: [0])
        start = time.perf_counter()
        if in_dynamo:
            self.compiled = inner_compiler(config)(gm, list(example_inputs))
        else:
            compiler = PieceCompiler(config)
            self.compiled = compiler.prepare("fallback", gm, example_inputs)
            compiler.compile_now(self.compiled)
        self.compile_seconds = time.perf_counter() - start
        LIVE_RUNTIMES.add(self)

    def __call__(self, *args):
        self.instances.get(None if self.instance is None else args[self.instance])[0] += 1
        return self.compiled(*args)

    def serves(self, parameter_ids: set[int]) -> bool:
        return self.compiled_from.intersects(parameter_ids) or bool(self.instances.matching(parameter_ids))

    def calls(self, parameter_ids: set[int]) -> int:
        counts = [count[0] for count in self.instances.matching(parameter_ids)]
        return max(counts, default=0) if self.per_block else sum(counts)

    def reset(self, parameter_ids: set[int] | None = None) -> None:
        pass


REGIONAL_REASON = ("this graph holds no stack of repeated blocks, only part of the model (one block: diffusers' "
                   "compile_repeated_blocks() compiles each block as a graph of its own); hetcache needs the whole "
                   "model in one graph: compile it with torch.compile(model, backend=\"hetcache\") instead, which "
                   "compiles each repeated block once by itself")


class HetCacheBackend:
    """Dynamo backend entry point: ``backend(gm, example_inputs, options=None, mode=None)``.

    ``options`` are ``HetCacheConfig`` fields (plus ``preset``); ``mode`` is Inductor's mode for
    the variants. A bad option raises ``HetCacheOptionsError`` (a ``ValueError``) at the first
    call. ``torch._dynamo.reset()`` calls ``reset()``: the runtimes, their caches and statistics are
    dropped, and refusals are warned about again.
    """

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[object],
                 options: dict | None = None, mode: str | None = None) -> Callable:
        config = HetCacheConfig.from_options(options, mode)
        frame_id = _frame_id()
        if is_symbolic(example_inputs):
            def build(static_gm: fx.GraphModule, static_args: list) -> Callable:
                return self._rewrite(static_gm, static_args, config, frame_id, in_dynamo=False)
            return ShapeSpecializingRuntime(gm, example_inputs, config, build)
        return self._rewrite(gm, example_inputs, config, frame_id, in_dynamo=True)

    def reset(self) -> None:
        """Called by ``torch._dynamo.reset()``, which drops every compiled graph: their runtimes go too
        (at once, not whenever the garbage collector reaches their reference cycles)."""
        self._warned.clear()
        for runtime in list(LIVE_RUNTIMES):
            runtime.reset()
        LIVE_RUNTIMES.clear()

    def _rewrite(self, gm: fx.GraphModule, example_inputs: Sequence[object], config: HetCacheConfig, frame_id: int,
                 in_dynamo: bool) -> Callable:
        try:
            analysis = analyze(gm, example_inputs, family_of(gm).hints)
            _check_schedule(config, analysis)
            _check_cache_dtype(config, example_inputs)
            limit = resolve_limit(config.max_cache_bytes, example_inputs)

            def build(cache_dtype: str | None, recompute: bool) -> Variants:
                return build_variants(gm, analysis, example_inputs, relevance_site=config.relevance_site,
                                      partial=config.partial, prune=config.prune,
                                      cache_dtype=CACHE_DTYPES.get(cache_dtype), recompute=recompute,
                                      offload=config.cache_device == "cpu")

            num_outputs = len(output_node(gm.graph).args[0])
            variants, plan = choose_cache_plan(build, example_inputs, num_outputs, config, limit)
        except NoBlockStack:
            return self._fallback(gm, example_inputs, family_of(gm).why(REGIONAL_REASON), config, frame_id, in_dynamo,
                                  per_block=True)
        except RewriteRefused as refused:
            reason = family_of(gm).why(str(refused))
            if not isinstance(refused, ShardingRefused) and any(collective_name(n) for n in gm.graph.nodes):
                reason += ("; under context parallelism pass cp_plan=hetcache_compile.cp_plan(model) to "
                           "enable_parallelism, so that each rank's model traces as one graph")
            return self._fallback(gm, example_inputs, reason, config, frame_id, in_dynamo)
        logger.info("hetcache rewrote a graph of %d nodes:\n%s%s", len(gm.graph.nodes), analysis.report(),
                    f"\n{plan.describe()}" if plan is not None else "")
        return HetCacheRuntime(gm, example_inputs, analysis, variants, config, frame_id=frame_id, plan=plan)

    def _fallback(self, gm: fx.GraphModule, example_inputs: Sequence[object], reason: str,
                  config: HetCacheConfig, frame_id: int, in_dynamo: bool, per_block: bool = False) -> FallbackRuntime:
        if reason not in self._warned and _is_rank_zero():
            self._warned.add(reason)
            warnings.warn(f"hetcache: not rewriting this graph ({reason}); compiling it with plain "
                          f"{config.inner_backend}", stacklevel=4)
        logger.info("hetcache fallback: %s", reason)
        return FallbackRuntime(gm, example_inputs, reason, config, frame_id, in_dynamo, per_block)


def _check_schedule(config: HetCacheConfig, analysis) -> None:
    """Refuse schedules the graph cannot serve: reuse needs runs of steps, adaptive needs the modulation."""
    if config.schedule == "adaptive" and analysis.modulation is None:
        raise RewriteRefused("no timestep-modulation tensor found for the adaptive schedule; "
                             "pass options={'schedule': 'FFRF...'} for a fixed schedule")
    skips = config.schedule == "adaptive" or any(letter in config.schedule for letter in "PR")
    if skips and analysis.timestep_input is None:
        raise RewriteRefused("no timestep input found (a numeric input of at most 2 dims feeding a sinusoidal "
                             "embedding), so calls cannot be told apart as steps of one denoising run and nothing "
                             "may be reused between them")


def _is_rank_zero() -> bool:
    """Whether this process should warn: always, unless it is not the first of a distributed run."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def _frame_id() -> int:
    """Dynamo's id of the frame being compiled. Graph breaks split a model over several frames; the
    lowest id among a model's graphs is its forward's entry, whose calls are the model's calls."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    return compile_id.frame_id if compile_id is not None and compile_id.frame_id is not None else 0


hetcache_backend = HetCacheBackend()


__all__ = ["FallbackRuntime", "hetcache_backend"]


def _check_cache_dtype(config: HetCacheConfig, example_inputs: Sequence[object]) -> None:
    """float8 caches compile to float8 conversions, which CUDA GPUs before compute capability 8.9 lack."""
    if config.cache_dtype != "float8_e4m3fn":
        return
    for device in cuda_devices(example_inputs):
        if torch.cuda.get_device_capability(device) < (8, 9):
            raise HetCacheOptionsError(
                f"hetcache: cache_dtype='float8_e4m3fn' needs a GPU of compute capability 8.9 or newer; "
                f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}: "
                "use cache_dtype='bfloat16'")
