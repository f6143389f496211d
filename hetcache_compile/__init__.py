"""hetcache_compile: a torch.compile backend for HetCache on diffusion transformers.

Use it with no import at all::

    model = torch.compile(model, backend="hetcache")

and import this package only for the helpers: ``HetCacheConfig``, ``set_mask``, ``stats``,
``reset``, ``explain``.
"""

from pathlib import Path as _Path

if not (_Path(__file__).parent / "passes").is_dir():  # source checkout: passes/ sits beside us
    __path__.append(str(_Path(__file__).resolve().parent.parent))  # noqa: F821 - package __path__

from .api import explain, reset, runtimes, set_mask, stats  # noqa: E402
from .config import HetCacheConfig, HetCacheOptionsError  # noqa: E402
from .schedule import StepKind  # noqa: E402
from .stats import BranchStats, HetCacheStats  # noqa: E402

__all__ = ["BranchStats", "HetCacheConfig", "HetCacheOptionsError", "HetCacheStats", "StepKind", "explain", "reset",
           "runtimes", "set_mask", "stats"]
__version__ = "0.1.0"
