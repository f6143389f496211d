"""CFG branches: what one branch remembers between calls, and the table that bounds how many.

Sequential CFG calls the transformer once per branch and step (``cache_context("cond")`` /
``("uncond")``); branches are told apart by their text conditioning. Each keeps its own caches
and schedule; beyond ``max_branches`` the least recently used branch's caches are dropped.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .passes.graph_utils import tensor_bytes
from .priors import TokenClasses
from .schedule import StepScheduler
from .stats import BranchStats

logger = logging.getLogger("hetcache_compile")


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
    context: torch.Tensor | None = None  # the token rows the context caches hold, in order (prune="block")
    pending_selection: tuple | None = None  # (query, key) of the last full step, until S is chosen
    classes: TokenClasses | None = None
    last_timestep: float | None = None
    conditioning: tuple | None = None
    reuse_order: int = 0  # 1: reuse steps extrapolate the residual linearly in the timestep
    residual_timestep: float | None = None  # timestep of the call that computed ``residual``
    residual_slope: torch.Tensor | None = None  # d residual / d timestep over the last two computed steps
    caches_on_host: bool = False  # ``site_caches`` are host tensors (``cache_device="cpu"``)

    def reset(self) -> None:
        self.scheduler.reset()
        self.residual = self.exit = self.selection = self.classes = self.pending_selection = self.context = None
        self.residual_timestep = self.residual_slope = None
        self.site_caches = []
        self.last_timestep = None
        self.stats.history = []
        self.stats.cache_bytes = self.stats.host_cache_bytes = 0

    def store(self, residual: torch.Tensor, exit: torch.Tensor | None, site_caches: Sequence[torch.Tensor],
              pending_selection: tuple | None = None) -> None:
        """Keep what a computed (full or partial) step of the current call produced; ``stats.cache_bytes``
        counts all of it (the relevance query and key until S is chosen, the residual slope too)."""
        self.pending_selection = pending_selection
        # Compiled variants are specialised to their inputs' strides: keep every cache contiguous.
        residual, exit = _contiguous(residual), _contiguous(exit)
        self._update_slope(residual)
        self.residual, self.exit, self.site_caches = residual, exit, [_contiguous(t) for t in site_caches]
        self.residual_timestep = self.last_timestep
        tensors = [residual, *([exit] if exit is not None else []), *(pending_selection or ()),
                   *([self.residual_slope] if self.residual_slope is not None else [])]
        site_bytes = tensor_bytes(self.site_caches)
        self.stats.cache_bytes = tensor_bytes(tensors) + (0 if self.caches_on_host else site_bytes)
        self.stats.host_cache_bytes = site_bytes if self.caches_on_host else 0

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


class BranchTable:
    """The branches of one model instance, least recently used first; at most ``max_branches``.

    Branches belong to runs: when a branch starts a run at timestep t (a new branch, or the timestep
    went up), every branch last called at a lower timestep belongs to an earlier run (a previous
    prompt's ``cond``, say) and is dropped with its caches, its statistics kept. Names follow the
    order branches appear in a run: ``cond``, ``uncond``, then ``branch2``, ..., skipping the names
    ``taken`` by the run's branches in other graphs of the model (the prompt with a padding mask and
    the one without trace two graphs: Qwen-Image's true CFG).
    """

    NAMES = ("cond", "uncond")

    def __init__(self, max_branches: int, make_state: Callable[[str], BranchState]):
        self.max_branches = max_branches
        self.make_state = make_state
        self.live: OrderedDict[tuple, BranchState] = OrderedDict()
        self.finished: dict[str, BranchStats] = {}  # merged stats of dropped branches, by name
        self.last_run_calls: int | None = None  # calls a branch made in the last run a new one ended

    def end_run(self, state: BranchState) -> None:
        """``state``'s run is over because a new run started: remember how many calls it had."""
        if state.scheduler.calls:
            self.last_run_calls = state.scheduler.calls

    def lookup(self, key: tuple, timestep: float | None,
               taken: Callable[[], set[str]] = lambda: set()) -> BranchState:
        state = self.live.get(key)
        if state is None:
            self.drop_earlier_runs(timestep)
            state = self._add(key, taken())
        self.live.move_to_end(key)
        return state

    def drop_earlier_runs(self, timestep: float | None, keep: BranchState | None = None) -> None:
        """Drop the branches last called below ``timestep``: they belong to an earlier run."""
        if timestep is None:
            return
        for key, state in list(self.live.items()):
            if state is not keep and state.last_timestep is not None and state.last_timestep < timestep:
                self.end_run(state)
                self._drop(key, "it belongs to an earlier run")

    def others(self, state: BranchState) -> list[BranchState]:
        return [s for s in self.live.values() if s is not state]

    def stats(self) -> list[BranchStats]:
        return list(self.finished.values()) + [state.stats for state in self.live.values()]

    def drop_all(self, why: str) -> None:
        """Drop every branch with its caches (a new video, or a run started on another graph)."""
        for key in list(self.live):
            self._drop(key, why)

    def _add(self, key: tuple, taken: set[str]) -> BranchState:
        if len(self.live) >= self.max_branches:
            self._drop(next(iter(self.live)), f"max_branches={self.max_branches}")
        used = {state.stats.name for state in self.live.values()} | taken
        name = next((n for n in self.NAMES if n not in used), None)
        if name is None:
            name = next(f"branch{i}" for i in range(len(self.NAMES), len(used) + len(self.NAMES) + 1)
                        if f"branch{i}" not in used)
        state = self.make_state(name)
        self.live[key] = state
        return state

    def _drop(self, key: tuple, why: str) -> None:
        state = self.live.pop(key)
        logger.info("dropping the caches of branch %s (%s)", state.stats.name, why)
        state.reset()
        merged = self.finished.setdefault(state.stats.name, BranchStats(state.stats.name))
        for kind, count in state.stats.steps.items():
            merged.steps[kind] += count
        merged.runs += state.stats.runs
        merged.token_fractions += state.stats.token_fractions
