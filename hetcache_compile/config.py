"""``HetCacheConfig``: every option of the backend, validated, with presets.

>>> from hetcache_compile import HetCacheConfig
>>> HetCacheConfig.from_options({"preset": "fast"}).max_consecutive_reuse
3
>>> HetCacheConfig.from_options({"schedule": "FFRF"}).schedule
'FFRF'
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from torch._dynamo.exc import ShortenTraceback

from .families import rescale_polynomials

# Published polynomials (the model families', ``families/``) mapping the raw relative L1 change of
# the modulation tensor to an estimate of the output change, as TeaCache does ("ret_steps" mode).
RESCALE_POLYNOMIALS: dict[str, tuple[float, ...]] = rescale_polynomials()

INNER_BACKENDS = ("inductor", "aot_eager", "eager")
# Inductor modes for the variants. The CUDA-graph modes are refused: a replay overwrites its
# outputs, and hetcache keeps outputs of one call (residual, caches) for the next ones.
INDUCTOR_MODES = ("default", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
SCHEDULE_MODES = ("adaptive", "full")
_FIXED_SCHEDULE = re.compile(r"^F[FPR]*$")
PRUNE_MODES = ("block", "attention")
# storage types of the partial steps' key/value caches (passes/cache_codec.py)
CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float8_e4m3fn": torch.float8_e4m3fn}

PRESETS: dict[str, dict[str, object]] = {
    # Each preset is a cadence: a full step, then `max_consecutive_reuse` reuse steps, then a partial
    # step, the same reuses, a full step again (warmup_steps=1, refresh_interval=2: computed steps
    # alternate full and partial), and the last call full (num_steps, or learned from the last run). threshold=inf
    # turns the modulation test off, so the cadence alone sets the pattern; a finite threshold (the
    # accumulated relative L1 change of the timestep modulation) makes it adaptive again.
    # context_ratio / margin_ratio: shares of context and margin tokens a partial step computes.
    #
    # Chosen with benchmarks/quality.py on both trained proxies (`tiles`, 6 x 6 tokens a frame, and
    # `scenes`, 16 x 28), 20 and 50 Euler steps, in-mask PSNR against full compute at equal FLOPs
    # with step skipping (docs/design-notes.md, "Presets"). What decided it: computed steps spread
    # evenly through the run, half of them partial (the edit's tokens fresh, the context's keys and
    # values a few steps old), beat the earlier adaptive presets (warm-up of 2 full steps, a full
    # step every 5th computed step, thresholds 0.6 / 1.2 / 1.5) by 2 to 7 dB at the same FLOPs on
    # both proxies; partial steps alone (no reuse between them) lose, the cached context grows stale.
    "quality": {"threshold": math.inf, "warmup_steps": 1, "refresh_interval": 2, "max_consecutive_reuse": 1,
                "context_ratio": 0.2, "margin_ratio": 1.0},
    "balanced": {"threshold": math.inf, "warmup_steps": 1, "refresh_interval": 2, "max_consecutive_reuse": 2,
                 "context_ratio": 0.1, "margin_ratio": 0.5},
    "fast": {"threshold": math.inf, "warmup_steps": 1, "refresh_interval": 2, "max_consecutive_reuse": 3,
             "context_ratio": 0.1, "margin_ratio": 0.25},
}


@dataclass(frozen=True)
class HetCacheConfig:
    """Options of ``torch.compile(m, backend="hetcache", options={...})``.

    Attributes:
        preset: ``"quality"``, ``"balanced"`` (default) or ``"fast"``; sets ``threshold``,
            ``warmup_steps``, ``refresh_interval``, ``max_consecutive_reuse``, ``context_ratio``
            and ``margin_ratio`` unless those are given explicitly (``PRESETS``).
        schedule: ``"adaptive"`` (classify each call from the timestep modulation), ``"full"``
            (never skip: for verification), or a fixed string with one letter per call of a CFG
            branch, ``F`` full, ``P`` partial or ``R`` reuse, starting with ``F``; its last letter
            repeats.
        threshold: adaptive schedule: reuse while the accumulated relative L1 change of the
            modulation tensor since the last computed step stays below it.
        warmup_steps: the first calls of every run are always full.
        refresh_interval: every n-th computed step is full (matters once partial steps exist).
        max_consecutive_reuse: cap on reuse steps in a row.
        reuse_order: ``1`` (default): a reuse step extrapolates the stack residual linearly in
            the timestep from the last two computed steps (first order, as TaylorSeer does for
            block features; one more residual-sized tensor per branch); ``0``: it adds the last
            computed step's residual as is (the paper's reuse).
        num_steps: number of calls per branch in a run, if known: the last one is then full.
            ``None`` (default): each run expects as many calls as the model's last finished run
            had (learned per model instance and graph), so from the second video on the last
            call is full without being told. A run of another length costs at most one extra
            full step (longer: one lands where the last run ended) or misses its final one.
        rescale: name in ``RESCALE_POLYNOMIALS`` or polynomial coefficients (highest power
            first) applied to each relative change before accumulating; ``None`` for identity.
        inner_backend: compiler for each variant: ``"inductor"``, ``"aot_eager"`` or ``"eager"``.
        mode: Inductor mode for the variants, ``"default"`` or ``"max-autotune-no-cudagraphs"``;
            ``torch.compile(..., mode=...)`` sets it too (torch forbids ``mode`` with ``options``).
            The CUDA-graph modes are refused: a graph replay overwrites the outputs hetcache keeps.
        inductor_options: Inductor config patches for the variants, as ``torch.compile``'s
            ``options`` would give plain Inductor (e.g. ``{"max_autotune": True}``).
        max_shapes: input shapes (resolutions, frame counts, batch layouts) kept rewritten at
            once for a graph Dynamo compiled with dynamic shapes; the least recently used one's
            variants and caches are dropped beyond it.
        max_branches: CFG branches (distinct text conditionings) kept at once; the least
            recently used is dropped beyond it, which bounds cache memory.
        max_cache_bytes: bound on the bytes of all branches' caches, or ``"auto"``: half the
            device memory free when the graph is compiled (CUDA; no bound on the CPU). It picks
            the cache plan among the options left unset (``cache_dtype=None``: as computed, then
            bfloat16 if narrower than the model's type, then float8; ``recompute_kv=None``:
            recomputed where the graph allows it, else stored): the first whose caches for
            ``budget_branches`` branches fit. At every call, a full step records the partial
            steps' caches only if they fit beside the other branches'; a branch that cannot
            record takes full and reuse steps only (logged once). ``None``: no bound.
        budget_branches: CFG branches the cache plan must fit ``max_cache_bytes`` for: 2 for
            sequential CFG (diffusers' default), 1 for batched CFG or none.
        context_ratio: share of context tokens a partial step recomputes (0..1).
        margin_ratio: share of margin tokens a partial step recomputes, spatially uniform per
            frame (0..1). ``context_ratio = margin_ratio = 1`` puts every token in S.
        margin_radius: margin width around the generative tokens, in tokens (Euclidean).
        num_clusters: k of the k-means that spreads the context budget over the scene.
        relevance_site: self-attention site whose attention scores rank context tokens: an index
            among the self-attention sites (default -1, the last) or a module path such as
            ``"blocks.29.attn1"``.
        prune: ``"block"`` (tokens outside S skip whole blocks) or ``"attention"`` (only
            self-attention queries are restricted to S; cross-attention and FFN see all tokens,
            as in the paper's code).
        partial: build partial steps at all (``False``: step-level caching only).
        cache_dtype: how the partial steps' context keys and values are stored between steps:
            ``None`` (as computed), ``"bfloat16"``, ``"float16"``, or ``"float8_e4m3fn"`` (a
            float32 scale per token and head; about half the bytes of bfloat16; on CUDA it needs
            compute capability 8.9 or newer). Decoded inside the partial graph. ``prune="block"``
            only.
        recompute_kv: cache, per self-attention site, the tensor its keys and values are projected
            from (one ``[B, N, dim]`` tensor instead of two), and recompute the context's keys and
            values in the partial graph: half the bytes, exact, for about 2 x (N - |S|) x dim^2
            multiply-adds a site more. ``None`` (the default): wherever the graph allows it
            (``prune="block"``, the keys a projection of the tokens alone, no context parallelism),
            else keys and values are stored; ``True``: recompute or take no partial steps;
            ``False``: store keys and values.
        cache_device: where the context caches live between steps: ``None`` (on the model's device)
            or ``"cpu"``: in pinned host memory. Each site's keys and values leave the device right
            after its attention in a full step and come back, one site ahead, on a side stream in a
            partial step, so the device holds about two sites' caches instead of all of them;
            exact, for host memory and PCIe traffic. ``max_cache_bytes`` then bounds the device
            bytes only. ``prune="block"`` only.
        piecewise: compile each variant block by block (``True``, the default): a repeated block is compiled
            once and called for every block of its stack, as diffusers' regional compilation does, and each
            piece is a graph Inductor's caches can key. ``False``: each variant as one graph (Inductor may
            fuse across block boundaries; compile time grows with the depth).
        background_compile: compile the reuse and partial variants in a background thread while the first
            steps run (they run as full steps until their variant is ready), instead of stopping the run
            at their first step to compile them. ``None`` (the default): with Inductor, whose compiles
            take seconds to minutes; not with ``"aot_eager"``/``"eager"``.
        symbolic_sizes: compile the partial variant with |S| (and the context rows it leaves) as a symbol, so that
            one compilation serves every mask at a resolution. ``None`` (the default): with Inductor, whose
            compiles cost seconds to minutes; not with ``"aot_eager"``/``"eager"``, which trace a symbolic graph
            several times slower than a static one and compile a new static one in about a second.
        size_buckets: |S| is rounded up to a multiple of ``ceil(N / size_buckets)`` by computing
            extra context tokens (the most relevant ones left), so videos with different masks
            share compiled partial variants of static sizes. The partial variant compiles with |S| symbolic
            (one compilation for every mask at a resolution), so ``0`` (the default) keeps |S| exact; sizes
            the symbolic compilation does not admit (0 or 1 rows) compile on their own.
    """

    preset: str = "balanced"
    schedule: str = "adaptive"
    threshold: float = field(default=PRESETS["balanced"]["threshold"])
    warmup_steps: int = field(default=PRESETS["balanced"]["warmup_steps"])
    refresh_interval: int = field(default=PRESETS["balanced"]["refresh_interval"])
    max_consecutive_reuse: int = field(default=PRESETS["balanced"]["max_consecutive_reuse"])
    reuse_order: int = 1
    num_steps: int | None = None
    rescale: str | tuple[float, ...] | None = None
    inner_backend: str = "inductor"
    mode: str = "default"
    inductor_options: Mapping[str, object] | None = None
    max_shapes: int = 8
    max_branches: int = 4
    max_cache_bytes: int | str | None = None
    budget_branches: int = 2
    context_ratio: float = field(default=PRESETS["balanced"]["context_ratio"])
    margin_ratio: float = field(default=PRESETS["balanced"]["margin_ratio"])
    margin_radius: float = 5.0
    num_clusters: int = 16
    relevance_site: int | str = -1
    prune: str = "block"
    partial: bool = True
    cache_dtype: str | None = None
    recompute_kv: bool | None = None
    cache_device: str | None = None
    size_buckets: int = 0
    piecewise: bool = True
    background_compile: bool | None = None
    symbolic_sizes: bool | None = None

    def __post_init__(self) -> None:
        _require(self.preset in PRESETS, "preset", self.preset, f"one of {sorted(PRESETS)}")
        valid_schedule = self.schedule in SCHEDULE_MODES or bool(_FIXED_SCHEDULE.match(self.schedule))
        _require(valid_schedule, "schedule", self.schedule,
                 "'adaptive', 'full' or a string of F/P/R letters starting with F, e.g. 'FFRPRF'")
        _require(_is_number(self.threshold) and self.threshold > 0, "threshold", self.threshold, "a number > 0")
        for name, minimum in (("warmup_steps", 1), ("refresh_interval", 1), ("max_consecutive_reuse", 0),
                              ("max_branches", 1), ("budget_branches", 1), ("num_clusters", 1), ("size_buckets", 0),
                              ("max_shapes", 1)):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
                     name, value, f"an integer >= {minimum}")
        _require(self.reuse_order in (0, 1) and not isinstance(self.reuse_order, bool), "reuse_order",
                 self.reuse_order, "0 or 1")
        _require(self.num_steps is None or (isinstance(self.num_steps, int) and self.num_steps >= 1),
                 "num_steps", self.num_steps, "None or an integer >= 1")
        _require(self.max_cache_bytes is None or self.max_cache_bytes == "auto"
                 or (isinstance(self.max_cache_bytes, int) and not isinstance(self.max_cache_bytes, bool)
                     and self.max_cache_bytes >= 0),
                 "max_cache_bytes", self.max_cache_bytes, "None, 'auto' or an integer >= 0 (bytes)")
        for name in ("context_ratio", "margin_ratio"):
            value = getattr(self, name)
            _require(_is_number(value) and 0.0 <= value <= 1.0, name, value, "a number in [0, 1]")
        _require(_is_number(self.margin_radius) and self.margin_radius >= 0, "margin_radius", self.margin_radius,
                 "a number >= 0 (tokens)")
        _require(isinstance(self.relevance_site, str) or (isinstance(self.relevance_site, int)
                                                          and not isinstance(self.relevance_site, bool)),
                 "relevance_site", self.relevance_site, "an int index of a self-attention site or a module path")
        _require(self.prune in PRUNE_MODES, "prune", self.prune, f"one of {list(PRUNE_MODES)}")
        _require(isinstance(self.partial, bool), "partial", self.partial, "True or False")
        _require(isinstance(self.piecewise, bool), "piecewise", self.piecewise, "True or False")
        for name in ("background_compile", "symbolic_sizes"):
            value = getattr(self, name)
            _require(value is None or isinstance(value, bool), name, value, "None, True or False")
        _require(self.cache_dtype is None or self.cache_dtype in CACHE_DTYPES, "cache_dtype", self.cache_dtype,
                 f"None or one of {list(CACHE_DTYPES)}")
        _require(self.cache_dtype is None or self.prune == "block", "cache_dtype", self.cache_dtype,
                 "None with prune='attention' (its caches are rewritten every partial step)")
        _require(self.cache_device in (None, "cpu"), "cache_device", self.cache_device, "None or 'cpu'")
        _require(self.cache_device is None or self.prune == "block", "cache_device", self.cache_device,
                 "None with prune='attention' (its caches are rewritten every partial step)")
        _require(self.recompute_kv is None or isinstance(self.recompute_kv, bool), "recompute_kv", self.recompute_kv,
                 "None, True or False")
        _require(not self.recompute_kv or self.prune == "block", "recompute_kv", self.recompute_kv,
                 "False with prune='attention' (it caches attention outputs, not keys and values)")
        _require(self.inner_backend in INNER_BACKENDS, "inner_backend", self.inner_backend,
                 f"one of {list(INNER_BACKENDS)}")
        if self.mode in CUDAGRAPH_MODES:
            raise HetCacheOptionsError(
                f"hetcache: mode {self.mode!r} uses CUDA graphs, whose replays overwrite the outputs hetcache keeps "
                "between calls; use mode='max-autotune-no-cudagraphs' (or options={'mode': ...})")
        _require(self.mode in INDUCTOR_MODES, "mode", self.mode, f"one of {list(INDUCTOR_MODES)}")
        _require(self.inductor_options is None or isinstance(self.inductor_options, Mapping), "inductor_options",
                 self.inductor_options, "None or a dict of Inductor config patches")
        rescale_ok = (
            self.rescale is None
            or self.rescale in RESCALE_POLYNOMIALS
            or (isinstance(self.rescale, tuple | list) and len(self.rescale) > 0
                and all(_is_number(c) for c in self.rescale))
        )
        _require(rescale_ok, "rescale", self.rescale,
                 f"None, one of {sorted(RESCALE_POLYNOMIALS)} or a sequence of polynomial coefficients")

    @classmethod
    def from_options(cls, options: Mapping[str, object] | None, mode: str | None = None) -> HetCacheConfig:
        """Build a config from ``torch.compile``'s ``options`` (and ``mode``).

        Raises ``HetCacheOptionsError``, a ``ValueError``, naming the key and what is allowed.
        """
        options = dict(options or {})
        if mode is not None:
            options.setdefault("mode", mode)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise HetCacheOptionsError(f"hetcache: unknown option {unknown[0]!r}; allowed options: {sorted(known)}")
        preset = options.get("preset", "balanced")
        _require(preset in PRESETS, "preset", preset, f"one of {sorted(PRESETS)}")
        merged = {**PRESETS[preset], **options}
        if isinstance(merged.get("cache_dtype"), torch.dtype):
            merged["cache_dtype"] = str(merged["cache_dtype"]).removeprefix("torch.")
        if isinstance(merged.get("rescale"), list):
            merged["rescale"] = tuple(merged["rescale"])
        return cls(**merged)

    @property
    def compiles_in_background(self) -> bool:
        """Whether the reuse and partial variants compile in a background thread (``background_compile``)."""
        if self.background_compile is None:
            return self.inner_backend == "inductor"
        return self.background_compile

    @property
    def compiles_symbolic_sizes(self) -> bool:
        """Whether the partial variant compiles with |S| as a symbol (``symbolic_sizes``)."""
        return self.inner_backend == "inductor" if self.symbolic_sizes is None else self.symbolic_sizes

    @property
    def cache_torch_dtype(self) -> torch.dtype | None:
        return None if self.cache_dtype is None else CACHE_DTYPES[self.cache_dtype]

    def rescale_coefficients(self) -> tuple[float, ...] | None:
        if self.rescale is None:
            return None
        if isinstance(self.rescale, str):
            return RESCALE_POLYNOMIALS[self.rescale]
        return tuple(float(c) for c in self.rescale)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class HetCacheOptionsError(ValueError, ShortenTraceback):
    """A bad ``torch.compile(..., backend="hetcache", options=...)`` value.

    Raised when the compiled model is first called (torch hands the backend its options only
    then). It is a ``ValueError``; it also derives from Dynamo's ``ShortenTraceback`` so that Dynamo
    lets it reach the caller as is instead of wrapping it in ``BackendCompilerFailed``.
    """

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.first_useful_frame = None  # what ShortenTraceback would set: no frame to cut the traceback at


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise HetCacheOptionsError(f"hetcache: option {key!r} got {value!r}; allowed: {allowed}")
