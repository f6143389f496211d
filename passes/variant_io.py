"""What each variant takes and returns beyond the Dynamo graph's own inputs and outputs: one definition.

Every variant's placeholders are the graph's, followed by the ones below in this order, and its
outputs are the graph's ``num_outputs`` outputs followed by the ones below. The passes build the
graphs to it; the runtime, the memory model and the benchmarks call and unpack them with it.

========  =========================================================  ==========================================
variant   inputs added                                               outputs added
========  =========================================================  ==========================================
full      none                                                       residual
record    none                                                       residual, exit, caches..., query, key
reuse     ``hetcache_residual``                                      none
partial   ``partial_input_names(...)``: index, exit cache, [context  residual, exit (``prune="attention"``:
          index with ``recompute``], caches...                       then the new attention caches)
========  =========================================================  ==========================================

The residual is the block stack's total change to the token stream, the exit its final hidden
states of all tokens; the caches are the per-site tensors of ``cache_codec.py`` (keys and values,
or their projection input with ``recompute``, or attention outputs with ``prune="attention"``);
query and key are the relevance site's, for token selection.

>>> outputs = ("sample", "residual", "exit", "k0", "v0", "query", "key")
>>> step = StepOutputs.of_record(outputs, num_outputs=1)
>>> step.model, step.caches, step.selection_inputs
(('sample',), ('k0', 'v0'), ('query', 'key'))
>>> partial_input_names(1, recompute=True)
['hetcache_index', 'hetcache_exit_cache', 'hetcache_context_index', 'hetcache_x0']
>>> partial_sizes(partial_input_names(1, recompute=True))
{0: {0: 'selected'}, 2: {0: 'context'}, 3: {-2: 'context'}}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .cache_codec import CacheCodec

RESIDUAL_INPUT = "hetcache_residual"
INDEX_INPUT = "hetcache_index"
EXIT_CACHE_INPUT = "hetcache_exit_cache"
CONTEXT_INDEX_INPUT = "hetcache_context_index"


def partial_input_names(num_sites: int, prune: str = "block", codec: CacheCodec = CacheCodec(),
                        recompute: bool = False) -> list[str]:
    """Placeholder names the partial variant adds, in order (``partial_arguments`` gives their values)."""
    if prune == "attention":
        return [INDEX_INPUT] + [f"hetcache_a{j}" for j in range(num_sites)]
    names = [INDEX_INPUT, EXIT_CACHE_INPUT]
    if recompute:
        names.append(CONTEXT_INDEX_INPUT)
        for j in range(num_sites):
            names += codec.names(f"hetcache_x{j}")
        return names
    for j in range(num_sites):
        names += codec.names(f"hetcache_k{j}") + codec.names(f"hetcache_v{j}")
    return names


def partial_sizes(names: Sequence[str]) -> dict[int, dict[int, str]]:
    """Which sizes of the partial variant's added inputs ``names`` change with the mask: position among
    ``names`` -> {dim: ``"selected"`` (|S|) or ``"context"`` (the context rows the caches hold)}. The context
    caches hold their token rows in dim -2 (keys and values as attention reads them, their projection
    input, float8 scales); ``prune="attention"``'s caches hold every token."""
    sizes: dict[int, dict[int, str]] = {}
    for position, name in enumerate(names):
        if name == INDEX_INPUT:
            sizes[position] = {0: "selected"}
        elif name == CONTEXT_INDEX_INPUT:
            sizes[position] = {0: "context"}
        elif name.startswith(CONTEXT_CACHE_PREFIXES):
            sizes[position] = {-2: "context"}
    return sizes


CONTEXT_CACHE_PREFIXES = ("hetcache_k", "hetcache_v", "hetcache_x")


def partial_arguments(index: object, exit: object, context: object, caches: Sequence[object], prune: str = "block",
                      recompute: bool = False) -> list:
    """The values of ``partial_input_names`` for one call: S, the exit cache, the context rows' index
    (read only with ``recompute``) and the per-site caches, in the order the caches were recorded."""
    if prune == "attention":
        return [index, *caches]
    return [index, exit, *([context] if recompute else []), *caches]


def record_outputs(residual: object, exit: object, caches: Sequence[object],
                   selection_inputs: Sequence[object]) -> tuple:
    """The record variant's outputs after the graph's: ``StepOutputs.of_record`` reads them back."""
    return (residual, exit, *caches, *selection_inputs)


@dataclass(frozen=True)
class StepOutputs:
    """A computed step's outputs, split: the model's, then what hetcache keeps for the steps after it."""

    model: tuple
    residual: object
    exit: object = None  # None from the full variant
    caches: tuple = ()
    selection_inputs: tuple | None = None  # (query, key) from the record variant

    @classmethod
    def of_full(cls, outputs: Sequence[object], num_outputs: int) -> StepOutputs:
        return cls(tuple(outputs[:num_outputs]), outputs[num_outputs])

    @classmethod
    def of_record(cls, outputs: Sequence[object], num_outputs: int) -> StepOutputs:
        residual, exit, *caches, query, key = outputs[num_outputs:]
        return cls(tuple(outputs[:num_outputs]), residual, exit, tuple(caches), (query, key))

    @classmethod
    def of_partial(cls, outputs: Sequence[object], num_outputs: int) -> StepOutputs:
        residual, exit, *caches = outputs[num_outputs:]
        return cls(tuple(outputs[:num_outputs]), residual, exit, tuple(caches))
