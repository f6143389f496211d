"""The runtime: the callable the backend hands back to Dynamo.

Per call it (1) finds the CFG branch, (2) starts a new run when the timestep went up or a
conditioning input changed, (3) runs the probe and asks the branch's scheduler for the step
kind, (4) calls that variant inside a ``hetcache::<kind>`` profiler range, and (5) keeps the
stack residual of computed steps for the reuse steps after them. All step state lives here,
never in the compiled graphs, so no value of it can cause a recompilation.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .compiled import CompiledVariant
from .config import HetCacheConfig
from .fingerprint import FingerprintCache
from .passes import GraphAnalysis, Variants
from .passes.graph_utils import output_node, placeholders
from .priors import (
    USER_MASKS,
    VACE_MASK_CHANNELS,
    TokenClasses,
    classify_tokens,
    mask_from_vace_control,
    mask_to_token_grid,
)
from .schedule import StepKind, StepScheduler, make_scheduler
from .selection import complement, relevance, select_tokens
from .stats import BranchStats

logger = logging.getLogger("hetcache_compile")

# Runtimes alive now, so that ``stats(model)`` & co. can find a model's runtimes by its
# parameters. Filled when a graph is compiled, never at import time; entries vanish with Dynamo's cache.
LIVE_RUNTIMES: weakref.WeakSet = weakref.WeakSet()


@dataclass
class BranchState:
    """Everything one CFG branch remembers between calls."""

    scheduler: StepScheduler
    stats: BranchStats
    residual: torch.Tensor | None = None
    exit: torch.Tensor | None = None  # final hidden states of all tokens (partial scatter target)
    # k0, v0, k1, v1, ... (all tokens after a full step, the rows outside S once S is chosen) or a0, a1, ...
    site_caches: list[torch.Tensor] = field(default_factory=list)
    selection: torch.Tensor | None = None  # S, chosen after the last full step
    pending_selection: tuple | None = None  # (query, key) of the last full step, until S is chosen
    classes: TokenClasses | None = None
    last_timestep: float | None = None
    conditioning: tuple | None = None
    reuse_order: int = 0  # 1: reuse steps extrapolate the residual linearly in the timestep
    residual_timestep: float | None = None  # timestep of the call that computed ``residual``
    residual_slope: torch.Tensor | None = None  # d residual / d timestep over the last two computed steps

    def reset(self) -> None:
        self.scheduler.reset()
        self.residual = self.exit = self.selection = self.classes = self.pending_selection = None
        self.residual_timestep = self.residual_slope = None
        self.site_caches = []
        self.last_timestep = None
        self.stats.history = []
        self.stats.cache_bytes = 0

    def store(self, residual: torch.Tensor, exit: torch.Tensor | None, site_caches: Sequence[torch.Tensor]) -> None:
        """Keep what a computed (full or partial) step of the current call produced."""
        # Compiled variants are specialised to their inputs' strides: keep every cache contiguous.
        residual, exit = _contiguous(residual), _contiguous(exit)
        self._update_slope(residual)
        self.residual, self.exit, self.site_caches = residual, exit, [_contiguous(t) for t in site_caches]
        self.residual_timestep = self.last_timestep
        tensors = [residual, *([exit] if exit is not None else []), *self.site_caches,
                   *([self.residual_slope] if self.residual_slope is not None else [])]
        self.stats.cache_bytes = sum(t.numel() * t.element_size() for t in tensors)

    def reuse_residual(self) -> torch.Tensor:
        """The residual a reuse step adds: the last one, or (``reuse_order=1``) its linear extrapolation
        to this call's timestep from the last two computed steps, as TaylorSeer does for features."""
        if self.residual_slope is None or self.last_timestep is None:
            return self.residual
        return torch.add(self.residual, self.residual_slope, alpha=self.last_timestep - self.residual_timestep)

    def _update_slope(self, residual: torch.Tensor) -> None:
        previous, t0, t1 = self.residual, self.residual_timestep, self.last_timestep
        if (self.reuse_order == 0 or previous is None or t0 is None or t1 is None or t1 == t0
                or previous.shape != residual.shape):
            self.residual_slope = None
            return
        self.residual_slope = (residual - previous) / (t1 - t0)


def _contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return tensor if tensor is None or tensor.is_contiguous() else tensor.contiguous()


class HetCacheRuntime:
    """Dispatches each call of one Dynamo graph to its full, partial or reuse variant.

    Not thread-safe: one denoising loop at a time, as in diffusers pipelines.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[object], analysis: GraphAnalysis,
                 variants: Variants, config: HetCacheConfig):
        self.config = config
        self.analysis = analysis
        self.fallback_reason: str | None = None
        names = [n.name for n in placeholders(gm.graph)]
        index = {name: i for i, name in enumerate(names)}
        self.num_outputs = len(output_node(gm.graph).args[0])
        self.parameter_ids = frozenset(id(x) for x in example_inputs if isinstance(x, torch.nn.Parameter))
        self.text_index = [index[n] for n in analysis.text_inputs]
        self.timestep_index = index[analysis.modulation.timestep_input] if analysis.modulation else None
        self.conditioning_index = _conditioning_indices(analysis, index)
        self.full = CompiledVariant("full", variants.full, config.inner_backend)
        self.record = (CompiledVariant("record", variants.record, config.inner_backend)
                       if variants.record is not None else None)
        self.reuse = CompiledVariant("reuse", variants.reuse, config.inner_backend)
        self.partial = (CompiledVariant("partial", variants.partial, config.inner_backend, specialize_on=len(names))
                        if variants.partial is not None else None)
        self.partial_note = variants.partial_refused
        self.num_caches = len(variants.cached_sites) * variants.caches_per_site
        self.recorded_bytes = (variants.recorded_bytes(example_inputs, self.num_outputs)
                               if config.max_cache_bytes is not None else 0)
        self.relevance_site = variants.relevance_site
        self.grid = analysis.token_grid
        self.latent_index = index[self.grid.latent_input] if self.grid is not None else None
        self.control_index = _vace_control_index(names, example_inputs, self.grid)
        self.probe = variants.probe
        self.branches: OrderedDict[tuple, BranchState] = OrderedDict()
        self.finished: list[BranchStats] = []  # stats of evicted branches, kept for totals
        self._said: set[str] = set()
        self._fingerprint = FingerprintCache()
        LIVE_RUNTIMES.add(self)

    @property
    def report(self) -> str:
        lines = [self.analysis.report(), f"variants: {', '.join(v.name for v in self.variants())}"]
        if self.partial is not None:
            lines.append(f"  partial: {self.num_caches} per-site caches, relevance at "
                         f"{self.relevance_site.module}, prune={self.config.prune}")
        else:
            lines.append(f"  no partial variant: {self.partial_note}")
        return "\n".join(lines)

    # -- public surface used by api.py ------------------------------------------------------
    def variants(self) -> list[CompiledVariant]:
        return [v for v in (self.full, self.record, self.partial, self.reuse) if v is not None]

    def branch_stats(self) -> list[BranchStats]:
        return self.finished + [state.stats for state in self.branches.values()]

    def reset(self) -> None:
        """Forget all caches; the next call of every branch is the first of a new run."""
        for state in self.branches.values():
            state.reset()

    # -- the call path ------------------------------------------------------------------------
    def __call__(self, *args):
        state = self._branch(args)
        self._maybe_start_new_run(state, args)
        modulation = self._run_probe(args) if self.config.schedule == "adaptive" else None
        kind = self._feasible(state, state.scheduler.next_kind(modulation))
        with torch.profiler.record_function(f"hetcache::{kind.value}"):
            if kind is StepKind.REUSE:
                outputs = self.reuse(*args, state.reuse_residual())
            elif kind is StepKind.PARTIAL:
                outputs = self._partial_step(state, args)
            else:
                outputs = self._full_step(state, args)
        state.stats.record(kind.value)
        logger.debug("branch %s call %d: %s", state.stats.name, state.scheduler.calls, kind.value)
        return tuple(outputs)

    def _feasible(self, state: BranchState, kind: StepKind) -> StepKind:
        if kind is StepKind.REUSE and state.residual is None:
            return StepKind.FULL
        if kind is StepKind.PARTIAL and (state.exit is None or (state.selection is None
                                                                 and state.pending_selection is None)):
            return StepKind.FULL
        return kind

    def _records(self, state: BranchState) -> bool:
        """Whether full steps must record caches: only when partial steps can follow and the caches fit."""
        may_be_partial = self.config.schedule == "adaptive" or "P" in self.config.schedule
        if self.record is None or state.classes is None or not may_be_partial:
            return False
        return self._caches_fit(state)

    def _caches_fit(self, state: BranchState) -> bool:
        limit = self.config.max_cache_bytes
        if limit is None:
            return True
        others = sum(s.stats.cache_bytes for s in self.branches.values() if s is not state)
        if others + self.recorded_bytes <= limit:
            return True
        self._say_once(f"partial-step caches of {self.recorded_bytes / 2**20:.1f} MiB a branch do not fit "
                       f"max_cache_bytes={limit} beside the other branches' caches: a branch that cannot "
                       "record takes full and reuse steps only")
        return False

    def _full_step(self, state: BranchState, args: Sequence[object]) -> list:
        n = self.num_outputs
        if not self._records(state):
            outputs = self.full(*args)
            state.store(outputs[n], None, [])
            state.selection = state.pending_selection = None
            return outputs[:n]
        state.site_caches = []  # free the last caches before the new ones are allocated: one set at a time
        outputs = self.record(*args)
        residual, exit, *caches, query, key = outputs[n:]
        state.store(residual, exit, caches)
        state.selection, state.pending_selection = None, (query, key)
        return outputs[:n]

    def _partial_step(self, state: BranchState, args: Sequence[object]) -> list:
        if state.pending_selection is not None:  # chosen lazily: runs that never go partial skip it
            with torch.profiler.record_function("hetcache::select"):
                query, key = state.pending_selection
                state.selection = self._select(state.classes, query, key, state.exit)
                if self.config.prune == "block":  # the partial variant reads the context rows only
                    context = complement(state.selection, state.classes.num_tokens)
                    caches = state.site_caches
                    for i, cache in enumerate(caches):  # in place, so one N-row cache at a time is copied
                        caches[i] = cache.index_select(cache.dim() - 2, context)
            state.pending_selection = None
        attention_prune = self.config.prune == "attention"
        caches = state.site_caches if attention_prune else [state.exit, *state.site_caches]
        outputs = self.partial(*args, state.selection, *caches)
        n = self.num_outputs
        residual, exit, *site_caches = outputs[n:]
        state.store(residual, exit, site_caches if attention_prune else state.site_caches)
        state.stats.token_fractions.append(state.selection.numel() / state.classes.num_tokens)
        return outputs[:n]

    def _select(self, classes: TokenClasses, query: torch.Tensor, key: torch.Tensor,
                exit: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        scores = relevance(query, key, classes.generative)
        hidden = exit.float().mean(dim=0)
        chosen = select_tokens(classes, scores, hidden, cfg.context_ratio, cfg.margin_ratio, cfg.num_clusters,
                               cfg.size_buckets)
        return chosen.to(exit.device)

    def _run_probe(self, args: Sequence[object]) -> torch.Tensor:
        with torch.profiler.record_function("hetcache::probe"):
            return self.probe(*args)[0]

    def _branch(self, args: Sequence[object]) -> BranchState:
        key = tuple(self._fingerprint(args[i]) for i in self.text_index)
        state = self.branches.get(key)
        if state is None:
            state = self._new_branch(key)
        self.branches.move_to_end(key)
        return state

    def _new_branch(self, key: tuple) -> BranchState:
        if len(self.branches) >= self.config.max_branches:
            _, evicted = self.branches.popitem(last=False)
            logger.info("dropping the caches of branch %s (max_branches=%d)",
                        evicted.stats.name, self.config.max_branches)
            evicted.reset()
            self.finished.append(evicted.stats)
        names = ("cond", "uncond")
        count = len(self.branches) + len(self.finished)
        name = names[count] if count < len(names) else f"branch{count}"
        state = BranchState(scheduler=make_scheduler(self.config), stats=BranchStats(name),
                            reuse_order=self.config.reuse_order)
        self.branches[key] = state
        return state

    def _maybe_start_new_run(self, state: BranchState, args: Sequence[object]) -> None:
        timestep = float(args[self.timestep_index].flatten()[0]) if self.timestep_index is not None else None
        conditioning = tuple(self._fingerprint(args[i]) for i in self.conditioning_index)
        went_up = timestep is not None and state.last_timestep is not None and timestep > state.last_timestep
        changed = state.conditioning is not None and conditioning != state.conditioning
        first = state.scheduler.calls == 0
        if went_up or changed:
            why = "timestep went up" if went_up else "a conditioning input changed"
            logger.info("branch %s: new run (%s)", state.stats.name, why)
            state.reset()
        if first or went_up or changed:
            state.stats.runs += 1
            state.classes = self._token_classes(args)
        state.last_timestep = timestep
        state.conditioning = conditioning

    def _token_classes(self, args: Sequence[object]) -> TokenClasses | None:
        """G, M, C for this run from the user's mask or VACE's control mask; None: no partial steps."""
        if self.partial is None:
            return None
        grid, patch = self.grid.grid, self.grid.patch
        user_mask = USER_MASKS.lookup(self.parameter_ids)
        if user_mask is not None:
            mask = mask_to_token_grid(user_mask, grid, patch)
        elif self.control_index is not None:
            mask = mask_from_vace_control(args[self.control_index], patch)
        else:
            self._say_once("no mask: no input carries one and set_mask was not called; step-level caching only")
            return None
        batch = args[self.latent_index].shape[0]
        if mask.shape[0] not in (1, batch):
            raise ValueError(f"hetcache mask has batch {mask.shape[0]} but the model input has batch {batch}; "
                             "pass one mask per sample or a single mask for all")
        merged = mask.any(dim=0).cpu()  # S is shared by the batch: the union of every sample's edit
        if not merged.any():
            self._say_once("empty mask: nothing is edited, so no partial steps (step-level caching only)")
            return None
        return classify_tokens(merged, self.config.margin_radius)

    def _say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            logger.warning("hetcache: %s", message)


def _vace_control_index(names: Sequence[str], example_inputs: Sequence[object], grid) -> int | None:
    """Position of VACE's ``control_hidden_states`` input (5-D, >= 64 channels, latent-sized), if any."""
    if grid is None:
        return None
    for i, (name, value) in enumerate(zip(names, example_inputs)):
        if "control_hidden_states" in name and isinstance(value, torch.Tensor) and value.dim() == 5 \
                and value.shape[1] >= VACE_MASK_CHANNELS and tuple(value.shape[2:]) == grid.latent_shape[2:]:
            return i
    return None


def _conditioning_indices(analysis: GraphAnalysis, index: dict[str, int]) -> list[int]:
    """User inputs that stay fixed through a run (e.g. VACE's control video): a change means a new video."""
    skip = set(analysis.region.stream_sources) | set(analysis.text_inputs)
    if analysis.modulation is not None:
        skip.add(analysis.modulation.timestep_input)
    return [index[name] for name in analysis.user_inputs if name not in skip]
