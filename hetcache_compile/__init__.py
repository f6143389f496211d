"""hetcache_compile: a torch.compile backend for HetCache on diffusion transformers.

Use it with no import at all::

    model = torch.compile(model, backend="hetcache")

and import this package only for the helpers: ``HetCacheConfig``, ``set_mask``, ``stats``,
``reset``, ``explain``, ``finish_compiling``, and ``cp_plan`` (context parallelism for models diffusers has no plan for).
"""

from .api import explain, finish_compiling, reset, runtimes, set_mask, stats
from .config import HetCacheConfig, HetCacheOptionsError
from .parallel import cp_plan
from .schedule import StepKind
from .stats import BranchStats, HetCacheStats

__all__ = ["BranchStats", "HetCacheConfig", "HetCacheOptionsError", "HetCacheStats", "StepKind", "cp_plan", "explain",
           "finish_compiling", "reset", "runtimes", "set_mask", "stats"]
__version__ = "0.1.0"
