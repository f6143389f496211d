"""The trained proxies the quality benchmarks rest on: committed weights, data that exercises the method."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from proxy.model import WEIGHTS_NAME, sha256  # noqa: E402
from proxy.specs import PROXIES, get_proxy  # noqa: E402

from hetcache_compile.config import HetCacheConfig  # noqa: E402
from hetcache_compile.priors import classify_tokens  # noqa: E402


@pytest.mark.parametrize("name", sorted(PROXIES))
def test_committed_weights_match_their_checksum(name):
    weights = get_proxy(name).weights_dir
    sums = dict(line.split()[::-1] for line in (weights / "SHA256SUMS").read_text().splitlines())
    assert sha256(weights / WEIGHTS_NAME) == sums[WEIGHTS_NAME]


def test_scenes_have_context_tokens_at_the_default_margin_radius():
    """Issue 12: the second proxy must exercise context selection, which the first (6 x 6 tokens) never did."""
    spec = get_proxy("scenes")
    _, masks, kinds = spec.data.make_batch(spec.data.heldout_seeds(8))
    radius = HetCacheConfig().margin_radius
    assert set(kinds) == set(spec.data.MASK_KINDS)
    for mask, kind in zip(masks, kinds):
        tokens = F.max_pool3d(mask[None, None], (1, 2, 2))[0, 0]
        assert tokens.shape[1:] == (16, 28)
        classes = classify_tokens(tokens, radius)
        assert classes.generative.numel() > 0, kind
        assert classes.context.numel() >= 0.1 * classes.num_tokens, kind


def test_scenes_clips_depend_on_the_seed_alone():
    spec = get_proxy("scenes")
    a = spec.data.make_clip(1_000_000_007)
    b = spec.data.make_clip(1_000_000_007)
    c = spec.data.make_clip(1_000_000_008)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.x0, c.x0)


def test_step_skipping_is_interpolated_between_step_counts():
    from quality_report import skipping_psnr_at

    rows = [{"reduction": 4.0, "psnr_mask_full": 32.0}, {"reduction": 5.0, "psnr_mask_full": 30.0}]
    assert skipping_psnr_at(4.5, rows) == pytest.approx(31.0)
    assert skipping_psnr_at(4.0, rows) == pytest.approx(32.0)
    assert skipping_psnr_at(6.0, rows) is None
