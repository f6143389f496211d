"""``CompiledVariant``: a variant graph prepared at its first call and compiled piece by piece.

The first call of a variant (or ``compile_ahead``, before it) splits it into pieces (``PieceCompiler``:
each distinct block once, every piece a key for Inductor's caches). With ``background`` the compile
worker (a subprocess) compiles the pieces while the runtime goes on stepping: a piece runs uncompiled
until its compiled code is in the cache and loaded, so no step waits for a compiler. Without it, the
first call compiles every piece before it runs.

The partial variant's |S| and context rows are symbols: one compilation serves every mask at a
resolution. A call at sizes its guards do not admit (0 or 1 rows) gets a compilation of static sizes
of its own (at most ``max_shapes`` kept).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch.fx as fx

from .piecewise import CompiledGraph, PieceCompiler, SymbolicSizes


class CompiledVariant:
    """A variant graph, compiled on first use (or ahead of it), in the background or before it runs."""

    def __init__(self, name: str, gm: fx.GraphModule, compiler: PieceCompiler, symbolic: SymbolicSizes | None = None,
                 static_sizes: Mapping[int, Mapping[int, str]] | None = None, background: bool = False,
                 max_shapes: int = 4):
        """``symbolic``: the sizes to compile as symbols; without, ``static_sizes`` names the inputs whose sizes
        change between calls (the partial variant's), each new size a compilation of its own."""
        self.name = name
        self.gm = gm
        self.compiler = compiler
        self.symbolic = symbolic
        self.varying = dict(symbolic.dims if symbolic is not None else static_sizes or {})
        self.background = background
        self.max_shapes = max_shapes
        self.general: CompiledGraph | None = None  # static shapes, or the symbolic sizes' compilation
        self.specialized: OrderedDict[tuple, CompiledGraph] = OrderedDict()  # sizes the symbols do not admit
        self.graphs: list[CompiledGraph] = []  # every compilation, for stats and explain

    @property
    def compile_seconds(self) -> float:
        return sum(graph.report.seconds for graph in self.graphs)

    @property
    def compiled_pieces(self) -> int:
        return sum(graph.report.compiled for graph in self.graphs)

    @property
    def cache_hits(self) -> int:
        return sum(graph.report.cache_hits for graph in self.graphs)

    def describe(self) -> str:
        """One line for ``explain()``: each compilation's pieces, seconds and cache hits."""
        if not self.graphs:
            return f"{self.name}: not compiled yet (compiles at its first call)"
        return f"{self.name}: " + "; ".join(graph.report.describe() for graph in self.graphs)

    @property
    def compile_count(self) -> int:
        """Compilations of this variant (prepared graphs), the ones still compiling included."""
        return len(self.graphs)

    def __call__(self, *args):
        return self._graph_for(args)(*args)

    def compile_ahead(self, example_args: Sequence[object]) -> None:
        """Prepare and start compiling for inputs like ``example_args`` (tensors or ``TensorSpec``), unless done."""
        if self.general is None:
            self.general = self._prepare(example_args)

    def _graph_for(self, args: Sequence[object]) -> CompiledGraph:
        if self.general is None:
            self.general = self._prepare(args)
        if self.general.admits(args):
            return self.general
        key = tuple(tuple(args[position].shape) for position in self.varying)
        graph = self.specialized.get(key)
        if graph is None:
            graph = self.specialized[key] = self._prepare(args, symbolic=False)
            if len(self.specialized) > self.max_shapes:
                self.specialized.popitem(last=False)
        self.specialized.move_to_end(key)
        return graph

    def _prepare(self, args: Sequence[object], symbolic: bool = True) -> CompiledGraph:
        graph = self.compiler.prepare(self.name, self.gm, args, self.symbolic if symbolic else None, self.varying)
        self.graphs.append(graph)
        if self.background:
            self.compiler.compile_in_background(graph)
        else:
            self.compiler.compile_now(graph)
        return graph
