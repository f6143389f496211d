"""Context parallelism without processes: balanced selection over shards, and what the shards pass refuses."""

import operator

import pytest
import torch
import torch.fx as fx

from hetcache_compile.passes import TokenRegion
from hetcache_compile.passes.errors import ShardingRefused
from hetcache_compile.passes.shards import ShardLayout, find_shards
from hetcache_compile.priors import classify_tokens
from hetcache_compile.sharding import select_shard_tokens, shard_size

GRID = (8, 6, 6)  # 288 tokens; 4 shards of 2 frames each


def _classes(frames: slice, radius: float = 1.0):
    mask = torch.zeros(GRID, dtype=torch.bool)
    mask[frames, 1:4, 1:4] = True
    return classify_tokens(mask, radius)


def _select_all(classes, world: int, context_ratio: float = 0.25):
    scores = torch.rand(classes.num_tokens, generator=torch.Generator().manual_seed(0))
    per_shard = classes.num_tokens // world
    hidden = torch.randn(per_shard, 8, generator=torch.Generator().manual_seed(1))
    return [select_shard_tokens(classes, scores[rank * per_shard:(rank + 1) * per_shard], hidden, rank, world,
                                context_ratio, 0.5, num_clusters=4) for rank in range(world)]


@pytest.mark.parametrize("frames", [slice(0, 8), slice(0, 2)], ids=["edit-in-every-shard", "edit-in-one-shard"])
def test_every_shard_selects_as_many_tokens_and_keeps_all_of_its_generative_tokens(frames):
    classes, world = _classes(frames), 4
    per_shard = classes.num_tokens // world
    selections = _select_all(classes, world)
    size = shard_size(classes, world, 0.25, 0.5)
    assert {len(s) for s in selections} == {size}
    for rank, local in enumerate(selections):
        assert torch.equal(local, torch.sort(local).values) and local.unique().numel() == size
        assert 0 <= int(local.min()) and int(local.max()) < per_shard
        own = classes.generative[(classes.generative // per_shard) == rank] - rank * per_shard
        assert torch.isin(own, local).all()


def test_an_edit_inside_one_shard_sets_the_size_and_the_others_recompute_context_rather_than_idle():
    everywhere, one_shard = _classes(slice(0, 8)), _classes(slice(0, 2))
    world = 4
    busiest = int(torch.bincount(one_shard.generative // (one_shard.num_tokens // world), minlength=world).max())
    assert shard_size(one_shard, world, 0.25, 0.5) >= busiest
    # spread over every shard, each computes about its share of S and no more
    share = shard_size(everywhere, world, 0.25, 0.5)
    assert share * world <= everywhere.generative.numel() + everywhere.margin.numel() + everywhere.context.numel()
    quiet = _select_all(one_shard, world)[3] + 3 * (one_shard.num_tokens // world)
    assert not torch.isin(quiet, one_shard.generative).any() and len(quiet) == shard_size(one_shard, world, 0.25, 0.5)


def _graph_with(collective: str) -> tuple[fx.GraphModule, TokenRegion]:
    graph = fx.Graph()
    x = graph.placeholder("x")
    flat = graph.call_method("flatten", (x,))
    if collective in ("all_gather", "ring"):
        if collective == "ring":  # keys and values, flattened and joined, as Ring attention gathers them
            flat = graph.call_function(torch.cat, ([flat, graph.call_method("flatten", (x,))],))
        sent = graph.call_function(torch.ops._c10d_functional.all_gather_into_tensor, (flat, 2, "0"))
    else:
        sizes = [4, 4] if collective == "equal" else [6, 2]
        sent = graph.call_function(torch.ops._c10d_functional.all_to_all_single, (flat, sizes, sizes, "0"))
    done = graph.call_function(torch.ops._c10d_functional.wait_tensor, (sent,))
    out = graph.call_function(operator.add, (done, 1))
    graph.output(out)
    names = frozenset(n.name for n in graph.nodes if n.op == "call_function" or n.op == "call_method")
    region = TokenRegion(stacks=(("blocks", 1),), main_stack="blocks", nodes=names, entry=flat.name, exit=out.name,
                         stream_input="x", stream_sources=frozenset({"x"}), inputs=("x",), exit_shape=(1, 4, 2))
    return fx.GraphModule(torch.nn.Module(), graph), region


def test_shards_pass_reads_ulysses_and_ring_and_refuses_other_collectives_and_unequal_splits_by_name():
    assert find_shards(*_graph_with("equal")) == ShardLayout(world=2, group="0")
    assert find_shards(*_graph_with("ring")) == ShardLayout(world=2, group="0", scheme="ring")
    with pytest.raises(ShardingRefused, match="all_gather_into_tensor.*neither"):
        find_shards(*_graph_with("all_gather"))
    with pytest.raises(ShardingRefused, match="unequally"):
        find_shards(*_graph_with("unequal"))
