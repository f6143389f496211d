"""FX passes of hetcache_compile: graph analyses and rewrites, no runtime state.

Installed as ``hetcache_compile.passes``. Entry points: ``analyze`` and ``build_variants``
(see ``pipeline``); each pass lives in its own module with its contract in the docstring.
"""

from .attention import AttentionSite, find_attention_sites
from .errors import PassFailed, RewriteRefused
from .partial import build_partial_variant
from .pipeline import GraphAnalysis, Variants, analyze, build_variants
from .probe import ModulationSignal, extract_probe, find_modulation
from .record import build_full_variant
from .reuse import build_reuse_variant
from .specialize import is_symbolic, specialization_key, specialize_shapes
from .token_axis import check_token_local, find_token_inputs
from .token_region import TokenRegion, find_token_region
from .variant_io import RESIDUAL_INPUT, StepOutputs, partial_arguments, partial_input_names, partial_sizes

__all__ = [
    "AttentionSite",
    "GraphAnalysis",
    "ModulationSignal",
    "PassFailed",
    "RESIDUAL_INPUT",
    "RewriteRefused",
    "StepOutputs",
    "TokenRegion",
    "Variants",
    "analyze",
    "build_full_variant",
    "build_partial_variant",
    "check_token_local",
    "find_token_inputs",
    "build_reuse_variant",
    "build_variants",
    "extract_probe",
    "find_attention_sites",
    "find_modulation",
    "find_token_region",
    "is_symbolic",
    "partial_arguments",
    "partial_input_names",
    "partial_sizes",
    "specialization_key",
    "specialize_shapes",
]
