"""The runtime: the callable the backend hands back to Dynamo for a rewritten graph.

Per call it (1) finds the model instance and its CFG branch, (2) starts a new run when the
timestep went up or a conditioning input changed, (3) runs the probe and asks the branch's
scheduler for the step kind, (4) calls that variant inside a ``hetcache::<kind>`` profiler range,
and (5) keeps what computed steps produce for the steps after them. All step state lives here,
never in the compiled graphs, so no value of it can cause a recompilation. The pieces it uses
each do one job: ``InputLayout`` (where the inputs are), ``InstanceTable`` (state per model),
``BranchTable`` (CFG branches), ``MaskSource`` (the edit mask), ``CacheBudget`` (memory).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .branches import BranchState, BranchTable
from .budget import CacheBudget, CachePlan
from .compiled import CompiledVariant
from .piecewise import PieceCompiler, SymbolicSizes, TensorSpec
from .config import HetCacheConfig
from .families import family_of
from .fingerprint import FingerprintCache
from .instances import CompiledFrom, InstanceTable
from .layout import InputLayout
from .masks import MaskSource
from .passes import GraphAnalysis, StepOutputs, Variants, partial_arguments, partial_sizes
from .passes.graph_utils import placeholders
from .passes.offload import wait_for_host_copies
from .priors import TokenClasses
from .schedule import StepKind, make_scheduler
from .selection import budget_size, complement, relevance, select_tokens
from .sharding import RankGroup, local_rows, select_shard_tokens, shard_size
from .stats import BranchStats

logger = logging.getLogger("hetcache_compile")

# Runtimes alive now, so that ``stats(model)`` & co. can find a model's runtimes. Filled when a
# graph is compiled, never at import time; entries vanish with Dynamo's cache.
LIVE_RUNTIMES: weakref.WeakSet = weakref.WeakSet()


@dataclass
class InstanceState:
    """What one model instance keeps for one compiled graph: its branches and what was said."""

    branches: BranchTable
    calls: int = 0
    said: set[str] = field(default_factory=set)
    fingerprint: FingerprintCache = field(default_factory=FingerprintCache)

    def say_once(self, message: str) -> None:
        if message not in self.said:
            self.said.add(message)
            logger.warning("hetcache: %s", message)


class HetCacheRuntime:
    """Dispatches each call of one Dynamo graph to its full, partial or reuse variant.

    Not thread-safe: one denoising loop at a time per model, as in diffusers pipelines.
    """

    fallback_reason: str | None = None

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[object], analysis: GraphAnalysis,
                 variants: Variants, config: HetCacheConfig, frame_id: int = 0, plan: CachePlan | None = None):
        self.config = config
        self.analysis = analysis
        self.frame_id = frame_id  # Dynamo's frame: the lowest among a model's graphs counts model calls
        self.family = family_of(gm)
        self.layout = InputLayout.of(gm, example_inputs, analysis, self.family)
        self.compiled_from = CompiledFrom(example_inputs)
        self.compiler = PieceCompiler(config, stacks=tuple(stack for stack, _ in analysis.region.stacks))
        background = config.compiles_in_background
        self.full = CompiledVariant("full", variants.full, self.compiler, background=background)
        self.record = (CompiledVariant("record", variants.record, self.compiler, background=background)
                       if variants.record is not None else None)
        self.reuse = CompiledVariant("reuse", variants.reuse, self.compiler, background=background)
        self.partial = None
        if variants.partial is not None:
            added = [n.name for n in placeholders(variants.partial.graph)][len(example_inputs):]
            dims = {len(example_inputs) + position: dims for position, dims in partial_sizes(added).items()}
            ulysses = analysis.shards is not None and analysis.shards.scheme != "ring"
            sizes = SymbolicSizes(dims, per_selected=analysis.shards.world if ulysses else 1)
            self.partial = CompiledVariant("partial", variants.partial, self.compiler,
                                           symbolic=sizes if config.compiles_symbolic_sizes else None,
                                           static_sizes=sizes.dims, background=background,
                                           max_shapes=config.max_shapes)
        self.partial_note = self.family.why(variants.partial_refused) if variants.partial_refused else None
        self.recompute = variants.recompute
        self.offload = variants.offload
        self.num_caches = len(variants.cached_sites) * variants.caches_per_site
        self.plan = plan
        limit = plan.limit if plan is not None else None
        self.budget = CacheBudget(limit, plan.bytes_per_branch if limit is not None else 0)
        self.masks = (MaskSource(self.layout, analysis.token_grid, config.margin_radius, self.family)
                      if self.partial else None)
        self.relevance_site = variants.relevance_site
        self.grid = analysis.token_grid
        self.probe = variants.probe
        self.instances: InstanceTable[InstanceState] = InstanceTable(self._new_instance)
        self.ranks = RankGroup.of(analysis.shards) if analysis.shards is not None else None
        LIVE_RUNTIMES.add(self)

    @property
    def report(self) -> str:
        carrier = self.family.mask_input.input_name if self.layout.control is not None else None
        lines = [f"model family: {self.family.name} (edit mask: "
                 f"{f'set_mask, else the inputs ({carrier!r})' if carrier else 'set_mask only'})",
                 self.analysis.report(), f"variants: {', '.join(v.name for v in self.variants())}"]
        if self.partial is not None:
            lines.append(f"  partial: {self.num_caches} per-site caches, relevance at "
                         f"{self.relevance_site.module}, prune={self.config.prune}")
            if self.plan is not None:
                lines.append(f"  {self.plan.describe()}")
        else:
            lines.append(f"  no partial variant: {self.partial_note}")
        where = "in a background thread" if self.config.compiles_in_background else "at their first call"
        lines.append(f"compilation ({self.config.inner_backend}, {where}, "
                     f"{'block by block' if self.config.piecewise else 'whole graphs'}):")
        lines += [f"  {variant.describe()}" for variant in self.variants()]
        return "\n".join(lines)

    # -- public surface used by api.py ------------------------------------------------------
    def variants(self) -> list[CompiledVariant]:
        return [v for v in (self.full, self.record, self.partial, self.reuse) if v is not None]

    def serves(self, parameter_ids: set[int]) -> bool:
        """Whether this graph was compiled from, or has run for, the model owning ``parameter_ids``."""
        return self.compiled_from.intersects(parameter_ids) or bool(self.instances.matching(parameter_ids))

    def branch_stats(self, parameter_ids: set[int]) -> list[BranchStats]:
        return [s for inst in self.instances.matching(parameter_ids) for s in inst.branches.stats()]

    def calls(self, parameter_ids: set[int]) -> int:
        return sum(inst.calls for inst in self.instances.matching(parameter_ids))

    def finish_compiling(self) -> None:
        """Wait for the compile worker, then load what it compiled; what it failed to compile is compiled here
        (and its reasons logged)."""
        self.compiler.wait()
        for error in self.compiler.errors():
            logger.info("hetcache: the compile worker failed %s; compiled in this process instead", error)

    def reset(self, parameter_ids: set[int] | None = None) -> None:
        """Forget the caches of the model owning ``parameter_ids``; with None every model's, and the graph is being
        dropped (``torch._dynamo.reset()``): its background compilation stops after the piece in progress."""
        if parameter_ids is None:
            self.compiler.cancel()
        found = self.instances.values() if parameter_ids is None else self.instances.matching(parameter_ids)
        for instance in found:
            instance.branches.drop_all("reset")

    # -- the call path ------------------------------------------------------------------------
    def __call__(self, *args):
        instance = self.instances.get(self.layout.instance_key(args))
        instance.calls += 1
        timestep = self.layout.timestep_value(args)
        state = instance.branches.lookup(self.layout.branch_key(args, instance.fingerprint), timestep,
                                         taken=lambda: self._names_in_this_step(args, timestep))
        self._maybe_start_new_run(instance, state, args, timestep)
        modulation = self._run_probe(args) if self.config.schedule == "adaptive" else None
        kind = self._feasible(state, state.scheduler.next_kind(modulation))
        if self.ranks is not None:
            kind = self.ranks.agree(kind, self.layout.device(args), self._tokens_a_rank(state, kind))
        try:
            with torch.profiler.record_function(f"hetcache::{kind.value}"):
                if kind is StepKind.REUSE:
                    outputs = self.reuse(*args, state.reuse_residual())
                elif kind is StepKind.PARTIAL:
                    outputs = self._partial_step(state, args)
                else:
                    outputs = self._full_step(instance, state, args)
        except BaseException:
            state.reset()  # a step interrupted half-way leaves no half-updated cache behind
            raise
        state.stats.record(kind.value)
        logger.debug("branch %s call %d: %s", state.stats.name, state.scheduler.calls, kind.value)
        return tuple(outputs)

    def _tokens_a_rank(self, state: BranchState, kind: StepKind) -> int:
        """The tokens a rank computes in this partial step (0 for other kinds), as every rank must."""
        if kind is not StepKind.PARTIAL:
            return 0
        if state.selection is not None:
            return state.selection.numel()
        cfg = self.config
        return shard_size(state.classes, self.ranks.world, cfg.context_ratio, cfg.margin_ratio, cfg.size_buckets)

    def _new_instance(self) -> InstanceState:
        def make_branch(name: str) -> BranchState:
            return BranchState(scheduler=make_scheduler(self.config), stats=BranchStats(name),
                               reuse_order=self.config.reuse_order, caches_on_host=self.offload)
        return InstanceState(branches=BranchTable(self.config.max_branches, make_branch))

    def _feasible(self, state: BranchState, kind: StepKind) -> StepKind:
        if kind is StepKind.REUSE and state.residual is None:
            return StepKind.FULL
        if kind is StepKind.PARTIAL and (state.exit is None or (state.selection is None
                                                                 and state.pending_selection is None)):
            return StepKind.FULL
        return kind

    def _records(self, instance: InstanceState, state: BranchState) -> bool:
        """Whether full steps must record caches: only when partial steps can follow and the caches fit."""
        may_be_partial = self.config.schedule == "adaptive" or "P" in self.config.schedule
        if self.record is None or state.classes is None or not may_be_partial:
            return False
        others = (s.stats.cache_bytes for s in instance.branches.others(state))
        return self.budget.admits(others, instance.say_once)

    def _full_step(self, instance: InstanceState, state: BranchState, args: Sequence[object]) -> tuple:
        if not self._records(instance, state):
            step = StepOutputs.of_full(self.full(*args), self.layout.num_outputs)
        else:
            state.site_caches = []  # free the last caches before the new ones are allocated: one set at a time
            step = StepOutputs.of_record(self.record(*args), self.layout.num_outputs)
        state.store(step.residual, step.exit, step.caches, pending_selection=step.selection_inputs)
        state.selection = None
        if self.config.compiles_in_background:
            self._compile_ahead(state, args)
        return step.model

    def _compile_ahead(self, state: BranchState, args: Sequence[object]) -> None:
        """Queue the reuse and partial variants for the background compiler after the first full step, so that
        they are compiled, or nearly, when the schedule first asks for them; for inputs shaped like this call's
        (the partial variant's |S| and context rows are symbols; their hints are this run's expected sizes)."""
        schedule = self.config.schedule
        if self.reuse.general is None and schedule != "full" and (schedule == "adaptive" or "R" in schedule):
            self.reuse.compile_ahead([*args, state.residual])
        if self.partial is None or self.partial.general is not None or state.exit is None or not state.site_caches:
            return
        if state.classes is None or (schedule != "adaptive" and "P" not in schedule):
            return
        if self.config.prune == "attention":  # its caches hold every token: shaped as recorded
            self.partial.compile_ahead([*args, *partial_arguments(
                TensorSpec((max(2, state.classes.generative.numel()),), torch.int64, state.exit.device), state.exit,
                None, state.site_caches, "attention")])
            return
        tokens = state.exit.shape[1]
        selected = max(2, min(tokens - 2, self._tokens_a_rank(state, StepKind.PARTIAL) if self.ranks is not None
                              else budget_size(state.classes, self.config.context_ratio, self.config.margin_ratio,
                                               self.config.size_buckets)))
        caches = [TensorSpec.like(cache, -2, cache.shape[-2] - selected * (cache.shape[-2] // tokens))
                  for cache in state.site_caches]
        context = tokens - selected
        index = TensorSpec((selected,), torch.int64, state.exit.device)
        context_index = TensorSpec((context,), torch.int64, state.exit.device)
        extra = partial_arguments(index, state.exit, context_index, caches, self.config.prune, self.recompute)
        self.partial.compile_ahead([*args, *extra])

    def _partial_step(self, state: BranchState, args: Sequence[object]) -> tuple:
        if state.pending_selection is not None:  # chosen lazily: runs that never go partial skip it
            with torch.profiler.record_function("hetcache::select"):
                query, key = state.pending_selection
                state.selection, state.context = self._select(state.classes, query, key, state.exit)
                if self.config.prune == "block":  # the partial variant reads the context rows only
                    self._keep_context_rows(state)
            state.pending_selection = None
        extra = partial_arguments(state.selection, state.exit, state.context, state.site_caches, self.config.prune,
                                  self.recompute)
        step = StepOutputs.of_partial(self.partial(*args, *extra), self.layout.num_outputs)
        # block pruning keeps the context caches of the last full step; attention pruning returns new ones
        state.store(step.residual, step.exit, step.caches if self.config.prune == "attention" else state.site_caches)
        state.stats.token_fractions.append(state.selection.numel() / state.exit.shape[1])
        return step.model

    def _keep_context_rows(self, state: BranchState) -> None:
        """Cut the N-row caches down to the context rows, in place, so one N-row cache at a time is copied.
        Host caches are cut on the host, into pinned memory for the device copies, once their own copies
        from the device have landed."""
        caches, rows = state.site_caches, state.context
        if self.offload:
            wait_for_host_copies(state.exit.device)
            rows = rows.cpu()
        for i, cache in enumerate(caches):
            if self.offload and state.exit.is_cuda:
                shape = (*cache.shape[:-2], rows.numel(), cache.shape[-1])
                caches[i] = torch.index_select(cache, cache.dim() - 2, rows,
                                               out=torch.empty(shape, dtype=cache.dtype, pin_memory=True))
            else:
                caches[i] = cache.index_select(cache.dim() - 2, rows)

    def _select(self, classes: TokenClasses, query: torch.Tensor, key: torch.Tensor,
                exit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """S (the rows of ``exit`` the partial variant computes) and the context rows of the caches."""
        cfg = self.config
        hidden = exit.float().mean(dim=0)
        if self.ranks is None:
            scores = relevance(query, key, classes.generative)
            chosen = select_tokens(classes, scores, hidden, cfg.context_ratio, cfg.margin_ratio, cfg.num_clusters,
                                   cfg.size_buckets).to(exit.device)
            return chosen, complement(chosen, classes.num_tokens)
        ranks, rows = self.ranks, exit.shape[1]
        ring = self.analysis.shards.scheme == "ring"
        if ring:  # this rank's queries and keys, all heads; its caches hold its own context rows
            scores = relevance(query, key, local_rows(classes.generative, ranks.rank, rows))
        else:  # Ulysses: this rank's heads over every token, averaged over all heads
            scores = ranks.mean(relevance(query, key, classes.generative))[ranks.rank * rows:(ranks.rank + 1) * rows]
        chosen = select_shard_tokens(classes, scores, hidden, ranks.rank, ranks.world, cfg.context_ratio,
                                     cfg.margin_ratio, cfg.num_clusters, cfg.size_buckets).to(exit.device)
        if ring:
            return chosen, complement(chosen, rows)
        everyone = ranks.all_gather(chosen + ranks.rank * rows)
        return chosen, complement(everyone, classes.num_tokens)

    def _run_probe(self, args: Sequence[object]) -> torch.Tensor:
        with torch.profiler.record_function("hetcache::probe"):
            return self.probe(*args)[0]

    def _maybe_start_new_run(self, instance: InstanceState, state: BranchState, args: Sequence[object],
                             timestep: float | None) -> None:
        conditioning = self.layout.conditioning_key(args, instance.fingerprint)
        went_up = timestep is not None and state.last_timestep is not None and timestep > state.last_timestep
        changed = state.conditioning is not None and conditioning != state.conditioning
        first = state.scheduler.calls == 0
        if went_up or changed:
            why = "timestep went up" if went_up else "a conditioning input changed"
            logger.info("branch %s: new run (%s)", state.stats.name, why)
            instance.branches.end_run(state)
            state.reset()
        if went_up:
            instance.branches.drop_earlier_runs(timestep, keep=state)
        if first or went_up or changed:
            self._drop_earlier_runs_elsewhere(args, timestep)
            state.stats.runs += 1
            state.classes = self._token_classes(instance, args)
            if self.config.num_steps is None:  # no length given: expect the last run's
                state.scheduler.expected_calls = instance.branches.last_run_calls
        state.last_timestep = timestep
        state.conditioning = conditioning

    def _names_in_this_step(self, args: Sequence[object], timestep: float | None) -> set[str]:
        """Branch names this model's other graphs of the same frame (traced for other inputs, such as a
        prompt with or without a padding mask) gave branches called at ``timestep``: a branch new
        here is another branch of the same step."""
        return {state.stats.name for runtime, instance in self._elsewhere(args) if runtime.frame_id == self.frame_id
                for state in instance.branches.live.values() if state.last_timestep == timestep}

    def _drop_earlier_runs_elsewhere(self, args: Sequence[object], timestep: float | None) -> None:
        """A model runs one denoising loop at a time: a run starting here at ``timestep`` drops what this
        model's earlier runs left in its other graphs (other shapes), the branches last called below it.
        Graphs of one call (graph breaks) are called at the same timesteps and keep theirs."""
        for _runtime, instance in self._elsewhere(args):
            instance.branches.drop_earlier_runs(timestep)

    def _elsewhere(self, args: Sequence[object]) -> list[tuple[HetCacheRuntime, InstanceState]]:
        """This call's model in the other rewritten graphs that have run for it: (runtime, its state there)."""
        key, found = self.layout.instance_key(args), []
        for runtime in list(LIVE_RUNTIMES):
            if runtime is not self and isinstance(runtime, HetCacheRuntime):
                instance = runtime.instances.find(key)
                if instance is not None:
                    found.append((runtime, instance))
        return found

    def _token_classes(self, instance: InstanceState, args: Sequence[object]) -> TokenClasses | None:
        """G, M, C for this run; None: no partial steps."""
        return None if self.masks is None else self.masks.token_classes(args, instance.say_once)
