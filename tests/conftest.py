import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from models import tiny_vace_transformer, transformer_inputs  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch, and no_grad like a diffusers pipeline."""
    torch._dynamo.reset()
    with torch.no_grad():
        yield
    torch._dynamo.reset()


@pytest.fixture
def transformer():
    return tiny_vace_transformer()


@pytest.fixture
def inputs():
    return transformer_inputs()


def run(model, inputs, **overrides):
    """Call a (compiled) transformer the way WanVACEPipeline does; returns the sample."""
    return model(**{**inputs, **overrides}, return_dict=False)[0]


def compile_hetcache(model, **options):
    options.setdefault("inner_backend", "aot_eager")
    return torch.compile(model, backend="hetcache", options=options)
