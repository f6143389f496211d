"""Graphs the analysis refuses are compiled unchanged, with a one-line warning, and stay correct."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import compile_hetcache
from models import ToyBlock

import hetcache_compile as hc


class LeakyStack(torch.nn.Module):
    """A block stack whose first block's output is also used after the stack: no clean exit."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([ToyBlock(), ToyBlock()])

    def forward(self, x):
        first = self.blocks[0](x)
        return self.blocks[1](first), first


def test_refused_graph_warns_once_and_matches_eager():
    model = LeakyStack().eval()
    x = torch.randn(1, 6, 16)
    expected = model(x)
    compiled = compile_hetcache(model, schedule="FR")
    with pytest.warns(UserWarning, match="hetcache: not rewriting this graph .*single token stream"):
        out = compiled(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(compiled(x), expected)  # a second call ("R" in the schedule): still exact
    stats = hc.stats(model)
    # the reason names the op and module, which stay the same between compiles (not FX node names)
    assert "add in blocks.0 inside the block stack is also used after it" in stats.fallback_reason
    assert stats.steps == {"full": 2, "partial": 0, "reuse": 0}
    assert "rewrite refused" in hc.explain(model)


def test_backend_name_resolves_without_importing_the_package(tmp_path):
    script = textwrap.dedent(
        """
        import sys, warnings
        import torch
        assert "hetcache_compile" not in sys.modules
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = torch.compile(model, backend="hetcache", options={"inner_backend": "eager"})(torch.ones(2, 4))
        torch.testing.assert_close(out, model(torch.ones(2, 4)))
        assert any("hetcache" in str(w.message) for w in caught), [str(w.message) for w in caught]
        print("resolved", "hetcache_compile" in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resolved True" in result.stdout


class JoiningStack(torch.nn.Module):
    """Text tokens joined to the stream inside the first block (Flux's single-stream layout)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([JoiningBlock(), ToyBlock()])

    def forward(self, x, text):
        return self.blocks[1](self.blocks[0](x, text))


class JoiningBlock(ToyBlock):
    def forward(self, x, text):
        return super().forward(torch.cat([text, x], dim=1))


def test_a_stack_that_changes_the_sequence_says_why_no_stream_was_found():
    model = JoiningStack().eval()
    x, text = torch.randn(1, 6, 16), torch.randn(1, 2, 16)
    with pytest.warns(UserWarning, match="none of its inputs has the stack output's shape"):
        out = compile_hetcache(model, schedule="full")(x, text)
    torch.testing.assert_close(out, model(x, text))
    assert "cannot tell which input of blocks.0 is the token stream" in hc.stats(model).fallback_reason
