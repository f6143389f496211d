"""Measurements shared by the tests and the benchmarks."""

from __future__ import annotations

import gc

import torch


def live_tensor_bytes() -> int:
    """Bytes of the distinct real tensor storages alive now (fake and meta tensors excluded)."""
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not isinstance(obj, FakeTensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
