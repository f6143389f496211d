"""The methods the quality benchmark compares, each as a ``Method`` that samples one clip at a time.

Every method runs the same Euler flow-matching loop as ``benchmarks/proxy/evaluate.py`` (same
noise, same sigmas, one branch, no CFG) through a *denoiser*: a callable taking the transformer's
keyword arguments. What differs is the denoiser:

- full compute and the step-skipping baseline: the proxy itself, uncompiled (fewer Euler steps);
- hetcache: ``torch.compile(model, backend="hetcache", options=...)``; each clip is a new run
  (the control video changes), the runtime notices by itself;
- diffusers' caches (FirstBlockCache, PyramidAttentionBroadcast, TaylorSeer, MagCache) and
  cache-dit's DBCache: hooks on a fresh copy of the proxy, run eagerly as their docs do; each call is
  wrapped in ``model.cache_context("cond")`` as ``WanVACEPipeline`` does, and the hooks' state is
  reset before every clip (a new video);
- the context ablation: hetcache with ``selection.select_context`` patched to an even spread, so
  the same number of context tokens is recomputed without relevance or clusters.

A method that fails to build or run is kept: ``Method.error`` says why and its row reports it.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import torch
from proxy.model import WEIGHTS_DIR, prompt_embeds, shift_sigma, vace_control
from proxy.model import load_proxy as _load_weights

from hetcache_compile import selection as hetcache_selection

STEPS = 20
WEIGHTS = WEIGHTS_DIR  # the proxy every runner loads; quality.py --proxy sets it


def load_proxy() -> torch.nn.Module:
    """A fresh copy of the proxy of this run (``WEIGHTS``, read at build time like ``STEPS``)."""
    return _load_weights(WEIGHTS)


@dataclass
class Method:
    """One method and setting: ``build()`` returns a ``Runner``; ``options`` is shown in the table."""

    family: str
    options: str
    build: Callable[[], Runner]
    note: str = ""
    steps: int | None = None  # None: the run's step count (``STEPS``); step skipping sets fewer
    hetcache: bool = False  # FLOPs priced from hc.stats (FlopCounterMode cannot see inside compiled code)
    options_dict: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.family} ({self.options})" if self.options else self.family


@dataclass
class Runner:
    """A denoiser plus what to call before each clip; ``model`` is the module whose weights it runs."""

    model: torch.nn.Module
    denoiser: Callable[..., torch.Tensor]
    start_clip: Callable[[], None] = lambda: None
    timestep: list = field(default_factory=lambda: [1000.0])


@torch.no_grad()
def euler_sample(
    runner: Runner, x0: torch.Tensor, mask: torch.Tensor, steps: int, shift: float, seed: int = 0
) -> torch.Tensor:
    """``proxy.evaluate.sample``'s Euler loop (same noise for a seed), through ``runner``'s denoiser."""
    control = vace_control(x0, mask)
    text = prompt_embeds(x0.shape[0])
    x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    sigmas = shift_sigma(torch.linspace(1.0, 0.0, steps + 1), shift)
    runner.start_clip()
    for i in range(steps):
        runner.timestep[0] = float(sigmas[i]) * 1000
        timestep = torch.full((x.shape[0],), runner.timestep[0])
        v = runner.denoiser(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=text,
            control_hidden_states=control,
            return_dict=False,
        )[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


# -- plain model, hetcache ------------------------------------------------------------------------
def plain_runner() -> Runner:
    model = load_proxy()
    return Runner(model, model)


def hetcache_runner(options: dict, inner: str) -> Callable[[], Runner]:
    """A fresh proxy compiled with the hetcache backend (``options`` plus ``inner_backend``)."""

    def build() -> Runner:
        model = load_proxy()
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="hetcache", options={"inner_backend": inner, **options})
        return Runner(model, compiled)

    return build


def _uniform_context(context: torch.Tensor, scores: torch.Tensor, hidden: torch.Tensor, ratio: float,
                     num_clusters: int) -> torch.Tensor:
    """Stands in for ``selection.select_context``: the same budget, evenly spaced in raster order."""
    budget = round(ratio * context.numel())
    if budget == 0:
        return context[:0]
    return context[torch.linspace(0, context.numel() - 1, budget).round().long()]


def uniform_context_runner(options: dict, inner: str) -> Callable[[], Runner]:
    """``hetcache_runner`` with the context tokens of S picked uniformly (an ablation, not an option)."""

    def build() -> Runner:
        runner = hetcache_runner(options, inner)()

        def denoiser(**kwargs):
            with mock.patch.object(hetcache_selection, "select_context", _uniform_context):
                return runner.denoiser(**kwargs)

        return Runner(runner.model, denoiser)

    return build


# -- diffusers hooks ------------------------------------------------------------------------------
def _hooked_runner(model: torch.nn.Module) -> Runner:
    """Wrap each call in ``cache_context("cond")``; reset the stateful hooks before each clip."""

    def denoiser(**kwargs):
        with model.cache_context("cond"):
            return model(**kwargs)

    return Runner(model, denoiser, start_clip=model._reset_stateful_cache)


def diffusers_runner(make_config: Callable[[Runner], object]) -> Callable[[], Runner]:
    """A fresh proxy with ``model.enable_cache(make_config(runner))`` (the runner gives PAB its timestep)."""

    def build() -> Runner:
        runner = _hooked_runner(load_proxy())
        runner.model.enable_cache(make_config(runner))
        return runner

    return build


def fbc(threshold: float):
    from diffusers.hooks import FirstBlockCacheConfig

    return diffusers_runner(lambda _: FirstBlockCacheConfig(threshold=threshold))


def pab(spatial: int, cross: int | None, window: tuple[int, int]):
    """PAB on ``blocks.*`` attention; the timestep callback reads the sampler's current timestep."""
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    return diffusers_runner(
        lambda r: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=spatial,
            cross_attention_block_skip_range=cross,
            spatial_attention_timestep_skip_range=window,
            cross_attention_timestep_skip_range=window,
            current_timestep_callback=lambda: r.timestep[0],
        )
    )


TAYLORSEER_WAN = [r"(vace_)?blocks\.\d+\.(attn1|attn2|ffn)"]


def taylorseer(interval: int, order: int, identifiers: list[str] | None = TAYLORSEER_WAN, before: int = 3):
    """TaylorSeer predicting attention and FFN outputs of every block (``identifiers=None``: its defaults)."""
    from diffusers.hooks import TaylorSeerCacheConfig

    return diffusers_runner(
        lambda _: TaylorSeerCacheConfig(
            cache_interval=interval,
            max_order=order,
            disable_cache_before_step=before,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=identifiers,
        )
    )


def magcache_ratios(x0: torch.Tensor, mask: torch.Tensor, shift: float, steps: int = STEPS) -> list[float]:
    """MagCache's calibration mode on one clip: the per-step residual magnitude ratios it prints."""
    from diffusers.hooks import MagCacheConfig

    runner = diffusers_runner(lambda _: MagCacheConfig(calibrate=True, num_inference_steps=steps))()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        euler_sample(runner, x0, mask, steps, shift, seed=1)
    match = re.search(r"\[([-0-9., e]+)\]", printed.getvalue())
    if match is None:
        raise RuntimeError(f"MagCache calibration printed no ratios: {printed.getvalue()!r}")
    return [float(v) for v in match.group(1).split(",")]


def magcache(threshold: float, max_skip: int, ratios: list[float], retention: float = 0.2):
    from diffusers.hooks import MagCacheConfig

    return diffusers_runner(
        lambda _: MagCacheConfig(
            threshold=threshold,
            max_skip_steps=max_skip,
            retention_ratio=retention,
            num_inference_steps=STEPS,
            mag_ratios=list(ratios),
        )
    )


# -- cache-dit ------------------------------------------------------------------------------------
def dbcache(threshold: float, fn: int = 1, bn: int = 0, warmup: int = 4, max_continuous: int = -1):
    """cache-dit's DBCache on the bare transformer (its Wan adapter and WanVACE patch functor)."""

    def build() -> Runner:
        import cache_dit
        from cache_dit import DBCacheConfig

        model = load_proxy()
        config = DBCacheConfig(
            Fn_compute_blocks=fn,
            Bn_compute_blocks=bn,
            residual_diff_threshold=threshold,
            max_warmup_steps=warmup,
            max_continuous_cached_steps=max_continuous,
            num_inference_steps=STEPS,
            enable_separate_cfg=False,
        )
        with contextlib.redirect_stdout(io.StringIO()):
            cache_dit.enable_cache(model, cache_config=config)
        return Runner(model, model, start_clip=lambda: cache_dit.refresh_context(model, num_inference_steps=STEPS))

    return build


# -- the settings of the default run --------------------------------------------------------------
HETCACHE_SETTINGS = [
    {"preset": "quality"},
    {"preset": "balanced"},
    {"preset": "fast"},
    {"preset": "fast", "max_consecutive_reuse": 4},  # past 5x
    {"preset": "fast", "max_consecutive_reuse": 5},
    # cache plans (issue 14): the proxy computes in float32, so bfloat16 halves the key/value bytes
    {"preset": "balanced", "cache_dtype": "bfloat16"},  # with the context's keys and values recomputed, as by default
    {"preset": "balanced", "cache_dtype": "float8_e4m3fn"},
    {"preset": "balanced", "recompute_kv": False},  # keys and values stored, the default until 2026-12-06
    {"preset": "balanced", "cache_dtype": "float8_e4m3fn", "recompute_kv": False},
    {"preset": "balanced", "partial": False},
    {"preset": "fast", "partial": False},
    # zeroth-order reuse (the cached residual as is, the paper's reuse)
    {"preset": "balanced", "reuse_order": 0},
    # the adaptive presets before the cadence presets (until 2026-12-03)
    {"threshold": 1.2, "warmup_steps": 2, "refresh_interval": 5, "max_consecutive_reuse": 2, "context_ratio": 0.1,
     "margin_ratio": 0.5},
    {"threshold": 1.5, "warmup_steps": 2, "refresh_interval": 5, "max_consecutive_reuse": 3, "context_ratio": 0.1,
     "margin_ratio": 0.5},
    # partial steps only, no reuse between them: the cached context goes stale
    {"preset": "balanced", "max_consecutive_reuse": 0, "margin_ratio": 0.25},
    # the context share (on `tiles` every unedited token is margin at the default radius: margin_radius=1 rows)
    {"preset": "balanced", "context_ratio": 0.0},
    {"preset": "balanced", "context_ratio": 0.3},
    {"preset": "balanced", "margin_radius": 1},
    {"preset": "balanced", "margin_radius": 1, "context_ratio": 0.3},
]
# Ablation of the context choice: the same |S|, the context share spread evenly over the context
# tokens in raster order, with no relevance and no clusters (``uniform_context_runner``).
UNIFORM_CONTEXT_SETTINGS = [
    {"preset": "balanced", "context_ratio": 0.3},
    {"preset": "balanced", "margin_radius": 1, "context_ratio": 0.3},
]
WRONG_HINTS = "wrong on WanVACE: the cached residual already holds the VACE hints, added again (reference.md)"
NOTES = {
    "FirstBlockCache": WRONG_HINTS,
    "MagCache": WRONG_HINTS + "; mag_ratios from its calibration mode on training clip 0",
    "PyramidAttentionBroadcast": "hooks blocks.* attention; CFG defect n/a (no CFG here)",
    "TaylorSeer": "cache_identifiers (vace_)?blocks.N.(attn1|attn2|ffn), float32 factors",
    "DBCache (cache-dit)": "cache-dit 1.5.3 Wan adapter + WanVACE patch functor (hints added in the blocks)",
}


def _describe(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def default_methods(inner: str, ratios: list[float], steps: int = STEPS,
                    settings: list[dict] | None = None) -> list[Method]:
    """Every method and setting of a run of ``steps`` Euler steps (full compute first).

    Step skipping keeps the same fractions of the steps at any step count (10 .. 3 of 20).
    ``settings`` replaces the hetcache rows (``HETCACHE_SETTINGS`` and the uniform-context ablation)."""
    methods = [Method("full compute", f"eager, {steps} steps", plain_runner)]
    skipped = sorted({max(2, round(k * steps / 20)) for k in (10, 7, 6, 5, 4, 3)} - {steps}, reverse=True)
    methods += [Method("step skipping", f"{k} Euler steps", plain_runner, steps=k) for k in skipped]
    methods += [
        Method("hetcache", _describe(o), hetcache_runner(o, inner), hetcache=True, options_dict=o)
        for o in (HETCACHE_SETTINGS if settings is None else settings)
    ]
    methods += [
        Method("hetcache", _describe(o) + ", context picked uniformly (ablation)", uniform_context_runner(o, inner),
               hetcache=True, options_dict=o)
        for o in (UNIFORM_CONTEXT_SETTINGS if settings is None else [])
    ]
    methods += [Method("FirstBlockCache", f"threshold={t}", fbc(t)) for t in (0.02, 0.05, 0.1, 0.2, 0.4)]
    methods += [
        Method("PyramidAttentionBroadcast", f"spatial skip {k}, timesteps {w}", pab(k, None, w))
        for k, w in ((2, (100, 800)), (3, (100, 800)), (4, (100, 800)), (2, (0, 1000)), (4, (0, 1000)))
    ]
    methods.append(
        Method("PyramidAttentionBroadcast", "spatial 3 + cross 3, timesteps (100, 800)", pab(3, 3, (100, 800)))
    )
    methods += [
        Method("TaylorSeer", f"interval {k}, order {o}", taylorseer(k, o))
        for k, o in ((2, 1), (3, 1), (4, 1), (6, 1), (8, 1), (3, 2), (6, 2))
    ]
    methods.append(
        Method(
            "TaylorSeer",
            "interval 3, default identifiers",
            taylorseer(3, 1, identifiers=None),
            note="default identifiers (^blocks.*attn, fullmatch) hook nothing on Wan: plain model",
        )
    )
    methods += [
        Method("MagCache", f"threshold={t}, max_skip 3", magcache(t, 3, ratios)) for t in (0.02, 0.06, 0.12, 0.25)
    ]
    methods += [
        Method("DBCache (cache-dit)", f"F{f}B{b}, threshold={t}, warmup {w}", dbcache(t, f, b, w))
        for f, b, t, w in (
            (1, 0, 0.05, 2),
            (1, 0, 0.1, 2),
            (1, 0, 0.2, 2),
            (1, 0, 0.4, 2),
            (1, 1, 0.2, 2),
            (1, 0, 0.2, 4),
        )
    ]
    for method in methods:
        method.note = method.note or NOTES.get(method.family, "")
    return methods


def compiled_runner() -> Runner:
    """The proxy under plain ``torch.compile`` (Inductor), full compute."""
    model = load_proxy()
    torch._dynamo.reset()
    return Runner(model, torch.compile(model))
