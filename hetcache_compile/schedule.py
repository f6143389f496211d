"""Step classification: decide per transformer call whether it is full, partial or reuse.

One ``StepScheduler`` serves one CFG branch; ``reset()`` starts a new run.

>>> from hetcache_compile.config import HetCacheConfig
>>> s = make_scheduler(HetCacheConfig(schedule="FFRFR"))
>>> [s.next_kind(None).value for _ in range(7)]
['full', 'full', 'reuse', 'full', 'reuse', 'reuse', 'reuse']
"""

from __future__ import annotations

import enum

import torch

from .config import HetCacheConfig


class StepKind(str, enum.Enum):
    FULL = "full"
    PARTIAL = "partial"
    REUSE = "reuse"


_LETTERS = {"F": StepKind.FULL, "P": StepKind.PARTIAL, "R": StepKind.REUSE}


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``mean|a - b| / mean|b|``, the change measure TeaCache and HetCache use."""
    previous = previous.float()
    denominator = previous.abs().mean().clamp_min(1e-12)
    return float(((current.float() - previous).abs().mean() / denominator).item())


class StepScheduler:
    """Base: counts calls; subclasses pick the kind. ``next_kind`` is called once per call."""

    def __init__(self, config: HetCacheConfig):
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        # calls this run is expected to have: ``num_steps``, or what the runtime learned from the last run
        self.expected_calls: int | None = self.config.num_steps

    def next_kind(self, modulation: torch.Tensor | None) -> StepKind:
        kind = self._choose(modulation)
        self.calls += 1
        return kind

    def _choose(self, modulation: torch.Tensor | None) -> StepKind:
        raise NotImplementedError


class FullSchedule(StepScheduler):
    """Never skip anything: for verifying the rewrite against eager."""

    def _choose(self, modulation: torch.Tensor | None) -> StepKind:
        return StepKind.FULL


class FixedSchedule(StepScheduler):
    """Follow a letter string exactly, one letter per call; the last letter repeats."""

    def _choose(self, modulation: torch.Tensor | None) -> StepKind:
        pattern = self.config.schedule
        return _LETTERS[pattern[min(self.calls, len(pattern) - 1)]]


class AdaptiveSchedule(StepScheduler):
    """Accumulate the modulation change; reuse while it stays below the threshold.

    Always full: the first ``warmup_steps`` calls, every ``refresh_interval``-th computed step,
    after ``max_consecutive_reuse`` reuses, and the last call when the run's length is known
    (``expected_calls``) unless the call before it was computed (one reuse step after a computed
    one costs little; measured in docs/design-notes.md, "Presets are a cadence").
    ``τ ≤ A < 1.5τ`` asks for a partial step; the runtime computes fully where partial steps are
    unavailable. With ``threshold=inf`` (the presets) the modulation plays no part: the pattern is a
    cadence.
    """

    def reset(self) -> None:
        super().reset()
        self.accumulated = 0.0
        self.previous: torch.Tensor | None = None
        self.consecutive_reuse = 0
        self.computed_since_full = 0

    def _choose(self, modulation: torch.Tensor | None) -> StepKind:
        cfg = self.config
        if modulation is None:
            raise ValueError("the adaptive schedule needs the timestep modulation tensor")
        change = 0.0 if self.previous is None else self._rescale(relative_l1(modulation, self.previous))
        self.previous = modulation.detach().clone()
        self.accumulated += change
        is_last = (self.expected_calls is not None and self.calls == self.expected_calls - 1
                   and self.consecutive_reuse > 0)
        if self.calls < cfg.warmup_steps or is_last:
            return self._computed(StepKind.FULL)
        if self.accumulated < cfg.threshold and self.consecutive_reuse < cfg.max_consecutive_reuse:
            self.consecutive_reuse += 1
            return StepKind.REUSE
        wants_partial = self.accumulated < 1.5 * cfg.threshold
        refresh_due = self.computed_since_full + 1 >= cfg.refresh_interval
        return self._computed(StepKind.PARTIAL if wants_partial and not refresh_due else StepKind.FULL)

    def _computed(self, kind: StepKind) -> StepKind:
        self.accumulated = 0.0
        self.consecutive_reuse = 0
        self.computed_since_full = 0 if kind is StepKind.FULL else self.computed_since_full + 1
        return kind

    def _rescale(self, change: float) -> float:
        coefficients = self.config.rescale_coefficients()
        if coefficients is None:
            return change
        value = 0.0
        for c in coefficients:
            value = value * change + c
        return abs(value)


def make_scheduler(config: HetCacheConfig) -> StepScheduler:
    if config.schedule == "full":
        return FullSchedule(config)
    if config.schedule == "adaptive":
        return AdaptiveSchedule(config)
    return FixedSchedule(config)
