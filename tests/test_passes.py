"""Structural checks on the analysis and on the rewritten graphs."""

import operator

import pytest
import torch
import torch.fx as fx
from hetcache_compile.passes import RewriteRefused, StepOutputs, analyze, build_variants, partial_arguments
from hetcache_compile.passes.attention import is_attention
from hetcache_compile.passes.graph_utils import owning_block, prune_dead_nodes
from models import ToyBlock

from hetcache_compile.selection import complement


def capture_graph(model, inputs):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=backend)(**inputs, return_dict=False)
    assert len(graphs) == 1
    return graphs[0]


@pytest.fixture
def captured(transformer, inputs):
    return capture_graph(transformer, inputs)


def count(gm, predicate):
    return sum(1 for node in gm.graph.nodes if predicate(node))


def test_analysis_finds_every_attention_site_and_the_block_stacks(captured):
    gm, example_inputs = captured
    analysis = analyze(gm, example_inputs)
    kinds = [(site.block, site.kind) for site in analysis.sites]
    blocks = [f"vace_blocks.{i}" for i in range(2)] + [f"blocks.{i}" for i in range(4)]
    assert kinds == [(b, k) for b in blocks for k in ("self", "cross")]
    assert dict(analysis.region.stacks) == {"vace_blocks": 2, "blocks": 4}
    assert analysis.region.main_stack == "blocks"
    assert analysis.region.num_tokens == 3 * 4 * 4
    assert analysis.modulation is not None and analysis.modulation.shape == (1, 6, 24)
    assert len(analysis.text_inputs) == 1


def test_reuse_variant_runs_no_block_and_no_attention(captured):
    gm, example_inputs = captured
    variants = build_variants(gm, analyze(gm, example_inputs), example_inputs)
    assert count(gm, is_attention) == 12
    assert count(variants.full, is_attention) == 12
    assert count(variants.reuse, is_attention) == 0
    assert count(variants.reuse, lambda n: owning_block(n) is not None and n.op != "placeholder") == 0
    # the VACE control stream is dropped with the blocks; only the patch embedding of latents stays
    assert count(variants.reuse, lambda n: n.op == "call_function" and n.target is torch.conv3d) == 1


def test_variants_leave_the_input_graph_untouched_and_keep_meta(captured):
    gm, example_inputs = captured
    code_before = gm.code
    variants = build_variants(gm, analyze(gm, example_inputs), example_inputs)
    assert gm.code == code_before
    originals = {n.name: n for n in gm.graph.nodes}
    for node in variants.full.graph.nodes:
        if node.name in originals and node.op == "call_function":
            assert node.meta.get("nn_module_stack") == originals[node.name].meta.get("nn_module_stack")


def test_variants_compute_what_the_original_computes(captured):
    gm, example_inputs = captured
    variants = build_variants(gm, analyze(gm, example_inputs), example_inputs)
    expected = gm(*example_inputs)[0]
    sample, residual, *_caches = variants.full(*example_inputs)
    torch.testing.assert_close(sample, expected)
    torch.testing.assert_close(variants.reuse(*example_inputs, residual)[0], expected, rtol=1e-5, atol=1e-5)
    modulation = variants.probe(*example_inputs)[0]
    assert modulation.shape == (1, 6, 24)


def test_prune_dead_nodes_drops_dead_in_place_writes():
    graph = fx.Graph()
    x = graph.placeholder("x")
    dead = graph.call_function(torch.empty_like, (x,))
    graph.call_function(operator.setitem, (dead, 0, x))
    graph.output(x)
    assert prune_dead_nodes(graph) == 2
    assert [n.op for n in graph.nodes] == ["placeholder", "output"]


class NoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.nn.functional.scaled_dot_product_attention(self.proj(x), x, x)


def test_refuses_a_model_without_a_block_stack():
    gm, example_inputs = capture_graph_plain(NoBlocks(), torch.randn(1, 4, 8))
    with pytest.raises(RewriteRefused, match="no repeated transformer blocks"):
        analyze(gm, example_inputs)


def capture_graph_plain(model, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=backend)(*args)
    return graphs[0]


def test_partial_variant_on_any_subset_equals_full_when_inputs_are_unchanged(captured):
    gm, example_inputs = captured
    variants = build_variants(gm, analyze(gm, example_inputs), example_inputs)
    expected = gm(*example_inputs)[0]
    recorded = StepOutputs.of_record(variants.record(*example_inputs), num_outputs=1)
    assert len(recorded.caches) == 2 * 6  # keys and values of the six self-attention sites
    for subset in (torch.arange(48), torch.tensor([0, 5, 7, 30, 47])):
        context = complement(subset, 48)
        caches = [c.index_select(-2, context) for c in recorded.caches]
        step = StepOutputs.of_partial(variants.partial(*example_inputs, *partial_arguments(
            subset, recorded.exit, context, caches)), num_outputs=1)
        torch.testing.assert_close(step.model[0], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step.residual, recorded.residual, rtol=1e-5, atol=1e-5)


class MixingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv3d(4, 16, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.blocks = torch.nn.ModuleList([ToyBlock(mix_tokens=True), ToyBlock(mix_tokens=True)])

    def forward(self, video):
        x = self.embed(video).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return x


def test_a_token_mixing_op_refuses_partial_steps_and_names_the_op():
    gm, example_inputs = capture_graph_plain(MixingModel(), torch.randn(1, 4, 2, 6, 6))
    analysis = analyze(gm, example_inputs)
    variants = build_variants(gm, analysis, example_inputs)
    assert variants.partial is None
    assert "mean" in variants.partial_refused and "not token-local" in variants.partial_refused
    residual = variants.full(*example_inputs)[1]
    torch.testing.assert_close(variants.reuse(*example_inputs, residual)[0], gm(*example_inputs)[0])
