"""Specialize a dynamic-shaped Dynamo graph to the concrete shapes of one call.

Contract: ``specialize_shapes(gm, args)`` takes a graph Dynamo traced with symbolic shapes
(``dynamic=True``, or the automatic recompile after a second input shape) and the real arguments
of one call. It returns a new GraphModule in which every symbolic scalar input is replaced by
its value in ``args``, and so is every ``.item()`` of a 0-d tensor input (the float attributes
Dynamo turns into tensors under dynamic shapes: norm epsilons, LoRA scales), and every node's
``example_value`` holds a static fake tensor of this call; plus the arguments that graph takes
(``args`` without the scalars) and their positions in ``args``. ``specialization_key(args)``
names what the result depends on. The analysis passes then see an ordinary static graph. ``gm``
is not modified.

Why: every variant is specialized to its token count, and the caches it exchanges have fixed
shapes; a dynamic graph is rewritten once per concrete shape instead (the runtime keeps a bounded
number of them).

>>> import torch, torch.fx as fx
>>> class Scale(torch.nn.Module):
...     def forward(self, x, n: int):
...         return (x * n,)
>>> static, static_args, kept = specialize_shapes(fx.symbolic_trace(Scale()), [torch.ones(2), 3])
>>> kept, static(*static_args)[0].tolist()
((0,), [3.0, 3.0])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from .graph_utils import copy_graph_module, finalize, placeholders
from .token_axis import propagate_fake_shapes

_SCALARS = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)


def is_symbolic(example_inputs: Sequence[object]) -> bool:
    """Whether Dynamo traced the graph with symbolic shapes (symbolic scalars among its inputs, or
    fake values with symbolic sizes)."""
    for value in example_inputs:
        if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
            return True
        if isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape):
            return True
    return False


def specialization_key(args: Sequence[object]) -> tuple:
    """What ``specialize_shapes`` bakes in: tensor shapes, scalar values and 0-d tensor values."""
    return tuple(_key(a) for a in args if not isinstance(a, torch.nn.Parameter))


def _key(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return ("0-d", value.item()) if value.dim() == 0 else tuple(value.shape)
    return value


def specialize_shapes(gm: fx.GraphModule, args: Sequence[object]) -> tuple[fx.GraphModule, list, tuple[int, ...]]:
    static = copy_graph_module(gm)
    graph = static.graph
    kept = []
    for position, (node, value) in enumerate(zip(placeholders(graph), args)):
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            _fold_items(graph, node, value.item())
        if isinstance(value, _SCALARS):
            _replace_uses(node, _python_scalar(value))
            graph.erase_node(node)
        else:
            kept.append(position)
    _fold_scalar_arithmetic(graph)
    static_args = [args[i] for i in kept]
    finalize(static)
    propagate_fake_shapes(static, static_args)
    for node in graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]
    return static, static_args, tuple(kept)


def _replace_uses(node: fx.Node, constant: object) -> None:
    for user in list(node.users):
        user.args = map_arg(user.args, lambda n: constant if n is node else n)
        user.kwargs = map_arg(user.kwargs, lambda n: constant if n is node else n)


def _fold_scalar_arithmetic(graph: fx.Graph) -> None:
    """Replace arithmetic on the substituted scalars by its value, so that sizes Dynamo computed from them
    (diffusers' Ulysses attention reshapes to ``S // world`` rows) read as plain integers to the passes."""
    for node in list(graph.nodes):
        if (node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator")
                and node.args and all(isinstance(a, int | float | bool) for a in node.args) and not node.kwargs):
            _replace_uses(node, node.target(*node.args))
            graph.erase_node(node)


def _fold_items(graph: fx.Graph, node: fx.Node, constant: object) -> None:
    """Replace ``node.item()`` by its value (fake tensors cannot guard on an unknown scalar)."""
    for user in list(node.users):
        if user.op == "call_method" and user.target == "item":
            _replace_uses(user, constant)
            graph.erase_node(user)


def _python_scalar(value: object) -> int | float | bool:
    if isinstance(value, torch.SymInt):
        return int(value)
    if isinstance(value, torch.SymFloat):
        return float(value)
    if isinstance(value, torch.SymBool):
        return bool(value)
    return value
