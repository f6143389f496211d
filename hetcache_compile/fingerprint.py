"""Content keys of tensors: how the runtime tells CFG branches and new videos apart."""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch


def fingerprint(tensor: torch.Tensor) -> tuple:
    """Cheap content key of a tensor: shape, dtype and two reductions (one host sync)."""
    values = tensor.detach().float()
    sums = torch.stack([values.sum(), values.abs().sum()]).tolist()
    return tuple(tensor.shape), str(tensor.dtype), tuple(round(v, 4) for v in sums)


class FingerprintCache:
    """Remembers fingerprints of tensor objects (by weak reference and version counter), so that the
    same tensor passed again (a pipeline's prompt embeddings, the control video) costs no reduction
    and no host sync. A new tensor, even at a recycled address, is fingerprinted afresh."""

    def __init__(self, size: int = 512):
        self.size = size
        self.entries: OrderedDict[int, tuple] = OrderedDict()

    def __call__(self, tensor: torch.Tensor) -> tuple:
        entry = self.entries.get(id(tensor))
        if entry is not None:
            ref, version, value = entry
            if ref() is tensor and version == tensor._version:
                return value
        value = fingerprint(tensor)
        self.entries[id(tensor)] = (weakref.ref(tensor), tensor._version, value)
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value
