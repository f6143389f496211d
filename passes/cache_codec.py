"""How the partial steps' context caches are stored between steps: as computed, narrower, or float8.

Contract: a ``CacheCodec`` rewrites both ends of a cache. ``encode(graph, node)`` inserts, before
the record graph's output, the nodes that turn one cache tensor (keys or values ``[..., N, D]``)
into its stored form and returns them: the tensor itself (``dtype=None``), the tensor cast to a
narrower float type (bfloat16, float16), or for float8 the data and a float32 scale per row of
the last axis (per token and head: ``scale = amax(|x|) / max_float8``, shaped ``[..., N, 1]``).
``decode(graph, stored, dtype, before)`` inserts, before ``before``, the inverse back to the
compute ``dtype`` and returns its node; Inductor fuses it into the consumer. Both are calls of the
tensor functions ``encode_cache`` / ``decode_cache``, the one definition of the stored form. Every stored tensor
keeps the token axis at ``-2``, so the runtime may ``index_select`` rows of any of them alike.
``names(base)`` gives the placeholder names of one stored cache (``base``, ``base_scale``).

>>> import torch
>>> codec = CacheCodec(torch.float8_e4m3fn)
>>> codec.names("hetcache_k0"), codec.tensors_per_cache
(['hetcache_k0', 'hetcache_k0_scale'], 2)
>>> x = torch.randn(2, 4, 16, 8)
>>> data, scale = codec.encode_tensor(x)
>>> bool(((codec.decode_tensor(data, scale, x.dtype) - x).abs() <= 0.07 * x.abs().amax(-1, keepdim=True)).all())
True
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

FLOAT8_DTYPES = (torch.float8_e4m3fn,)
NARROW_DTYPES = (torch.bfloat16, torch.float16)
_TINY_SCALE = 1e-12  # keeps all-zero rows finite


@dataclass(frozen=True)
class CacheCodec:
    """Storage of one cache tensor; ``dtype=None`` stores it as computed."""

    dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in FLOAT8_DTYPES + NARROW_DTYPES:
            raise ValueError(f"cannot store caches as {self.dtype}; choose one of {FLOAT8_DTYPES + NARROW_DTYPES}")

    @property
    def scaled(self) -> bool:
        return self.dtype in FLOAT8_DTYPES

    @property
    def tensors_per_cache(self) -> int:
        return 2 if self.scaled else 1

    def names(self, base: str) -> list[str]:
        return [base, f"{base}_scale"] if self.scaled else [base]

    # -- graph rewriting: the graph calls the tensor functions below ------------------------------
    def encode(self, graph: fx.Graph, node: fx.Node, before: fx.Node) -> list[fx.Node]:
        if self.dtype is None:
            return [node]
        with graph.inserting_before(before):
            stored = graph.call_function(encode_cache, (node, self.dtype))
            return [graph.call_function(operator.getitem, (stored, i)) for i in range(self.tensors_per_cache)]

    def decode(self, graph: fx.Graph, stored: list[fx.Node], dtype: torch.dtype, before: fx.Node) -> fx.Node:
        if self.dtype is None:
            return stored[0]
        with graph.inserting_before(before):
            return graph.call_function(decode_cache, (tuple(stored), dtype))

    # -- the same on tensors (examples for shape propagation, tests) --------------------------------
    def encode_tensor(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x] if self.dtype is None else list(encode_cache(x, self.dtype))

    def decode_tensor(self, *stored_and_dtype) -> torch.Tensor:
        *stored, dtype = stored_and_dtype
        return stored[0] if self.dtype is None else decode_cache(tuple(stored), dtype)

    def empty_like(self, value: torch.Tensor, token_rows: int) -> list[torch.Tensor]:
        """Empty stored tensors for a cache shaped like ``value`` with ``token_rows`` rows on axis -2."""
        shape = (*value.shape[:-2], token_rows, value.shape[-1])
        if self.dtype is None:
            return [torch.empty(shape, dtype=value.dtype, device=value.device)]
        data = torch.empty(shape, dtype=self.dtype, device=value.device)
        if not self.scaled:
            return [data]
        return [data, torch.empty((*shape[:-1], 1), dtype=torch.float32, device=value.device)]


def encode_cache(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``x`` in its stored form: cast to ``dtype``, or for float8 the scaled data and its row scales."""
    if dtype not in FLOAT8_DTYPES:
        return (x.to(dtype),)
    value = x.float()
    scale = (value.abs().amax(-1, keepdim=True) / torch.finfo(dtype).max).clamp_min(_TINY_SCALE)
    return (value / scale).to(dtype), scale


def decode_cache(stored: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """The inverse of ``encode_cache``, back to the compute ``dtype``."""
    if len(stored) == 1:
        return stored[0].to(dtype)
    data, scale = stored
    return (data.float() * scale).to(dtype)
