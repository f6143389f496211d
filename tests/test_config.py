import pytest

from hetcache_compile import HetCacheConfig
from hetcache_compile.config import PRESETS


def test_defaults_are_the_balanced_preset():
    for config in (HetCacheConfig.from_options(None), HetCacheConfig()):
        assert config.preset == "balanced"
        for key, value in PRESETS["balanced"].items():
            assert getattr(config, key) == value, key


def test_preset_sets_values_and_explicit_options_win():
    fast = HetCacheConfig.from_options({"preset": "fast"})
    quality = HetCacheConfig.from_options({"preset": "quality"})
    assert fast.max_consecutive_reuse > quality.max_consecutive_reuse
    assert fast.margin_ratio < quality.margin_ratio
    assert HetCacheConfig.from_options({"preset": "fast", "threshold": 0.01}).threshold == 0.01
    assert HetCacheConfig.from_options({"preset": "fast", "refresh_interval": 5}).refresh_interval == 5


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ValueError, match="'treshold'.*allowed options.*threshold"):
        HetCacheConfig.from_options({"treshold": 0.1})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("preset", "turbo"),
        ("schedule", "RFF"),
        ("schedule", "FXR"),
        ("threshold", -1.0),
        ("threshold", "0.1"),
        ("warmup_steps", 0),
        ("max_consecutive_reuse", 1.5),
        ("inner_backend", "tensorrt"),
        ("num_steps", 0),
        ("max_cache_bytes", -1),
        ("max_cache_bytes", "8GB"),
        ("rescale", "sdxl"),
        ("max_branches", True),
        ("size_buckets", -1),
    ],
)
def test_bad_values_raise_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"option '{key}' got"):
        HetCacheConfig.from_options({key: value})


def test_rescale_accepts_a_name_or_coefficients():
    assert HetCacheConfig(rescale="wan2.1-1.3b").rescale_coefficients()[0] < 0
    assert HetCacheConfig.from_options({"rescale": [2.0, 0.0]}).rescale_coefficients() == (2.0, 0.0)
