"""Every model family hetcache knows (``hetcache_compile/families/``), one row each, with tiny random configs.

For each: ``schedule="full"`` equals eager; partial steps with every token selected equal the full
step; a fixed schedule with a mask runs partial and reuse steps; ``explain()`` names the family.
"""

from dataclasses import dataclass, field

import pytest
import torch
from conftest import compile_hetcache
from models import tiny_vace_transformer, transformer_inputs

import hetcache_compile as hc
from hetcache_compile.families import FAMILIES, GENERIC, family_of

WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


EDIT = torch.zeros(3, 4, 4, dtype=torch.bool)
EDIT[:, 1:3, 1:3] = True  # a box in every latent frame of the token grid [3, 4, 4]


@dataclass
class Row:
    """A model of a family: how to build it, its inputs, whether its inputs carry the mask."""

    family: str
    build: object
    mask_in_inputs: bool
    inputs: dict = field(default_factory=dict)
    edit: torch.Tensor | None = None  # the token-grid mask given with set_mask (default: EDIT)


def _wan_text_to_video():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**WAN_TINY).eval()


def _skyreels_v2():
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    return SkyReelsV2Transformer3DModel(**WAN_TINY).eval()


def _text_video_inputs():
    inputs = transformer_inputs()
    inputs.pop("control_hidden_states")
    return inputs


COGVIDEOX_TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
                      text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                      temporal_compression_ratio=4, max_text_seq_length=6)


def _cogvideox(**config):
    def build():
        from diffusers import CogVideoXTransformer3DModel

        torch.manual_seed(0)
        return CogVideoXTransformer3DModel(**COGVIDEOX_TINY, **config).eval()
    return build


def _cogvideox_inputs(frames: int = 3, rope: bool = True) -> dict:
    """CogVideoX's latents are [B, F, C, H, W]; its pipeline computes the RoPE tables."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    torch.manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, frames, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                  timestep=torch.tensor([500]))
    if rope:
        inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), temporal_size=3)
    return inputs


def _hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4)).eval()


def _hunyuan_video_inputs() -> dict:
    """The prompt's last 2 of 6 rows are padding: the key-padding mask is exercised."""
    torch.manual_seed(1)
    padding = torch.ones(1, 6)
    padding[:, 4:] = 0
    return dict(hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 6, 16), encoder_attention_mask=padding,
                pooled_projections=torch.randn(1, 8), guidance=torch.tensor([3500.0]))


def _ltx_video():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                      num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                      num_layers=2, caption_channels=16).eval()


def _ltx_video_inputs() -> dict:
    """Packed latents: 3 x 4 x 4 latent cells, one row each."""
    torch.manual_seed(1)
    return dict(hidden_states=torch.randn(1, 3 * 4 * 4, 8), encoder_hidden_states=torch.randn(1, 5, 16),
                timestep=torch.tensor([500]), encoder_attention_mask=torch.ones(1, 5), num_frames=3, height=4, width=4)


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()


def _flux_fill():
    """Flux Fill's layout: packed latents, masked-image latents and 256 mask channels (16 x 16 pixels a token)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16 + 16 + 256, out_channels=16, num_layers=2,
                                  num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                  joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()


def _flux_inputs(edit: torch.Tensor | None = None) -> dict:
    """An image of 4 x 4 packed tokens, with its position ids as FluxPipeline makes them; with ``edit`` (a
    token grid), Flux Fill's: masked-image latents and the edit's mask pixels joined to the latents."""
    torch.manual_seed(1)
    rows, columns = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    image_ids = torch.stack([torch.zeros(16), rows.flatten(), columns.flatten()], dim=-1)
    latents = torch.randn(1, 16, 16)
    if edit is not None:
        mask_pixels = edit.flatten().float()[None, :, None].expand(1, 16, 256)
        latents = torch.cat([latents, torch.randn(1, 16, 16), mask_pixels], dim=-1)
    return dict(hidden_states=latents, encoder_hidden_states=torch.randn(1, 5, 32),
                pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=image_ids,
                txt_ids=torch.zeros(5, 3))


def _qwen_image():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                       axes_dims_rope=(8, 4, 4)).eval()


def _qwen_image_inputs() -> dict:
    """4 x 4 packed tokens after 6 prompt rows, the last 2 padding (the key-padding mask is exercised)."""
    torch.manual_seed(1)
    padding = torch.ones(1, 6)
    padding[:, 4:] = 0
    return dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 6, 16),
                encoder_hidden_states_mask=padding, timestep=torch.tensor([0.5]), img_shapes=[(1, 4, 4)])


ROWS = {
    "WanVACETransformer3DModel": Row("wan", tiny_vace_transformer, True, transformer_inputs()),
    # Wan2.1-VACE-14B's layout at a tiny width: 40 blocks with VACE hints after every fifth, 40 heads (here 10 and 8)
    "WanVACE-14B-layout": Row("wan", lambda: tiny_vace_transformer(num_layers=10, vace_layers=(0, 5), heads=8,
                                                                   head_dim=4), True, transformer_inputs()),
    "WanTransformer3DModel": Row("wan", _wan_text_to_video, False, _text_video_inputs()),
    "SkyReelsV2Transformer3DModel": Row("wan", _skyreels_v2, False, _text_video_inputs()),
    # 2B: learned positions; 5B: RoPE tables as inputs; 1.5: 2 frames a patch (6 latent frames: a 3-frame grid)
    "CogVideoX-2b": Row("cogvideox", _cogvideox(), False, _cogvideox_inputs(rope=False)),
    "CogVideoX-5b": Row("cogvideox", _cogvideox(use_rotary_positional_embeddings=True), False, _cogvideox_inputs()),
    "CogVideoX1.5-5b": Row("cogvideox", _cogvideox(use_rotary_positional_embeddings=True, patch_size_t=2,
                                                   patch_bias=False), False, _cogvideox_inputs(frames=6)),
    "HunyuanVideoTransformer3DModel": Row("hunyuan_video", _hunyuan_video, False, _hunyuan_video_inputs()),
    "LTXVideoTransformer3DModel": Row("ltx_video", _ltx_video, False, _ltx_video_inputs()),
    "FluxTransformer2DModel": Row("flux", _flux, False, _flux_inputs(), edit=EDIT[0]),  # an image: [H', W']
    "Flux-Fill": Row("flux", _flux_fill, True, _flux_inputs(edit=EDIT[0])),
    "QwenImageTransformer2DModel": Row("qwen_image", _qwen_image, False, _qwen_image_inputs(), edit=EDIT[0]),
}


def _run(model, inputs, **overrides):
    return model(**{**inputs, **overrides}, return_dict=False)[0]


@pytest.fixture(params=list(ROWS), ids=list(ROWS))
def row(request):
    row = ROWS[request.param]
    return row, row.build()


def _give_mask(model, row):
    if not row.mask_in_inputs:
        hc.set_mask(model, EDIT if row.edit is None else row.edit)


def test_full_schedule_equals_eager_and_explain_names_the_family(row):
    row, model = row
    compiled = compile_hetcache(model, schedule="full")
    torch.testing.assert_close(_run(compiled, row.inputs), _run(model, row.inputs), rtol=1e-5, atol=1e-5)
    report = hc.explain(compiled)
    assert f"model family: {row.family}" in report
    assert ("set_mask, else the inputs (" in report) == row.mask_in_inputs


def test_partial_step_with_every_token_selected_equals_the_full_step(row):
    row, model = row
    _give_mask(model, row)
    compiled = compile_hetcache(model, schedule="FP", context_ratio=1.0, margin_ratio=1.0)
    full = _run(compiled, row.inputs)
    partial = _run(compiled, row.inputs)
    assert hc.stats(model).branches["cond"].history == ["full", "partial"] and hc.stats(model).token_fraction == 1
    torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-5)


def test_a_fixed_schedule_with_a_mask_runs_partial_and_reuse_steps(row):
    row, model = row
    _give_mask(model, row)
    compiled = compile_hetcache(model, schedule="FPR", margin_radius=1, context_ratio=0.0, margin_ratio=0.0)
    for timestep in (900.0, 800.0, 700.0):
        _run(compiled, row.inputs, timestep=torch.tensor([timestep]))
    stats = hc.stats(model)
    assert stats.branches["cond"].history == ["full", "partial", "reuse"]
    assert 0 < stats.token_fraction < 1 and not stats.fallback_reasons
    # the default plan recomputes the context's keys where they are a projection of the tokens alone; where
    # text rows are joined to them (one attention over prompt and video) it stores them, and partial steps stay
    [plan] = {runtime.plan.name for runtime in hc.runtimes(model) if getattr(runtime, "plan", None) is not None}
    assert plan == ("as computed, keys/values recomputed" if row.family in RECOMPUTED else "as computed")


RECOMPUTED = {"wan", "ltx_video"}  # families whose self-attention keys are a projection of the video tokens alone


def test_a_model_of_no_listed_family_gets_the_generic_one_and_its_mask_from_set_mask_only():
    from models import ToyBlock

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([ToyBlock(), ToyBlock()])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    graphs = []
    torch.compile(Toy(), backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward)(torch.randn(1, 8, 16))
    assert family_of(graphs[0]) is GENERIC and GENERIC.mask_input is None
    assert all(family.name != "generic" and family.modules for family in FAMILIES)


def test_hunyuan_video_caches_video_rows_under_its_padding_mask_and_runs_its_prompt_refiner_in_full():
    """Video rows first, then 6 prompt rows (2 padded): with the same inputs, a partial step of the generative
    tokens equals eager, so the cached rows line up with the key-padding mask."""
    from hetcache_compile.memory import cache_memory

    model, inputs = _hunyuan_video(), _hunyuan_video_inputs()
    plan = cache_memory(model, inputs)[0]
    assert plan.cached_sites == 4 and plan.num_tokens == 48  # 2 + 2 blocks; not the refiner's text-only attention
    hc.set_mask(model, EDIT)
    compiled = compile_hetcache(model, schedule="FP", margin_radius=0, context_ratio=0.0, margin_ratio=0.0)
    eager = _run(model, inputs)
    _run(compiled, inputs)
    torch.testing.assert_close(_run(compiled, inputs), eager, rtol=1e-4, atol=1e-4)
    assert hc.stats(model).branches["cond"].history == ["full", "partial"]


def test_cogvideox_text_rows_are_computed_every_step_and_the_caches_hold_video_rows_only():
    """CogVideoX attends over 6 text rows joined to its 48 video tokens: only video rows are selected and cached."""
    from hetcache_compile.memory import cache_memory

    model, inputs = _cogvideox(use_rotary_positional_embeddings=True)(), _cogvideox_inputs()
    plan = cache_memory(model, inputs)[0]
    assert plan.num_tokens == 48 and plan.key_value_bytes == 2 * 2 * 48 * 32 * 4  # 2 sites x (K, V) x 48 rows x 32

    hc.set_mask(model, EDIT)
    compiled = compile_hetcache(model, schedule="FP", margin_radius=0, context_ratio=0.0, margin_ratio=0.0)
    eager = _run(model, inputs)
    _run(compiled, inputs)
    partial = _run(compiled, inputs)
    assert hc.stats(model).branches["cond"].history == ["full", "partial"]
    assert hc.stats(model).token_fraction == EDIT.sum() / EDIT.numel()
    # the same inputs: the selected tokens see the context rows of the full step, which are exact
    torch.testing.assert_close(partial, eager, rtol=1e-4, atol=1e-4)


def test_cogvideox_prompts_tell_cfg_branches_apart():
    """Its prompt also feeds the token stream (joint patch embedding), yet it keys the CFG branches."""
    model, inputs = _cogvideox()(), _cogvideox_inputs(rope=False)
    hc.set_mask(model, EDIT)
    compiled = compile_hetcache(model, schedule="FP")
    negative = {**inputs, "encoder_hidden_states": torch.zeros_like(inputs["encoder_hidden_states"])}
    for timestep in (900.0, 800.0):
        for prompt in (inputs, negative):
            _run(compiled, prompt, timestep=torch.tensor([timestep]))
    histories = [branch.history for branch in hc.stats(model).branches.values()]
    assert histories == [["full", "partial"], ["full", "partial"]]
    assert "encoder_hidden_states" in hc.explain(compiled).split("text inputs (branch keys):")[1].splitlines()[0]


def test_ltx_video_packed_latents_take_a_token_grid_mask_and_refuse_any_other_with_the_expected_shape():
    model, inputs = _ltx_video(), _ltx_video_inputs()
    compiled = compile_hetcache(model, schedule="FP")
    hc.set_mask(model, torch.ones(4, 4, 4))  # 64 tokens: not this model's 48
    with pytest.raises(ValueError, match=r"packed, 48 tokens in a row.*\[F', H', W'\]"):
        _run(compiled, inputs)
    hc.set_mask(model, EDIT)
    _run(compiled, inputs)
    _run(compiled, inputs)
    assert hc.stats(model).branches["cond"].history == ["full", "partial"]
    assert "packed latents" in hc.explain(compiled)


def test_flux_gathers_its_image_ids_so_rope_covers_the_prompt_rows_and_the_selected_tokens():
    """Flux computes RoPE from txt_ids joined to img_ids inside the model: a partial step of the generative
    tokens with the same inputs equals eager only if the tables were cut to exactly those rows."""
    model, inputs = _flux(), _flux_inputs()
    hc.set_mask(model, EDIT[0])
    compiled = compile_hetcache(model, schedule="FP", margin_radius=0, context_ratio=0.0, margin_ratio=0.0)
    eager = _run(model, inputs)
    _run(compiled, inputs)
    torch.testing.assert_close(_run(compiled, inputs), eager, rtol=1e-4, atol=1e-4)
    assert hc.stats(model).token_fraction == 0.25
    assert "l_kwargs_img_ids_[dim 0]" in hc.explain(compiled)


def test_qwen_image_puts_cached_rows_after_the_prompt_rows_where_its_padding_mask_expects_image_rows():
    """Prompt rows first, 2 of them padding: a partial step of the generative tokens with the same inputs equals
    eager only if the cached image rows sit after the prompt rows, as the key-padding mask lays them out."""
    model, inputs = _qwen_image(), _qwen_image_inputs()
    hc.set_mask(model, EDIT[0])
    compiled = compile_hetcache(model, schedule="FP", margin_radius=0, context_ratio=0.0, margin_ratio=0.0)
    eager = _run(model, inputs)
    _run(compiled, inputs)
    torch.testing.assert_close(_run(compiled, inputs), eager, rtol=1e-4, atol=1e-4)
    assert hc.stats(model).branches["cond"].history == ["full", "partial"]


def test_sd3_keeps_full_and_reuse_steps_and_says_why_it_has_no_partial_steps():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 5, 16),
                  pooled_projections=torch.randn(1, 8), timestep=torch.tensor([500.0]))
    compiled = compile_hetcache(model, schedule="FR")
    torch.testing.assert_close(_run(compiled, inputs), _run(model, inputs), rtol=1e-5, atol=1e-5)
    _run(compiled, inputs, timestep=torch.tensor([400.0]))
    assert hc.stats(model).branches["cond"].history == ["full", "reuse"]
    assert "model family: sd3" in hc.explain(compiled) and "[sd3: 4-D image latents" in hc.explain(compiled)


def test_mochi_is_compiled_unchanged_and_exact_with_the_graph_break_named():
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                    activation_fn="swiglu", max_sequence_length=16).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 8, 8), encoder_hidden_states=torch.randn(1, 5, 16),
                  timestep=torch.tensor([500]), encoder_attention_mask=torch.ones(1, 5))
    compiled = compile_hetcache(model, schedule="FPR")
    with pytest.warns(UserWarning, match=r"\[mochi: its attention processor calls nonzero\(\)"):
        output = _run(compiled, inputs)
    torch.testing.assert_close(output, _run(model, inputs), rtol=1e-5, atol=1e-5)
    assert "nonzero()" in hc.explain(compiled)


def test_flux_fill_reads_its_mask_from_its_input_as_a_token_grid_or_a_pixel_mask_would_give_it():
    """Flux Fill's mask channels, a token grid and a 64 x 64 pixel mask (the grid from ``img_ids``) select the
    same tokens: the three partial steps agree."""
    inputs = _flux_inputs(edit=EDIT[0])
    pixels = EDIT[0].repeat_interleave(16, dim=0).repeat_interleave(16, dim=1)  # 16 x 16 pixels a token
    outputs, fractions = [], []
    for mask in (None, EDIT[0], pixels):
        torch._dynamo.reset()
        model = _flux_fill()
        if mask is not None:
            hc.set_mask(model, mask)
        compiled = compile_hetcache(model, schedule="FP", margin_radius=1, context_ratio=0.0, margin_ratio=0.0)
        _run(compiled, inputs)
        outputs.append(_run(compiled, inputs))
        fractions.append(hc.stats(model).token_fraction)
        assert hc.stats(model).branches["cond"].history == ["full", "partial"]
    assert fractions[0] < 1 and fractions.count(fractions[0]) == 3
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(outputs[2], outputs[0], rtol=0, atol=0)


def test_a_flux_mask_that_fits_neither_the_token_grid_nor_the_pixels_is_refused_naming_both():
    model = _flux()
    hc.set_mask(model, torch.ones(48, 48, dtype=torch.bool))
    compiled = compile_hetcache(model, schedule="FP")
    with pytest.raises(ValueError, match=r"\[1, 4, 4\].*\[1, 64, 64\]"):
        _run(compiled, _flux_inputs())


@pytest.mark.parametrize("name, pixels_per_token, frames", [("LTXVideoTransformer3DModel", 32, 17),
                                                            ("QwenImageTransformer2DModel", 16, None)])
def test_packed_latents_take_a_pixel_mask_whose_shape_gives_the_token_grid(name, pixels_per_token, frames):
    """No grid in the graph: a pixel mask's own shape gives it (LTX: 17 frames, 128 x 128 pixels are 3 x 4 x 4
    latent cells; Qwen-Image: 64 x 64 pixels are 4 x 4 tokens), and it selects what the token grid does."""
    row = ROWS[name]
    edit = torch.zeros(4, 4, dtype=torch.bool)
    edit[0, 1:] = True  # not symmetric: a transposed reading would select other tokens
    box = edit.repeat_interleave(pixels_per_token, 0).repeat_interleave(pixels_per_token, 1)
    pixels = box if frames is None else box.expand(frames, *box.shape)
    outputs = []
    for mask in (edit if frames is None else edit.expand(3, 4, 4), pixels):
        torch._dynamo.reset()
        model = row.build()
        hc.set_mask(model, mask)
        compiled = compile_hetcache(model, schedule="FP", margin_radius=1, context_ratio=0.0, margin_ratio=0.0)
        _run(compiled, row.inputs)
        outputs.append(_run(compiled, row.inputs))
        assert hc.stats(model).branches["cond"].history == ["full", "partial"] and hc.stats(model).token_fraction < 1
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
