"""Small helpers shared by the passes: module paths, placeholder roles, copying, pruning.

Nothing here knows about runtime state; every function is pure with respect to its inputs
except where a docstring says it edits the graph it is given.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import operator
import re
from collections.abc import Iterable, Iterator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

# the model is L['self'], or, in a frame resumed inside a diffusers hook (context parallelism), the bound
# forward's owner: L['function_reference'].forward.__self__
_DYNAMO_MODULE_PREFIX = re.compile(r"^L\['[^']+'\](?:\.forward\.__self__)?\.?")
_DICT_MODULES = re.compile(r"__dict__\['_modules'\]\['([^']+)'\]")
# a submodule reached through a diffusers hook's forward wrapper: blocks.0.forward.func.__closure__.0.cell_contents...
_HOOKED_FORWARD = re.compile(r"\.forward\.func\.__closure__\.\d+\.cell_contents(?:\.forward\.__self__)?")
_BLOCK_PATH = re.compile(r"^(?P<stack>[A-Za-z_][\w.]*?)\.(?P<index>\d+)$")


def normalize_module_path(raw: str) -> str:
    """Turn Dynamo's ``L['self'].__dict__['_modules']['blocks'].0.attn1`` into ``blocks.0.attn1``."""
    path = _DICT_MODULES.sub(r"\1", raw)
    path = _DYNAMO_MODULE_PREFIX.sub("", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = _HOOKED_FORWARD.sub("", path)
    return path.strip(".")


def module_paths(node: fx.Node) -> list[str]:
    """Normalized owning-module paths of ``node``, outermost first (empty for top-level code)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [normalize_module_path(path) for path, _ in stack.values()]


def owning_block(node: fx.Node) -> str | None:
    """The outermost ``<stack>.<index>`` module that owns ``node`` (e.g. ``vace_blocks.3``)."""
    for path in module_paths(node):
        if _BLOCK_PATH.match(path):
            return path
    return None


def split_block_path(block: str) -> tuple[str, int]:
    """``"blocks.12"`` -> ``("blocks", 12)``."""
    match = _BLOCK_PATH.match(block)
    if match is None:
        raise ValueError(f"{block!r} is not a '<stack>.<index>' block path")
    return match["stack"], int(match["index"])


def example_value(node: fx.Node):
    """The example (usually fake) value Dynamo recorded for ``node``, or None."""
    return node.meta.get("example_value", node.meta.get("val"))


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return None


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes the storage of ``tensors`` takes (real or fake; views counted at their own size)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def call_argument(node: fx.Node, position: int, name: str) -> object:
    """The argument of the call ``node`` at ``position`` if passed positionally, else the keyword ``name``."""
    return node.args[position] if len(node.args) > position else node.kwargs.get(name)


def is_state_placeholder(node: fx.Node, example: object) -> bool:
    """True for placeholders that carry module parameters or buffers rather than user inputs."""
    return isinstance(example, torch.nn.Parameter) or is_state_placeholder_name(node.name)


def is_state_placeholder_name(name: str) -> bool:
    """Whether Dynamo's name for a placeholder is that of a module's parameter, buffer or attribute (a LoRA
    scale Dynamo reads as a tensor), of the model as ``self`` or reached through a diffusers hook's bound
    forward (``l_function_reference_forward_self_...``, context parallelism)."""
    return (name.startswith(("l_self_", "l_function_reference_forward_self_")) or "_buffers_" in name
            or "_parameters_" in name)


def placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [node for node in graph.nodes if node.op == "placeholder"]


def output_node(graph: fx.Graph) -> fx.Node:
    return next(node for node in reversed(graph.nodes) if node.op == "output")


_METADATA_ONLY_METHODS = {"new_zeros", "new_ones", "new_empty", "new_full", "size", "dim", "stride", "numel"}
_METADATA_ONLY_FUNCTIONS = {torch.empty_like, torch.zeros_like, torch.ones_like, torch.ops.aten.sym_size.int,
                            torch.ops.aten.sym_stride.int, torch.ops.aten.sym_numel.default}


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs whose *values* ``node`` reads (``x.type_as(y)`` reads only y's dtype, so not y)."""
    if node.op == "call_method" and node.target == "type_as":
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
    if node.op == "call_method" and node.target in _METADATA_ONLY_METHODS:
        return []
    if node.op == "call_function" and node.target in _METADATA_ONLY_FUNCTIONS:
        return []
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "dtype", "device", "ndim"):
        return []
    return node.all_input_nodes


def ancestors(nodes: Iterable[fx.Node], values_only: bool = False, writes: bool = False) -> set[fx.Node]:
    """All nodes that ``nodes`` depend on, the nodes themselves included.

    With ``values_only`` an edge counts only when the value is read (see ``data_inputs``). With
    ``writes`` a tensor also depends on what was written into it in place (Wan's RoPE fills
    ``out = empty_like(x)`` with ``out[..., 0::2] = ...``, and FX sees only the ``empty_like``).
    """
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(data_inputs(node) if values_only else node.all_input_nodes)
        if writes:
            stack.extend(user for user in node.users if mutated_argument(user) is node)
    return seen


def insert_residual(graph: fx.Graph, exit_node: fx.Node, stream: fx.Node) -> fx.Node:
    """Insert ``exit - stream`` right after ``exit_node``: the change a block stack made to its stream."""
    with graph.inserting_after(exit_node):
        residual = graph.call_function(operator.sub, (exit_node, stream))
    if "example_value" in exit_node.meta:
        residual.meta["example_value"] = exit_node.meta["example_value"]
    return residual


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy whose nodes keep their names and ``meta``; the input is never touched."""
    return copy.deepcopy(gm)


def mutated_argument(node: fx.Node) -> fx.Node | None:
    """The tensor an in-place node writes into, or None when ``node`` is not a known mutation."""
    if node.op == "call_function" and node.target is operator.setitem:
        target = node.args[0]
    elif node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
            and not node.target.startswith("_"):
        target = node.args[0]
    elif node.op == "call_function" and getattr(node.target, "__name__", "").endswith("_") \
            and node.args and isinstance(node.args[0], fx.Node) and node.target is not getattr:
        target = node.args[0]
    else:
        return None
    return target if isinstance(target, fx.Node) else None


def _droppable(node: fx.Node) -> bool:
    """Impure to FX but safe to drop when unread: functional collectives, and attention kernels (seeded for a
    dropout the model does not use; Ring attention's flash ops)."""
    name = getattr(node.target, "_qualified_op_name", None) or getattr(node.target, "__name__", "") or ""
    return "_c10d_functional" in name or "scaled_dot_product" in name


def prune_dead_nodes(graph: fx.Graph) -> int:
    """Delete nodes nothing live depends on; edits ``graph`` in place and returns how many went.

    Unlike ``Graph.eliminate_dead_code`` this understands in-place writes into tensors that
    are themselves dead (Wan's RoPE writes with ``out[..., 0::2] = ...``), which FX keeps
    forever because ``operator.setitem`` is marked side-effectful. Functional collectives
    (``_c10d_functional``, context parallelism) whose result nothing reads go too: every rank runs
    the same variant, so every rank drops the same ones (a reuse step skips the block stack's
    all-to-alls on all of them); and attention kernels FX counts as random (flash attention's dropout
    seed).
    """
    live: set[fx.Node] = set()
    changed = True
    while changed:
        changed = False
        for node in reversed(graph.nodes):
            if node in live:
                continue
            mutated = mutated_argument(node)
            needed = (
                node.op in ("output", "placeholder")
                or any(user in live for user in node.users)
                or (mutated is not None and mutated in live)
                or (mutated is None and node.op != "get_attr" and node.is_impure() and not _droppable(node))
            )
            if needed:
                live.add(node)
                changed = True
    removed = 0
    for node in reversed(list(graph.nodes)):
        if node not in live:
            graph.erase_node(node)  # users are dead too and were erased first (reverse order)
            removed += 1
    return removed


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Lint and recompile: the last step of every rewrite."""
    gm.graph.lint()
    gm.recompile()
    return gm


def reads_scalars(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` reads a tensor's value into Python (``.item()``)."""
    return any(n.op == "call_method" and n.target == "item" for n in gm.graph.nodes)


def forget_unbacked_bindings(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop the scalar symbols ``.item()`` nodes were bound to when ``gm`` was traced, in place.

    A graph compiled under a fresh shape environment (``static_fake_mode``) binds its scalars anew,
    and a fresh environment names them from zero again: retracing would find its new ``zuf0`` equal
    to the recorded one and stop ("possible memo disaster").
    """
    for node in gm.graph.nodes:
        node.meta.pop("unbacked_bindings", None)
    return gm


def static_fake_mode(scalars: bool = True) -> FakeTensorMode:
    """A fake-tensor mode with static shapes; with ``scalars`` it also allows ``.item()`` (an unbacked
    scalar), at about three times the cost per op.

    Dynamo turns float attributes (LoRA scales, norm epsilons under ``dynamic=True``) into 0-d tensor
    inputs read with ``.item()``; a fake mode without a shape environment refuses that.
    """
    shape_env = ShapeEnv() if scalars else None
    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=shape_env, static_shapes=True)


@contextlib.contextmanager
def quiet_fake_tensor_errors() -> Iterator[None]:
    """Silence the traceback torch logs when an op fails on fake tensors: the caller handles the error."""
    fake_logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_logger.level
    fake_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        fake_logger.setLevel(level)


def describe(node: fx.Node) -> str:
    """A name for ``node`` that stays the same between compiles: its op and owning module.

    FX node names (``hidden_states_30``) are numbered by trace order and change with the graph;
    error messages name ``add in blocks.3.ffn`` instead.
    """
    target = node.target
    if node.op == "call_function":
        op = getattr(target, "__name__", str(target))
    elif node.op in ("call_method", "call_module"):
        op = str(target)
    else:
        op = node.op
    paths = module_paths(node)
    return f"{op} in {paths[-1]}" if paths else f"{op} (top level)"
