"""Host offload of the context caches (``cache_device="cpu"``): the graph ops that move them, and where they go.

Contract: three custom ops, registered on first use by ``offload_ops()``:

- ``hetcache::to_host(x) -> Tensor``: a host copy of device tensor ``x`` (pinned memory on CUDA),
  made on a side stream once the compute stream has produced ``x``; the host copy is valid once
  ``wait_for_host_copies(device)`` returns. The record graph calls it right after each site's
  attention, so that site's keys and values leave the device while the next blocks run.
- ``hetcache::to_device(host, like) -> Tensor``: a copy of ``host`` on ``like``'s device, started on
  the side stream when the compute stream reaches ``like`` (the partial graph passes the previous
  site's query, so the copy for site j overlaps the attention block j - 1);
- ``hetcache::ready(x) -> Tensor``: the compute stream waits for the side stream's copies, then
  copies ``x`` (a device-to-device copy, small beside the attention it feeds): readers of the
  result cannot run before the wait, however the graph is functionalized or reordered.

Where no stream is involved (tensors already on the host) the ops copy synchronously, so the same
graphs run, exactly, on a CPU machine. ``offload(graph, nodes, before)`` and ``fetch(graph, stored,
anchor, start_before, use_before)`` insert the ops into a graph.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.fx as fx


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream cache copies run on, one per CUDA device, made on first use."""
    return torch.cuda.Stream(device)


def wait_for_host_copies(device: torch.device) -> None:
    """Block until every ``to_host`` copy issued for ``device`` has landed (no-op off CUDA)."""
    if device.type == "cuda":
        side_stream(device).synchronize()


@functools.cache
def offload_ops() -> tuple:
    """Register the three ops once; returns ``(to_host, to_device, ready)`` as ``torch.ops`` overloads."""

    @torch.library.custom_op("hetcache::to_host", mutates_args=())
    def to_host(x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            return x.clone(memory_format=torch.contiguous_format)
        stream, host = side_stream(x.device), torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            host.copy_(x, non_blocking=True)
        x.record_stream(stream)  # x may be freed on the compute stream before the copy has read it
        return host

    @to_host.register_fake
    def _(x):
        return torch.empty(x.shape, dtype=x.dtype, device="cpu")

    @torch.library.custom_op("hetcache::to_device", mutates_args=())
    def to_device(host: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.device.type != "cuda":
            return host.to(like.device, copy=True)
        out = torch.empty(host.shape, dtype=host.dtype, device=like.device)  # owned by the compute stream
        stream = side_stream(like.device)
        stream.wait_stream(torch.cuda.current_stream(like.device))  # out's memory may still be read there
        with torch.cuda.stream(stream):
            out.copy_(host, non_blocking=True)
        out.record_stream(stream)
        return out

    @to_device.register_fake
    def _(host, like):
        return torch.empty(host.shape, dtype=host.dtype, device=like.device)

    @torch.library.custom_op("hetcache::ready", mutates_args=())
    def ready(x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":  # waits for every copy issued so far: this one, perhaps the next too
            torch.cuda.current_stream(x.device).wait_stream(side_stream(x.device))
        return x.clone(memory_format=torch.contiguous_format)

    @ready.register_fake
    def _(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    return torch.ops.hetcache.to_host.default, torch.ops.hetcache.to_device.default, torch.ops.hetcache.ready.default


def offload(graph: fx.Graph, nodes: Sequence[fx.Node], before: fx.Node) -> list[fx.Node]:
    """Insert, before ``before``, a host copy of each of ``nodes``; returns the copies' nodes."""
    to_host, _, _ = offload_ops()
    with graph.inserting_before(before):  # detached: caches carry no gradient (the ops have no autograd formula)
        return [graph.call_function(to_host, (graph.call_method("detach", (node,)),)) for node in nodes]


def fetch(graph: fx.Graph, stored: Sequence[fx.Node], anchor: fx.Node, start_before: fx.Node,
          use_before: fx.Node) -> list[fx.Node]:
    """Copy each host tensor of ``stored`` to ``anchor``'s device: the copies start before
    ``start_before``; returns nodes, inserted before ``use_before``, of the device tensors once
    the compute stream has waited for them."""
    _, to_device, ready = offload_ops()
    with graph.inserting_before(start_before):
        anchor = graph.call_method("detach", (anchor,))
        copies = [graph.call_function(to_device, (node, anchor)) for node in stored]
    with graph.inserting_before(use_before):
        return [graph.call_function(ready, (copy,)) for copy in copies]
