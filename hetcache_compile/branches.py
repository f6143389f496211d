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


class BranchTable:
    """The branches of one model instance, least recently used first; at most ``max_branches``."""

    NAMES = ("cond", "uncond")

    def __init__(self, max_branches: int, make_state: Callable[[str], BranchState]):
        self.max_branches = max_branches
        self.make_state = make_state
        self.live: OrderedDict[tuple, BranchState] = OrderedDict()
        self.finished: list[BranchStats] = []  # stats of evicted branches, kept for totals

    def lookup(self, key: tuple) -> BranchState:
        state = self.live.get(key)
        if state is None:
            state = self._add(key)
        self.live.move_to_end(key)
        return state

    def others(self, state: BranchState) -> list[BranchState]:
        return [s for s in self.live.values() if s is not state]

    def stats(self) -> list[BranchStats]:
        return self.finished + [state.stats for state in self.live.values()]

    def reset(self) -> None:
        for state in self.live.values():
            state.reset()

    def _add(self, key: tuple) -> BranchState:
        if len(self.live) >= self.max_branches:
            _, evicted = self.live.popitem(last=False)
            logger.info("dropping the caches of branch %s (max_branches=%d)", evicted.stats.name, self.max_branches)
            evicted.reset()
            self.finished.append(evicted.stats)
        count = len(self.live) + len(self.finished)
        name = self.NAMES[count] if count < len(self.NAMES) else f"branch{count}"
        state = self.make_state(name)
        self.live[key] = state
        return state
