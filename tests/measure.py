"""Measurements shared by the tests and the benchmarks."""

from __future__ import annotations

import gc
import warnings

import torch


def live_tensor_bytes() -> int:
    """Bytes of the distinct real tensor storages alive now (fake and meta tensors excluded)."""
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance on every object touches deprecated module attributes
        warnings.simplefilter("ignore", FutureWarning)
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and not isinstance(obj, FakeTensor) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
