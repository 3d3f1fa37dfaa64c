"""DyMoS on every supported tiny model, loaded and sampled by ComfyUI's real loader and sampler."""

import copy

import comfy.model_base
import comfy.model_patcher
import comfy.supported_models
import pytest
import torch
from sampling import CASES, load_tiny, sample_tiny

from motion_dials.nodes.dymos import DyMoSMotionSlider
from motion_dials.nodes.patcher_core import MotionEffect, UnsupportedModelError, apply_effect, effects_of

STEPS = 3


def slider(model, strength=2.0, tau=0.5, schedule="uniform"):
    return DyMoSMotionSlider.execute(model, strength, tau, schedule, 1).result[0]


def weights_fingerprint(model) -> float:
    return float(sum(p.double().sum() for p in model.model.diffusion_model.state_dict().values()))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tiny_models):
    return request.param, load_tiny(request.param)


def test_slider_leaves_the_input_model_and_its_branch_bit_identical(case):
    """What the slider does to the video is checked against the dense reference in test_layout_exactness.py; here,
    that it changes nothing outside its own clone."""
    name, model = case
    options_before = copy.deepcopy(model.model_options)
    weights_before = weights_fingerprint(model)

    unpatched = sample_tiny(name, model, STEPS)
    patched = sample_tiny(name, slider(model), STEPS)
    assert torch.isfinite(patched).all()

    assert model.model_options == options_before
    assert effects_of(model) == ()
    assert weights_fingerprint(model) == weights_before
    assert torch.equal(sample_tiny(name, model, STEPS), unpatched), "the unpatched branch must be bit-identical"


def test_slider_is_bit_identical_outside_its_window(case):
    """Sampling split over two samplers: the second, past tau, gives the same latent with or without DyMoS."""
    name, model = case
    first_part = sample_tiny(name, model, STEPS, last_step=2)
    latent = {"samples": first_part}
    unpatched = sample_tiny(name, model, STEPS, start_step=2, latent=latent)
    patched = sample_tiny(name, slider(model, tau=0.5), STEPS, start_step=2, latent=latent)
    assert torch.equal(patched, unpatched)


def test_zero_strength_returns_the_model_untouched(case):
    _, model = case
    assert slider(model, strength=0.0) is model


class ConstantResidual(MotionEffect):
    """A stand-in for MIVA's cross-frame attention: adds ``value`` to the stream before the cross-attention."""

    def __init__(self, value):
        self.value = value
        self.blocks_seen = []

    def residual_before_cross_attention(self, ctx, video):
        self.blocks_seen.append((ctx.block_type, ctx.block_index, ctx.layout.frames))
        return torch.full_like(video, self.value)


class CrossAttentionReplacement(MotionEffect):
    """A stand-in for MIVA's implicit prompt: replaces the whole text cross-attention module by zeros."""

    replaces_cross_attention = True

    def __init__(self):
        self.calls = 0

    def replace_cross_attention(self, ctx, normed_stream, module):
        self.calls += 1
        return torch.zeros_like(normed_stream)


def test_stream_residual_and_cross_attention_replacement_plumbing(tiny_models):
    """The core's other two effect kinds reach the model: a zero residual changes nothing, others do; the
    replacement is an object patch of the clone only, and its state dict keeps the model's names."""
    model = load_tiny("wan2.1_t2v")
    unpatched = sample_tiny("wan2.1_t2v", model, 2)
    zero = ConstantResidual(0.0)
    assert torch.equal(sample_tiny("wan2.1_t2v", apply_effect(model, zero), 2), unpatched)
    assert sorted(set(zero.blocks_seen)) == [("double_block", 0, 3), ("double_block", 1, 3)]
    assert not torch.equal(sample_tiny("wan2.1_t2v", apply_effect(model, ConstantResidual(0.05)), 2), unpatched)

    replacement = CrossAttentionReplacement()
    replaced_model = apply_effect(slider(model), replacement)
    keys_before = set(model.model.diffusion_model.state_dict())
    replaced = sample_tiny("wan2.1_t2v", replaced_model, 2)
    assert replacement.calls == 2 * 2 and not torch.equal(replaced, unpatched)
    assert set(replaced_model.object_patches) >= {"diffusion_model.blocks.0.cross_attn",
                                                  "diffusion_model.blocks.1.cross_attn"}
    assert not model.object_patches
    assert set(model.model.diffusion_model.state_dict()) == keys_before
    assert torch.equal(sample_tiny("wan2.1_t2v", model, 2), unpatched)  # the original module is back


def test_effects_stack_on_one_patch_and_clones_stay_independent(tiny_models):
    model = load_tiny("wan2.2_i2v_high")
    once = slider(model, 1.0)
    twice = slider(once, 0.5)
    assert len(effects_of(once)) == 1 and len(effects_of(twice)) == 2
    assert effects_of(model) == ()
    wrappers = twice.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "motion_dials")
    assert len(wrappers) == 1, "hooks are installed once per model, not once per effect"


def test_an_earlier_attention_override_is_chained(tiny_models):
    model = load_tiny("wan2.1_t2v")
    calls = []

    def recording_override(func, *args, **kwargs):
        calls.append(args[0].shape)
        return func(*args, **kwargs)

    with_override = model.clone()
    with_override.model_options["transformer_options"]["optimized_attention_override"] = recording_override
    plain = sample_tiny("wan2.1_t2v", with_override, 2)
    calls_without_slider = len(calls)
    calls.clear()
    sample_tiny("wan2.1_t2v", slider(with_override), 2)
    assert calls_without_slider > 0 and len(calls) >= calls_without_slider
    # Outside the window the chain must give exactly what the earlier override alone gives.
    late = sample_tiny("wan2.1_t2v", slider(with_override, tau=0.01), 2, start_step=1,
                       latent={"samples": plain})
    assert torch.equal(late, sample_tiny("wan2.1_t2v", with_override, 2, start_step=1, latent={"samples": plain}))


def test_unsupported_video_family_is_a_clear_error_with_nothing_patched(tiny_models):
    import nodes

    model = nodes.UNETLoader().load_unet("hunyuan_video_t2v_720p_bf16.safetensors", "default")[0]
    options_before = copy.deepcopy(model.model_options)
    with pytest.raises(UnsupportedModelError, match=r"HunyuanVideo.*supports Wan 2\.1 / 2\.2.*HunyuanVideo 1\.5"):
        slider(model)
    assert model.model_options == options_before


def test_image_model_is_a_clear_error(tiny_models):
    """An SD 1.5 image model (built on the meta device: no weights are needed to be refused)."""
    unet_config = dict(
        comfy.supported_models.SD15.unet_config, image_size=32, in_channels=4, out_channels=4, model_channels=320,
        num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], num_heads=8,
        use_linear_in_transformer=False, legacy=False, use_spatial_transformer=True,
    )
    config = comfy.supported_models.SD15(unet_config)
    image_model = comfy.model_base.BaseModel(config, device=torch.device("meta"))
    patcher = comfy.model_patcher.ModelPatcher(image_model, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(UnsupportedModelError, match=r"cannot patch this model \(BaseModel\)"):
        slider(patcher)
