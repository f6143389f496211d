import pytest
import torch

from hetcache_compile import HetCacheConfig
from hetcache_compile.schedule import AdaptiveSchedule, make_scheduler, relative_l1


def kinds(scheduler, signals):
    return "".join(scheduler.next_kind(s).value[0].upper() for s in signals)


def signals(values):
    return [torch.full((4,), float(v)) for v in values]


def growing(factor, steps):
    """Signals that change by ``factor - 1`` (relative) at every step after the first."""
    return signals([factor**i for i in range(steps + 1)])


def test_fixed_schedule_is_followed_exactly_and_repeats_its_last_letter():
    scheduler = make_scheduler(HetCacheConfig(schedule="FFRFRR"))
    assert kinds(scheduler, [None] * 9) == "FFRFRRRRR"
    scheduler.reset()
    assert kinds(scheduler, [None] * 3) == "FFR"


def test_full_schedule_never_skips():
    assert kinds(make_scheduler(HetCacheConfig(schedule="full")), [None] * 5) == "FFFFF"


def test_relative_l1():
    assert relative_l1(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0])) == 1.0


def test_adaptive_warms_up_then_reuses_small_changes_up_to_the_cap():
    config = HetCacheConfig(threshold=0.5, warmup_steps=2, max_consecutive_reuse=2, refresh_interval=100)
    scheduler = AdaptiveSchedule(config)
    # no change at all: reuse as often as the cap allows; the forced step is a cheap partial one
    assert kinds(scheduler, signals([1] * 8)) == "FFRRPRRP"


def test_adaptive_computes_when_the_accumulated_change_crosses_the_threshold():
    config = HetCacheConfig(threshold=0.5, warmup_steps=1, max_consecutive_reuse=10, refresh_interval=1)
    scheduler = AdaptiveSchedule(config)
    # each step changes by 20 %: A = 0.2, 0.4 (reuse), 0.6 (compute, reset), ...
    assert kinds(scheduler, growing(1.2, 6)) == "FRRFRRF"


def test_adaptive_last_step_is_full_when_the_step_count_is_known():
    config = HetCacheConfig(threshold=10.0, warmup_steps=1, max_consecutive_reuse=10, num_steps=5)
    assert kinds(AdaptiveSchedule(config), signals([1] * 5)) == "FRRRF"


def test_adaptive_partial_band_falls_on_full_at_refresh():
    config = HetCacheConfig(threshold=0.5, warmup_steps=1, max_consecutive_reuse=0, refresh_interval=2)
    scheduler = AdaptiveSchedule(config)
    # change 0.6 per step: in [τ, 1.5τ) -> partial, but every 2nd computed step is a refresh
    assert kinds(scheduler, growing(1.6, 4)) == "FPFPF"


@pytest.mark.parametrize(("preset", "pattern"), [
    ("quality", "FRPRFRPRFR"),
    ("balanced", "FRRPRRFRRP"),
    ("fast", "FRRRPRRRFR"),
])
def test_presets_are_a_cadence_of_full_and_partial_steps_with_reuse_between(preset, pattern):
    """The presets' measured pattern (docs/design-notes.md): computed steps spread evenly, alternating F/P."""
    scheduler = make_scheduler(HetCacheConfig.from_options({"preset": preset}))
    modulation = torch.zeros(4)
    assert "".join(scheduler.next_kind(modulation).value[0].upper() for _ in range(10)) == pattern


@pytest.mark.parametrize(("preset", "steps", "pattern"), [
    ("fast", 7, "FRRRPRF"),
    ("fast", 20, "FRRRPRRRFRRRPRRRFRRF"),  # three reuses would end the run: the last call is full
    ("balanced", 20, "FRRPRRFRRPRRFRRPRRFR"),  # the call before the last computed: one reuse is cheap
])
def test_presets_end_on_a_full_step_when_the_step_count_is_known_unless_the_one_before_computed(preset, steps,
                                                                                                pattern):
    scheduler = make_scheduler(HetCacheConfig.from_options({"preset": preset, "num_steps": steps}))
    kinds = "".join(scheduler.next_kind(torch.zeros(4)).value[0].upper() for _ in range(steps))
    assert kinds == pattern
