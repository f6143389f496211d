"""``max_cache_bytes``: whether a branch may record the partial steps' caches."""

from __future__ import annotations

from collections.abc import Callable, Iterable


class CacheBudget:
    """Admits a record step when its caches (``recorded_bytes``, known from the graph before the
    first call) fit ``limit`` beside the caches the other branches hold. No limit admits all."""

    def __init__(self, limit: int | None, recorded_bytes: int):
        self.limit = limit
        self.recorded_bytes = recorded_bytes

    def admits(self, other_branches_bytes: Iterable[int], say: Callable[[str], None]) -> bool:
        if self.limit is None:
            return True
        if sum(other_branches_bytes) + self.recorded_bytes <= self.limit:
            return True
        say(f"partial-step caches of {self.recorded_bytes / 2**20:.1f} MiB a branch do not fit "
            f"max_cache_bytes={self.limit} beside the other branches' caches: a branch that cannot "
            "record takes full and reuse steps only")
        return False
