"""Per-model state of one compiled graph.

Dynamo compiles one graph for every instance of a module class (parameters are graph inputs), so
Wan 2.2's two experts, or two pipelines in one server, reach the same backend callable. Every
piece of state (caches, branches, masks, statistics) therefore belongs to the model instance a
call is for, told apart by the identity of a parameter the call receives.

>>> import torch
>>> table = InstanceTable(list)
>>> a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
>>> table.get(a).append("call"); table.get(b), table.get(a)
([], ['call'])
>>> del a; len(table)
1
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class InstanceTable(Generic[T]):
    """Values made by ``factory``, one per model instance, keyed by a parameter tensor's identity.

    Entries go when their key tensor is freed, so a deleted model's caches are freed with it.
    ``None`` is the key of a graph that receives no parameter (one shared entry).
    """

    def __init__(self, factory: Callable[[], T]):
        self._factory = factory
        self._entries: dict[int, tuple[weakref.ref | None, T]] = {}

    def get(self, key: torch.Tensor | None) -> T:
        slot = 0 if key is None else id(key)
        entry = self._entries.get(slot)
        if entry is not None and (entry[0] is None or entry[0]() is key):
            return entry[1]
        ref = None if key is None else weakref.ref(key, self._forget(slot))
        value = self._factory()
        self._entries[slot] = (ref, value)
        return value

    def find(self, key: torch.Tensor | None) -> T | None:
        """The value of ``key``'s instance if it has one (``get`` without creating)."""
        entry = self._entries.get(0 if key is None else id(key))
        if entry is not None and (entry[0] is None or entry[0]() is key):
            return entry[1]
        return None

    def _forget(self, slot: int) -> Callable[[weakref.ref], None]:
        def forget(dead: weakref.ref) -> None:
            entry = self._entries.get(slot)
            if entry is not None and entry[0] is dead:
                del self._entries[slot]
        return forget

    def items(self) -> Iterator[tuple[torch.Tensor | None, T]]:
        """(key tensor, value) of each live instance; the key is None for the shared entry."""
        for ref, value in list(self._entries.values()):
            key = None if ref is None else ref()
            if ref is None or key is not None:
                yield key, value

    def values(self) -> Iterator[T]:
        return (value for _, value in self.items())

    def matching(self, parameter_ids: set[int]) -> list[T]:
        """Values of the instances whose key is one of ``parameter_ids`` (a model's parameters)."""
        return [value for key, value in self.items() if key is None or id(key) in parameter_ids]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return sum(1 for _ in self.items())


def instance_position(example_inputs) -> int | None:
    """Position of the parameter whose identity keys a call's model instance (the graph's first)."""
    return next((i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)), None)


class CompiledFrom:
    """The parameters a graph was compiled with, held weakly: ids of freed tensors are reused by
    new ones, so a match is by identity of tensors still alive."""

    def __init__(self, example_inputs):
        self._refs = [weakref.ref(x) for x in example_inputs if isinstance(x, torch.nn.Parameter)]

    def intersects(self, parameter_ids: set[int]) -> bool:
        for ref in self._refs:
            tensor = ref()
            if tensor is not None and id(tensor) in parameter_ids:
                return True
        return False
