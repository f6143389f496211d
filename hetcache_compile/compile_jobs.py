"""A piece to compile, as plain data: the same in this process and in the compile worker's.

``PieceJob.of(name, piece, fake_args, config)`` describes a piece (its graph node by node, names kept) and
its inputs (sizes and strides as expressions in |S|, the one symbol a partial step's sizes have); ``None``
where the piece holds something that does not travel (an op of a library the worker may not load, a size
with another symbol): such a piece is compiled in the caller's process. ``compile_job(job)`` rebuilds the
graph and fresh fake inputs and compiles them, in whichever process runs it: the graph's code and the
inputs' metadata come out the same in both, so what the worker compiles, this process loads from
Inductor's caches as hits.

>>> import torch, torch.fx as fx
>>> gm = fx.symbolic_trace(lambda x, y: (torch.cat([x, y], 1).relu(),))
>>> job = PieceJob.of("toy", gm, [torch.ones(1, 2), torch.ones(1, 3)], "aot_eager", "default", None)
>>> rebuild_graph(job.nodes).code == gm.code
True
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .passes.graph_utils import forget_unbacked_bindings, quiet_fake_tensor_errors

logger = logging.getLogger("hetcache_compile")

SELECTED = "S"  # the symbol of |S| in job expressions


class NotPortable(Exception):
    """A piece or an input that cannot be described as plain data."""


@dataclass(frozen=True)
class TensorInput:
    sizes: tuple[str, ...]  # each an integer or an expression in SELECTED
    strides: tuple[str, ...]
    dtype: str
    device: str
    parameter: bool
    requires_grad: bool


@dataclass(frozen=True)
class PieceJob:
    """One piece to compile: its graph, its inputs, |S|'s hint (None: static sizes) and the inner compiler."""

    name: str
    nodes: tuple
    inputs: tuple
    selected_hint: int | None
    inner_backend: str
    mode: str
    inductor_options: tuple

    @classmethod
    def of(cls, name: str, piece: fx.GraphModule, fake_args: Sequence[object], inner_backend: str, mode: str,
           inductor_options: Mapping[str, object] | None, selected: sympy.Symbol | None = None,
           selected_hint: int | None = None) -> PieceJob | None:
        """The job of compiling ``piece`` for ``fake_args`` (``selected``: the symbol of |S| among their sizes)."""
        try:
            nodes = tuple(_encode_node(node) for node in piece.graph.nodes)
            inputs = tuple(_encode_input(value, selected) for value in fake_args)
        except NotPortable as why:
            logger.debug("hetcache: %s is compiled in this process: %s does not travel", name, why)
            return None
        job = cls(name, nodes, inputs, selected_hint if selected is not None else None, inner_backend, mode,
                  tuple(sorted((inductor_options or {}).items())))
        if rebuild_graph(job.nodes).code != piece.code:
            logger.debug("hetcache: %s is compiled in this process: its graph does not come back the same", name)
            return None
        return job

    @property
    def key(self) -> str:
        return hashlib.sha256(repr((self.nodes, self.inputs, self.selected_hint)).encode()).hexdigest()


@dataclass
class CompiledJob:
    """A compiled piece: the callable, the guards its compilation put on |S| (in ``SELECTED``), what it cost."""

    fn: Callable
    guards: tuple[sympy.Expr, ...]
    seconds: float
    cache_hit: bool


def compile_job(job: PieceJob, compiler: Callable[[fx.GraphModule, list], Callable]) -> CompiledJob:
    """Rebuild ``job``'s graph and fake inputs in a fresh shape environment and compile them with ``compiler``
    (the inner compiler, given the graph)."""
    gm = rebuild_graph(job.nodes)
    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes, symbol = _decode_inputs(job, fake_mode)
    with quiet_fake_tensor_errors():
        FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*fakes)
    for node in gm.graph.nodes:  # what AOTAutograd's cache checks
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]
    gm = forget_unbacked_bindings(gm)
    start, hits = time.perf_counter(), _cache_hits()
    with tracing(TracingContext(fake_mode)), torch.no_grad():  # variants run for inference only
        fn = compiler(gm, fakes)
    seconds, hit = time.perf_counter() - start, _cache_hits() > hits
    return CompiledJob(fn, _guards_on(fake_mode.shape_env, symbol), seconds, hit)


def rebuild_graph(nodes: Sequence[tuple]) -> fx.GraphModule:
    """The GraphModule ``nodes`` (from ``PieceJob.nodes``) describe, with their names."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for op, name, target, args, kwargs, annotation in nodes:
        resolved = _decode_target(op, target)
        node = graph.create_node(op, resolved, _decode_arg(args, env), _decode_arg(kwargs, env), name=name,
                                 type_expr=_resolve(*annotation) if annotation else None)
        env[name] = node
    return fx.GraphModule(torch.nn.Module(), graph, class_name="Piece")


def inner_compiler(config, gm: fx.GraphModule | None = None) -> Callable:
    """The compiler for pieces: ``config.inner_backend`` (an object with ``inner_backend``, ``mode`` and
    ``inductor_options``), with Inductor's mode and config patches, and hetcache's own graph helpers in ``gm``
    marked cacheable (keyed by their source)."""
    if config.inner_backend != "inductor":
        return torch._dynamo.lookup_backend(config.inner_backend)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = {**list_mode_options(config.mode), **dict(config.inductor_options or {})}
    helpers = _hetcache_functions(gm) if gm is not None else {}
    if helpers:
        marked = dict(patches.get("unsafe_marked_cacheable_functions") or {})
        patches["unsafe_marked_cacheable_functions"] = {**marked, **helpers}
    return lambda graph, example_inputs: compile_fx(graph, example_inputs, config_patches=patches)


def compile_job_with_its_compiler(job: PieceJob) -> CompiledJob:
    """``compile_job`` with the inner compiler the job names."""
    options = _JobOptions(job.inner_backend, job.mode, dict(job.inductor_options))
    return compile_job(job, lambda gm, fakes: inner_compiler(options, gm)(gm, fakes))


@dataclass(frozen=True)
class _JobOptions:
    inner_backend: str
    mode: str
    inductor_options: Mapping[str, object]


def _hetcache_functions(gm: fx.GraphModule) -> dict[str, str]:
    """hetcache's Python functions called in ``gm`` (``reshape_keeping_leading``...), each with a digest of its
    source: AOTAutograd's cache then keys graphs that call them instead of bypassing them."""
    found = {}
    for node in gm.graph.nodes:
        target = node.target
        module = getattr(target, "__module__", "") or ""
        if node.op == "call_function" and module.startswith("hetcache_compile") and inspect.isfunction(target):
            source = inspect.getsource(target)
            found[f"{module}.{target.__name__}"] = hashlib.sha256(source.encode()).hexdigest()[:16]
    return found


def _cache_hits() -> int:
    return torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]


# -- encoding ------------------------------------------------------------------------------------------------
_LITERALS = (bool, int, float, str, type(None), type(Ellipsis), complex)
_HOMES = ("torch", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions", "torch.Tensor", "operator",
          "builtins", "math")


def _encode_node(node: fx.Node) -> tuple:
    annotation = None
    if isinstance(node.type, type):  # placeholders' annotations (torch.Tensor, Parameter) show in the code
        annotation = (node.type.__module__, node.type.__qualname__)
    return (node.op, node.name, _encode_target(node), _encode_arg(node.args), _encode_arg(node.kwargs), annotation)


def _encode_target(node: fx.Node) -> object:
    target = node.target
    if node.op in ("placeholder", "output", "call_method", "get_attr"):
        if node.op == "get_attr":
            raise NotPortable("get_attr")
        return target
    if isinstance(target, torch._ops.OpOverload):
        return ("op", target._schema.name, target._overloadname)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return ("packet", target._qualified_op_name)
    name = getattr(target, "__name__", None)
    candidates = [(getattr(target, "__module__", None), getattr(target, "__qualname__", None))]
    candidates += [(module, name) for module in _HOMES]  # builtins such as torch.cat live on a C++ class
    for module, qualname in candidates:
        if module is None or qualname is None or "<" in qualname:
            continue
        try:
            if _resolve(module, qualname) is target:
                return ("function", module, qualname)
        except (ImportError, AttributeError):
            continue
    raise NotPortable(repr(target))


def _decode_target(op: str, target: object) -> object:
    if not isinstance(target, tuple):
        return target
    kind, *rest = target
    if kind == "op":
        namespace, name = rest[0].split("::")
        packet = getattr(getattr(torch.ops, namespace), name)
        return getattr(packet, rest[1] or "default")
    if kind == "packet":
        namespace, name = rest[0].split("::")
        return getattr(getattr(torch.ops, namespace), name)
    return _resolve(*rest)


def _resolve(module: str, qualname: str) -> object:
    value = importlib.import_module(module) if module != "builtins" else builtins
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


def _encode_arg(value: object) -> object:
    if isinstance(value, fx.Node):
        return ("node", value.name)
    if isinstance(value, _LITERALS):
        return value
    if isinstance(value, tuple | list):
        return ("tuple" if isinstance(value, tuple) else "list", tuple(_encode_arg(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _encode_arg(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _encode_arg(value.start), _encode_arg(value.stop), _encode_arg(value.step))
    if isinstance(value, torch.dtype):
        return ("dtype", str(value).removeprefix("torch."))
    if isinstance(value, torch.device):
        return ("device", str(value))
    if isinstance(value, torch.memory_format | torch.layout):
        return ("torch", str(value).removeprefix("torch."))
    raise NotPortable(repr(value))


def _decode_arg(value: object, env: Mapping[str, fx.Node]) -> object:
    if not isinstance(value, tuple):
        return value
    kind, *rest = value
    if kind == "node":
        return env[rest[0]]
    if kind in ("tuple", "list"):
        items = [_decode_arg(v, env) for v in rest[0]]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {k: _decode_arg(v, env) for k, v in rest[0]}
    if kind == "slice":
        return slice(*(_decode_arg(v, env) for v in rest))
    if kind == "dtype":
        return getattr(torch, rest[0])
    if kind == "device":
        return torch.device(rest[0])
    if kind == "torch":
        return getattr(torch, rest[0])
    raise ValueError(f"unknown encoded argument {value!r}")


def _encode_input(value: object, selected: sympy.Symbol | None) -> object:
    if not isinstance(value, torch.Tensor):
        if isinstance(value, _LITERALS):
            return ("scalar", value)
        raise NotPortable(repr(value))
    return TensorInput(tuple(_encode_size(s, selected) for s in value.shape),
                       tuple(_encode_size(s, selected) for s in value.stride()),
                       str(value.dtype).removeprefix("torch."), str(value.device), isinstance(value, torch.nn.Parameter),
                       value.requires_grad)


def _encode_size(size: object, selected: sympy.Symbol | None) -> str:
    if not isinstance(size, torch.SymInt):
        return str(int(size))
    expr = size.node.expr
    if selected is None or not expr.free_symbols <= {selected}:
        raise NotPortable(str(expr))
    return str(expr.xreplace({selected: sympy.Symbol(SELECTED, integer=True, positive=True)}))


def _decode_inputs(job: PieceJob, fake_mode: FakeTensorMode) -> tuple[list, sympy.Symbol | None]:
    env = fake_mode.shape_env
    symbol = None
    if job.selected_hint is not None:
        selected = env.create_unspecified_symint_and_symbol(job.selected_hint, ConstantSource("hetcache_selected"),
                                                            DimDynamic.DYNAMIC)
        symbol = selected.node.expr
    fakes = []
    for spec in job.inputs:
        if not isinstance(spec, TensorInput):
            fakes.append(spec[1])
            continue
        sizes = [_decode_size(s, env, symbol, job.selected_hint) for s in spec.sizes]
        strides = [_decode_size(s, env, symbol, job.selected_hint) for s in spec.strides]
        with fake_mode:
            fake = torch.empty_strided(sizes, strides, dtype=getattr(torch, spec.dtype), device=spec.device)
        fake.requires_grad_(spec.requires_grad)
        if spec.parameter:
            fake._is_param = True  # as FakeTensorMode.from_tensor marks a parameter
        fakes.append(fake)
    return fakes, symbol


def _decode_size(text: str, env: ShapeEnv, symbol: sympy.Symbol | None, hint: int | None):
    if text.lstrip("-").isdigit():
        return int(text)
    expr = sympy.sympify(text, locals={SELECTED: symbol})
    return env.create_symintnode(expr, hint=int(expr.xreplace({symbol: hint})))


def _finite(bound: sympy.Expr) -> bool:
    from torch.utils._sympy.numbers import int_oo

    return bound not in (sympy.oo, -sympy.oo, int_oo, -int_oo)


def _guards_on(env: ShapeEnv, symbol: sympy.Symbol | None) -> tuple[sympy.Expr, ...]:
    """What a compilation assumed of |S|: its guards, range and replacement, in ``SELECTED``."""
    if symbol is None:
        return ()
    canonical = sympy.Symbol(SELECTED, integer=True, positive=True)
    found = [guard.expr for guard in env.guards if guard.expr.free_symbols <= {symbol}]
    bounds = env.var_to_range.get(symbol)
    if bounds is not None:
        if _finite(bounds.lower):
            found.append(sympy.Ge(symbol, int(bounds.lower)))
        if _finite(bounds.upper):
            found.append(sympy.Le(symbol, int(bounds.upper)))
    replaced = env.replacements.get(symbol)
    if replaced is not None and replaced.free_symbols <= {symbol} and replaced != symbol:
        found.append(sympy.Eq(symbol, replaced))
    return tuple(expr.xreplace({symbol: canonical}) for expr in found)


__all__ = ["CompiledJob", "NotPortable", "PieceJob", "compile_job", "compile_job_with_its_compiler", "inner_compiler",
           "rebuild_graph"]
