"""Compile a variant graph piece by piece: each distinct block once, each piece a key Inductor's caches know.

A variant (``passes/``) is one FX graph of the whole model. ``PieceCompiler.prepare`` splits it at its
block boundaries (``passes.pieces``), propagates fake tensors through the pieces and gives each distinct
piece a ``PieceSlot``; the returned ``CompiledGraph`` is the split graph, whose generated ``forward``
calls the pieces in order (the runner). A stack of 30 identical blocks has one slot, and a piece that
another variant already has (the same prologue, say) shares that variant's slot.

A slot runs its piece uncompiled until it is compiled. ``PieceCompiler.compile_now`` compiles a graph's
slots before returning; ``compile_in_background`` hands them to the compile worker, a subprocess
(``compile_worker``), and the graph's calls go on meanwhile, compiled pieces and uncompiled ones mixed;
when the worker is through with a slot, the next call loads it from Inductor's caches (a hit: the
worker wrote the entry) and runs it compiled from then on.

Each piece compiles as a ``PieceJob`` (``compile_jobs``): its graph and fresh fake inputs under a shape
environment of their own, every node's ``example_value`` filled and hetcache's graph helpers marked
cacheable: what Inductor's FX graph cache and AOTAutograd's cache need to key a graph. A new process
with the same cache directory (or after ``torch.compiler.load_cache_artifacts``) loads every piece
instead of compiling it.

Symbolic sizes: ``prepare(..., symbolic=SymbolicSizes(...))`` compiles with the partial variant's |S| as a
symbol and its context rows as what |S| leaves of the tokens, so one compilation serves every mask its
guards admit; a call at sizes they do not admit (0 or 1 rows, which shape environments specialize) runs
the pieces uncompiled, and the caller prepares a graph of static sizes for it.
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .compile_jobs import SELECTED, CompiledJob, PieceJob, compile_job, inner_compiler
from .compile_worker import Ticket, shared_worker
from .config import HetCacheConfig
from .passes.graph_utils import forget_unbacked_bindings, quiet_fake_tensor_errors
from .passes.pieces import piece_key, split_into_pieces

logger = logging.getLogger("hetcache_compile")

DUMP_ENV = "HETCACHE_DUMP_GRAPHS"
_CANONICAL = sympy.Symbol(SELECTED, integer=True, positive=True)


@dataclass(frozen=True)
class TensorSpec:
    """An example input by its metadata alone (a cache that does not exist yet): contiguous, never allocated."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def like(cls, tensor: torch.Tensor, dim: int | None = None, size: int | None = None) -> TensorSpec:
        """``tensor``'s spec, with ``size`` rows on ``dim`` if given."""
        shape = list(tensor.shape)
        if dim is not None:
            shape[dim] = size
        return cls(tuple(shape), tensor.dtype, tensor.device)


@dataclass(frozen=True)
class SymbolicSizes:
    """Input sizes compiled as symbols. ``dims`` maps an input position to ``{dim: "selected" | "context"}``:
    the selected rows are one symbol, |S|; the context rows are what it leaves, ``total - per_selected * |S|``,
    with ``total`` read from the example inputs (``per_selected`` is 1, or under Ulysses the ranks whose
    rows every rank's caches hold)."""

    dims: Mapping[int, Mapping[int, str]]
    per_selected: int = 1


@dataclass
class CompileReport:
    """What one variant compilation cost: its pieces, how many it compiled, and the seconds that took."""

    pieces: int = 0  # pieces of the split graph
    distinct: int = 0  # pieces no earlier graph of this runtime had (the others share its compiled code)
    shared: int = 0  # pieces served by a slot of another block, or of another variant
    compiled: int = 0  # pieces compiled for this graph so far (cache hits included)
    cache_hits: int = 0  # of those, loaded from Inductor's FX graph cache
    seconds: float = 0.0  # spent compiling them, here or in the compile worker
    load_seconds: float = 0.0  # spent here loading what the compile worker compiled

    def describe(self) -> str:
        hits = f", {self.cache_hits} of them from Inductor's cache" if self.cache_hits else ""
        loads = f" (loaded here in {self.load_seconds:.1f} s)" if self.load_seconds else ""
        return (f"{self.pieces} pieces ({self.distinct} distinct, {self.shared} shared): {self.compiled} compiled "
                f"in {self.seconds:.1f} s{hits}{loads}")


class PieceSlot:
    """One distinct piece: runs uncompiled (``fn`` is the piece's graph) until it is compiled."""

    def __init__(self, name: str, piece: fx.GraphModule, fake_args: list, job: PieceJob | None):
        self.name = name
        self.piece = piece
        self.fake_args = fake_args  # what the piece was prepared for (its expected strides)
        self.job = job  # None: not portable to the compile worker; compiled here
        self.uses = 0  # calls per variant call: blocks of a stack share a slot
        self.fn: Callable = piece
        self.ticket: Ticket | None = None
        self.compiled: CompiledJob | None = None
        self.report: CompileReport | None = None  # the graph this slot was compiled for counts it

    @property
    def guards(self) -> tuple[sympy.Expr, ...]:
        return self.compiled.guards if self.compiled is not None else ()

    def compile_here(self, config: HetCacheConfig) -> None:
        """Compile the piece in this process (a cache load when the compile worker compiled it)."""
        if self.compiled is not None:
            return
        _maybe_dump(self.name, self.piece)
        if self.job is not None:
            compiled = compile_job(self.job, lambda gm, fakes: inner_compiler(config, gm)(gm, fakes))
        else:
            compiled = _compile_in_place(self.piece, self.fake_args, config)
        if self.ticket is not None and compiled.seconds > 1.0 and not compiled.cache_hit:
            logger.info("hetcache: %s was not in Inductor's cache after the compile worker compiled it (%s); "
                        "compiled here in %.1f s", self.name, self.ticket.error or "a different key", compiled.seconds)
        self.compiled, self.fn = compiled, compiled.fn
        if self.report is not None:  # the worker's compilation, where it did one (this one is then a load)
            by_worker = self.ticket is not None and self.ticket.error is None
            self.report.compiled += 1
            self.report.cache_hits += self.ticket.cache_hit if by_worker else compiled.cache_hit
            self.report.seconds += self.ticket.seconds if by_worker else compiled.seconds
            self.report.load_seconds += compiled.seconds if by_worker else 0.0

    def ready(self) -> bool:
        """Compiled, or compiled by the worker and waiting to be loaded."""
        return self.compiled is not None or (self.ticket is not None and self.ticket.done)

    def expected_strides(self, position: int, shape: Sequence[int]) -> tuple[int, ...] | None:
        """The strides the compiled piece expects of input ``position`` at ``shape`` (None: not a tensor)."""
        fake = self.fake_args[position]
        if not isinstance(fake, torch.Tensor):
            return None
        if not _has_symbols(fake):
            return tuple(fake.stride())
        hints = [_hint(stride) for stride in fake.stride()]
        return _strides_in_order(shape, sorted(range(len(shape)), key=lambda d: (hints[d], _hint(fake.shape[d]))),
                                 [h == 0 for h in hints])


class CompiledGraph:
    """A prepared variant: call it like the variant graph. Pieces whose slots are compiled run compiled code;
    at sizes the compiled pieces' guards do not admit, every piece runs uncompiled."""

    def __init__(self, name: str, runner: fx.GraphModule, uncompiled: fx.GraphModule, slots: list[PieceSlot],
                 report: CompileReport, guard: SizeGuard | None, config: HetCacheConfig):
        self.name = name
        self.runner = runner
        self.uncompiled = uncompiled
        self.slots = slots  # the distinct slots this graph uses, the most used first
        self.report = report
        self.guard = guard
        self.config = config
        self._admitted: dict[tuple, bool] = {}
        self._loaded = 0
        self._logged = False

    def __call__(self, *args):
        if self._loaded < len(self.slots):
            self.load_ready()
        return (self.runner if self.admits(args) else self.uncompiled)(*args)

    @property
    def done(self) -> bool:
        return all(slot.compiled is not None for slot in self.slots)

    def load_ready(self) -> None:
        """Load the slots the compile worker is through with (in this thread, between calls of the graph)."""
        for slot in self.slots:
            if slot.compiled is None and slot.ticket is not None and slot.ticket.done and not slot.ticket.cancelled:
                slot.compile_here(self.config)
        self._loaded = sum(slot.compiled is not None for slot in self.slots)
        if self._loaded == len(self.slots) and not self._logged:
            self._logged = True
            background = any(slot.ticket is not None for slot in self.slots)
            where = " in the compile worker" if background else ""
            logger.info("hetcache: compiled the %s variant with %s%s: %s", self.name, self.config.inner_backend,
                        where, self.report.describe())

    def admits(self, args: Sequence[object]) -> bool:
        """Whether the compiled pieces may run at the sizes of ``args`` (always, without symbolic sizes)."""
        if self.guard is None:
            return True
        key = (self.guard.size_key(args), self._loaded)  # the guards grow as pieces compile
        if key not in self._admitted:
            values = self.guard.values(args)
            self._admitted[key] = values is not None and self.guard.admits(values, self.slots)
        return self._admitted[key]


@dataclass
class SizeGuard:
    """What the variant's sizes must satisfy for its compiled pieces: how its symbolic inputs' sizes follow
    from |S| (or their static sizes), what the fake propagation assumed of |S|, and what each compiled
    piece's compilation assumed (``PieceSlot.guards``)."""

    shape_env: ShapeEnv
    sizes: Mapping[int, Mapping[int, sympy.Expr]]  # input position -> {dim: its size, in the symbol of |S|}
    symbol: sympy.Symbol | None

    def size_key(self, args: Sequence[object]) -> tuple[int, ...]:
        return tuple(args[position].shape[dim] for position, dims in self.sizes.items() for dim in dims)

    def values(self, args: Sequence[object]) -> dict[sympy.Symbol, int] | None:
        """The symbol's value at ``args`` (empty for static sizes), or None where the sizes do not fit."""
        values: dict[sympy.Symbol, int] = {}
        for position, dims in self.sizes.items():
            for dim, expr in dims.items():
                if isinstance(expr, sympy.Symbol):
                    values.setdefault(expr, args[position].shape[dim])
        for position, dims in self.sizes.items():
            for dim, expr in dims.items():
                if expr.xreplace(values) != args[position].shape[dim]:
                    return None
        return values

    def admits(self, values: Mapping[sympy.Symbol, int], slots: Sequence[PieceSlot]) -> bool:
        env = self.shape_env
        for symbol, value in values.items():
            bounds = env.var_to_range.get(symbol)
            if bounds is not None and not (bounds.lower <= value <= bounds.upper):
                return False
        for guard in list(env.guards):
            if guard.expr.free_symbols <= values.keys() and not bool(guard.expr.xreplace(values)):
                return False
        selected = {_CANONICAL: values[self.symbol]} if self.symbol in values else {}
        return all(bool(guard.xreplace(selected)) for slot in slots for guard in slot.guards
                   if guard.free_symbols <= selected.keys())


@dataclass
class PieceCompiler:
    """Prepares and compiles the pieces of one runtime's variants, each distinct piece once.

    ``stacks`` are the block stacks to split at (``TokenRegion.stacks``); with ``config.piecewise`` off a
    variant is one piece (Inductor may then fuse across blocks, for a compile per block).
    """

    config: HetCacheConfig
    stacks: tuple[str, ...] = ()
    slots: dict[tuple, PieceSlot] = field(default_factory=dict)

    def prepare(self, name: str, gm: fx.GraphModule, args: Sequence[object], symbolic: SymbolicSizes | None = None,
                varying: Mapping[int, Mapping[int, str]] | None = None) -> CompiledGraph:
        """Split ``gm`` (not modified) for inputs like ``args`` (tensors, ``TensorSpec``, scalars); nothing is
        compiled yet: every piece runs uncompiled until its slot is compiled. ``symbolic``: sizes to compile as
        symbols; ``varying``: sizes that change between calls (as ``SymbolicSizes.dims``), which a graph compiled
        with them static admits only at the sizes of ``args``."""
        _maybe_dump(name, gm)
        split = split_into_pieces(gm, self.stacks if self.config.piecewise else ())
        uncompiled = fx.GraphModule(dict(split.named_children()), split.graph, class_name="UncompiledPieces")
        fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
        fakes, sizes, symbol, hint = _fake_inputs(fake_mode, args, symbolic)
        if not sizes and (varying or symbolic):  # static after all: the guard admits these sizes only
            exact = varying or symbolic.dims
            sizes = {p: {d % len(args[p].shape): sympy.Integer(args[p].shape[d]) for d in dims}
                     for p, dims in exact.items()}
        report, uses, created = CompileReport(), collections.Counter(), []
        for piece_name, piece, piece_args in _propagate(split, fakes, fake_mode):
            slot, new = self._slot(f"{name}_{piece_name}", piece, piece_args, symbol, hint)
            if new:
                created.append(slot)
                slot.report = report
            report.pieces += 1
            report.shared += not new
            uses[slot] += 1
            _replace_piece(split, piece_name, _Piece(slot))
        for slot in created:
            slot.uses = uses[slot]
        report.distinct = len(created)
        split.recompile()
        ordered = sorted(uses, key=lambda slot: -uses[slot])  # a block of a 30-block stack first
        guard = SizeGuard(fake_mode.shape_env, sizes, symbol) if sizes else None
        return CompiledGraph(name, split, uncompiled, ordered, report, guard, self.config)

    def compile_now(self, graph: CompiledGraph) -> None:
        """Compile ``graph``'s slots that need it, in this process; errors propagate."""
        for slot in graph.slots:
            slot.compile_here(self.config)
        graph.load_ready()

    def compile_in_background(self, graph: CompiledGraph) -> None:
        """Hand ``graph``'s slots to the compile worker; the graph loads each when the worker is through. A slot
        that cannot travel to the worker is compiled here, now."""
        worker = shared_worker()
        for slot in graph.slots:
            if slot.compiled is not None or slot.ticket is not None:
                continue
            if slot.job is None:
                slot.compile_here(self.config)
            else:
                slot.ticket = worker.submit(slot.job)

    def wait(self) -> None:
        """Block until the compile worker is through with every slot handed to it, then load them here."""
        tickets = [slot.ticket for slot in self.slots.values() if slot.ticket is not None and slot.compiled is None]
        if tickets:
            shared_worker().wait(tickets)
        for slot in self.slots.values():
            if slot.compiled is None and slot.ticket is not None and not slot.ticket.cancelled:
                slot.compile_here(self.config)

    def errors(self) -> list[str]:
        """Why the compile worker failed the slots it failed (those compiled here instead)."""
        return [f"{slot.name}: {slot.ticket.error}" for slot in self.slots.values()
                if slot.ticket is not None and slot.ticket.error]

    def cancel(self) -> None:
        """Drop the slots the compile worker has not started (the graphs are being dropped)."""
        tickets = [slot.ticket for slot in self.slots.values() if slot.ticket is not None and not slot.ticket.done]
        if tickets:
            shared_worker().cancel(tickets)

    def _slot(self, name: str, piece: fx.GraphModule, args: list, symbol: sympy.Symbol | None,
              hint: int | None) -> tuple[PieceSlot, bool]:
        """The slot of pieces like ``piece`` with inputs like ``args``, and whether it is new."""
        symbolic = any(isinstance(a, torch.Tensor) and _has_symbols(a) for a in args)
        key = (piece_key(piece), *(_input_key(a) for a in args), symbol if symbolic else None,
               hint if symbolic else None)
        if key in self.slots:
            return self.slots[key], False
        cfg = self.config
        job = PieceJob.of(name, piece, args, cfg.inner_backend, cfg.mode, cfg.inductor_options,
                          symbol if symbolic else None, hint)
        self.slots[key] = PieceSlot(name, piece, args, job)
        return self.slots[key], True


def _compile_in_place(piece: fx.GraphModule, fake_args: list, config: HetCacheConfig) -> CompiledJob:
    """Compile a piece that could not be described as a job, for the fakes it was prepared with."""
    fake_mode = next(a.fake_mode for a in fake_args if isinstance(a, torch._subclasses.FakeTensor))
    piece = forget_unbacked_bindings(copy.deepcopy(piece))  # the compiler may mutate what it is given
    start = time.perf_counter()
    with tracing(TracingContext(fake_mode)), torch.no_grad():
        fn = inner_compiler(config, piece)(piece, fake_args)
    return CompiledJob(fn, (), time.perf_counter() - start, False)


class _Piece(torch.nn.Module):
    """A piece's slot in place of its graph, so the split graph's generated code runs the chain.

    Inductor checks the sizes and strides of a compiled graph's inputs before it computes anything, and
    keeps output strides as eager would only on a best-effort basis; when the piece before this one
    returned a tensor laid out otherwise than the slot was compiled for, the check fails and this piece
    copies that input to the expected layout, at this call and every later one."""

    def __init__(self, slot: PieceSlot):
        super().__init__()
        self.slot = slot
        self.restride: tuple[int, ...] = ()

    def forward(self, *args):
        if self.restride:
            args = self._restrided(args)
        try:
            return self.slot.fn(*args)
        except AssertionError as error:
            if not (self.slot.compiled and str(error).startswith("expected size")):  # Inductor's assert_size_stride
                raise
            self.restride = tuple(p for p, a in enumerate(args) if isinstance(a, torch.Tensor)
                                  and not _same_layout(a, self.slot.expected_strides(p, a.shape)))
            if not self.restride:
                raise
            logger.info("hetcache: %s got inputs %s laid out otherwise than it was compiled for; copying them",
                        self.slot.name, list(self.restride))
            return self.slot.fn(*self._restrided(args))

    def _restrided(self, args: Sequence[object]) -> list:
        args = list(args)
        for position in self.restride:
            value = args[position]
            strides = self.slot.expected_strides(position, value.shape)
            if not _same_layout(value, strides):
                args[position] = torch.empty_strided(value.shape, strides, dtype=value.dtype,
                                                     device=value.device).copy_(value)
        return args


def _same_layout(tensor: torch.Tensor, strides: Sequence[int] | None) -> bool:
    return strides is None or all(size <= 1 or stride == expected for size, stride, expected
                                  in zip(tensor.shape, tensor.stride(), strides))


def _strides_in_order(shape: Sequence[int], order: Sequence[int], broadcast: Sequence[bool]) -> tuple[int, ...]:
    """Dense strides for ``shape`` with dims laid out innermost first as ``order`` says (broadcast dims: 0)."""
    strides, running = [0] * len(shape), 1
    for dim in order:
        if broadcast[dim] and shape[dim] != 1:
            continue
        strides[dim] = running
        running *= shape[dim]
    return tuple(strides)


def _hint(value: object) -> int:
    return int(value.node.hint) if isinstance(value, torch.SymInt) else int(value)


def _has_symbols(tensor: torch.Tensor) -> bool:
    return any(isinstance(s, torch.SymInt) for s in (*tensor.shape, *tensor.stride()))


def _fake_inputs(fake_mode: FakeTensorMode, args: Sequence[object], symbolic: SymbolicSizes | None):
    """Fake copies of ``args``, with the sizes ``symbolic`` names in terms of one symbol, |S| (``SymbolicSizes``):
    (fakes, {position: {dim: size expression}}, the symbol, its hint). Without symbolic sizes, or with
    examples too small to hint them, every size is static."""
    named, hint = _symbolic_sizes(fake_mode.shape_env, args, symbolic) if symbolic is not None else ({}, None)
    fakes, sizes = [], {}
    for position, value in enumerate(args):
        dims = symbolic.dims.get(position) if named else None
        if not isinstance(value, torch.Tensor | TensorSpec):
            fakes.append(value)
            continue
        if not dims and isinstance(value, torch.Tensor):
            fakes.append(fake_mode.from_tensor(value, static_shapes=True))
            continue
        if isinstance(value, torch.Tensor) and not value.is_contiguous():
            raise ValueError(f"hetcache: input {position} of a variant with symbolic sizes must be contiguous")
        shape = list(value.shape)
        for dim, name in (dims or {}).items():
            shape[dim % len(shape)] = named[name]
            sizes.setdefault(position, {})[dim % len(shape)] = named[name].node.expr
        with fake_mode:
            fakes.append(torch.empty(shape, dtype=value.dtype, device=value.device))
    symbol = named["selected"].node.expr if named else None
    return fakes, sizes, symbol, hint


def _symbolic_sizes(env: ShapeEnv, args: Sequence[object],
                    symbolic: SymbolicSizes) -> tuple[dict[str, torch.SymInt], int | None]:
    """``{"selected": |S|, "context": total - per_selected * |S|}`` as symbolic sizes hinted by ``args``, and the
    hint; empty where ``args`` are too small to hint them."""
    observed = {name: args[position].shape[dim] for position, dims in symbolic.dims.items()
                for dim, name in dims.items()}
    if "selected" not in observed:
        return {}, None
    selected, scale = observed["selected"], symbolic.per_selected
    total = observed["context"] + scale * selected if "context" in observed else None
    hint = max(2, selected) if total is None else max(2, min(selected, (total - 2) // scale))
    if total is not None and total - scale * hint < 2:
        return {}, None  # too few tokens to hint both sizes: static sizes
    symbol = env.create_unspecified_symint_and_symbol(hint, ConstantSource("hetcache_selected"), DimDynamic.DYNAMIC)
    named = {"selected": symbol} if total is None else {"selected": symbol, "context": total - scale * symbol}
    return named, hint


def _propagate(split: fx.GraphModule, fakes: list, fake_mode: FakeTensorMode):
    """Run ``split`` on ``fakes`` piece by piece; yield each piece with its fake inputs."""
    env: dict[fx.Node, object] = {}
    inputs = iter(fakes)
    for node in split.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(inputs)
        elif node.op == "call_module":
            piece = forget_unbacked_bindings(split.get_submodule(node.target))  # scalars bind anew in fake_mode
            piece_args = [env[arg] for arg in node.args]
            with quiet_fake_tensor_errors():
                env[node] = FakeTensorProp(piece, fake_mode).propagate_dont_convert_inputs(*piece_args)
            for piece_node in piece.graph.nodes:  # what AOTAutograd's cache checks (a piece compiled in place)
                if "val" in piece_node.meta:
                    piece_node.meta["example_value"] = piece_node.meta["val"]
            yield node.target, piece, piece_args
        elif node.op == "call_function":
            env[node] = node.target(*fx.node.map_arg(node.args, env.__getitem__))


def _input_key(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return (str(tuple(value.shape)), str(value.stride()), value.dtype, value.device.type,
                isinstance(value, torch.nn.Parameter))
    return (type(value).__name__, str(value))


def _replace_piece(split: fx.GraphModule, name: str, replacement: torch.nn.Module) -> None:
    delattr(split, name)
    setattr(split, name, replacement)


def _maybe_dump(name: str, gm: fx.GraphModule) -> None:
    """Under ``HETCACHE_DUMP_GRAPHS=<folder>``: each variant's whole graph (``<variant>_<id>.py``) and each piece
    compiled for it (``<variant>_piece_<n>_<id>.py``)."""
    folder = os.environ.get(DUMP_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}_{id(gm):x}.py")
        with open(path, "w") as handle:
            handle.write(gm.code)
        logger.info("wrote %s to %s", name, path)
