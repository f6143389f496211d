"""What ``hetcache_compile.stats(model)`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field

STEP_KINDS = ("full", "partial", "reuse")


def _empty_steps() -> dict[str, int]:
    return dict.fromkeys(STEP_KINDS, 0)


@dataclass
class BranchStats:
    """One CFG branch (``"cond"``, ``"uncond"``, ...): its calls by kind, in this run and in total."""

    name: str
    steps: dict[str, int] = field(default_factory=_empty_steps)
    history: list[str] = field(default_factory=list)  # kinds of the current run, in call order
    runs: int = 0
    cache_bytes: int = 0  # held on the model's device
    host_cache_bytes: int = 0  # held in host memory (``cache_device="cpu"``)
    token_fractions: list[float] = field(default_factory=list)  # |S| / N of each partial step

    def record(self, kind: str) -> None:
        self.steps[kind] += 1
        self.history.append(kind)


@dataclass
class HetCacheStats:
    """Totals over every compiled graph of a model and every branch.

    ``steps["full"|"partial"|"reuse"]`` counts model calls of each kind, summed over branches (a
    call no rewritten graph served is full); ``calls`` counts model calls and ``graph_calls`` the
    calls of its graphs (more when graph breaks split the model); ``branches`` has the per-branch
    detail; ``compile_seconds`` maps variant name to the seconds its inner compilation took;
    ``compile_counts`` its compilations, ``compiled_pieces`` the pieces the inner compiler compiled
    for it (a stack of identical blocks is one piece) and ``cache_hits`` how many of those Inductor's FX
    graph cache served (a warm start compiles nothing: every piece a hit);
    ``fallback_reasons`` lists why graphs were left to plain Inductor (empty when every graph was
    rewritten); ``cache_bytes`` is what the branches keep on the model's device now, and
    ``host_cache_bytes`` what they keep in host memory (``cache_device="cpu"``).
    """

    steps: dict[str, int] = field(default_factory=_empty_steps)
    branches: dict[str, BranchStats] = field(default_factory=dict)
    compile_seconds: dict[str, float] = field(default_factory=dict)
    compile_counts: dict[str, int] = field(default_factory=dict)
    compiled_pieces: dict[str, int] = field(default_factory=dict)
    cache_hits: dict[str, int] = field(default_factory=dict)
    cache_bytes: int = 0
    host_cache_bytes: int = 0
    fallback_reasons: list[str] = field(default_factory=list)
    graphs: int = 0
    graph_calls: int = 0
    model_calls: int = 0

    @property
    def calls(self) -> int:
        """Model calls (the calls of the graph that starts the model's forward)."""
        return self.model_calls

    @property
    def token_fraction(self) -> float | None:
        """Mean fraction of tokens computed by partial steps (None when there were none)."""
        fractions = [f for b in self.branches.values() for f in b.token_fractions]
        return sum(fractions) / len(fractions) if fractions else None

    @property
    def fallback_reason(self) -> str | None:
        return self.fallback_reasons[0] if self.fallback_reasons else None

    def merge_branch(self, branch: BranchStats) -> None:
        total = self.branches.setdefault(branch.name, BranchStats(branch.name))
        total.steps = {kind: total.steps[kind] + branch.steps[kind] for kind in STEP_KINDS}
        total.history = total.history + branch.history
        total.token_fractions = total.token_fractions + branch.token_fractions
        total.runs += branch.runs
        total.cache_bytes += branch.cache_bytes
        total.host_cache_bytes += branch.host_cache_bytes
        for kind in STEP_KINDS:
            self.steps[kind] += branch.steps[kind]
        self.cache_bytes += branch.cache_bytes
        self.host_cache_bytes += branch.host_cache_bytes

    def summary(self) -> str:
        parts = [f"{kind}={self.steps[kind]}" for kind in STEP_KINDS]
        text = f"hetcache: {self.calls} calls ({', '.join(parts)}), cache {self.cache_bytes / 2**20:.1f} MiB"
        if self.host_cache_bytes:
            text += f" (+ {self.host_cache_bytes / 2**20:.1f} MiB in host memory)"
        if self.graphs > 1:
            text += f", {self.graphs} graphs ({self.graph_calls} graph calls)"
        if self.token_fraction is not None:
            text += f", partial steps computed {100 * self.token_fraction:.0f}% of tokens"
        if self.compile_seconds:
            hits = sum(self.cache_hits.values())
            text += (f", compiled {sum(self.compiled_pieces.values())} pieces in {sum(self.compile_seconds.values()):.1f} s"
                     + (f" ({hits} from Inductor's cache)" if hits else ""))
        if self.fallback_reasons:
            text += f"; fell back: {self.fallback_reasons[0]}"
        return text
