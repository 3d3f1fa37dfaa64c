"""DyMoS through the patcher core's attention override equals a plain biased softmax."""

import itertools
import math

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_sampling
import pytest
import torch

from motion_dials.models.dymos import frame_weight
from motion_dials.nodes.dymos import DyMoSEffect
from motion_dials.nodes.patcher_core import (
    FORWARD_KEY,
    HUNYUAN_VIDEO_15,
    PATCH_KEY,
    WAN,
    ForwardState,
    MotionDialsPatch,
    _attention_override,
)

COMFY_ATTENTION = comfy_attention.optimized_attention.__wrapped__


class FlowSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
    pass


def flow_sampling(shift=5.0):
    class Config:
        sampling_settings = {"shift": shift, "multiplier": 1000}
    return FlowSampling(Config())


def reference_attention(q, k, v, heads, *, video_start, frames, tokens_per_frame, ref_frames, strength, schedule,
                        text_mask=None):
    """Full logits, bias added element by element, softmax: the definition, no tricks. q/k/v: [B, H, N, D]."""
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    bias = torch.zeros(q.shape[2], k.shape[2], dtype=torch.float64)
    ref_keys = slice(video_start, video_start + ref_frames * tokens_per_frame)
    for frame in range(ref_frames, frames):
        rows = slice(video_start + frame * tokens_per_frame, video_start + (frame + 1) * tokens_per_frame)
        bias[rows, ref_keys] = -strength * frame_weight(schedule, frame, frames)
    logits = logits + bias
    if text_mask is not None:
        logits = logits + text_mask.double()
    return (logits.softmax(-1) @ v.double()).float()


def scaled_values_override(func, q, k, v, heads, **kwargs):
    """An earlier override, as another node would set: it changes the result, so chaining is visible."""
    return func(q, k, v * 0.5, heads, **kwargs) + 1.0


def run_override(q, k, v, heads, state, patch, skip_reshape, mask=None):
    """As in a model call: the APPLY_MODEL wrapper activates the effects, then attention runs."""
    options = {PATCH_KEY: patch}
    if state.activate(patch):
        options[FORWARD_KEY] = state
    kwargs = dict(transformer_options=options, skip_reshape=skip_reshape, mask=mask)
    return _attention_override(COMFY_ATTENTION, q, k, v, heads=heads, **kwargs)


def forward_state(family, frames, height, width, patch_size, sigma, block_tokens):
    state = ForwardState(
        family=family, patch_size=patch_size, sigma=sigma, device=torch.device("cpu"),
        model_sampling=flow_sampling(), cond_or_uncond=[0, 1], latent_grid=(frames, height, width),
    )
    state.block_index, state.block_type, state.block_tokens = 0, "double_block", block_tokens
    return state


LAYOUTS = {
    # name: family, patch size, latent frames/height/width, prefix tokens, text tokens in the joint sequence
    "wan": (WAN, (1, 2, 2), 4, 6, 4, 0, 0),
    "wan_odd_grid": (WAN, (1, 2, 2), 3, 5, 7, 0, 0),
    # 4,800 queries: groups are cut into several attention calls (checked on fewer combinations: it is slow)
    "wan_many_calls_per_group": (WAN, (1, 2, 2), 5, 64, 60, 0, 0),
    "hunyuan_joint_text": (HUNYUAN_VIDEO_15, (1, 1, 1), 3, 3, 4, 0, 5),
    "hunyuan_prefix": (HUNYUAN_VIDEO_15, (1, 1, 1), 3, 2, 3, 6, 4),
}


@pytest.mark.parametrize(
    "layout_name,schedule,strength,ref_frames,chained",
    [
        (layout, schedule, strength, ref_frames, chained)
        for layout, schedule, strength, (ref_frames, chained) in itertools.product(
            LAYOUTS, ("uniform", "linear", "log"), (-1.5, 0.0, 0.7, 3.0), ((1, False), (1, True), (2, False))
        )
        if layout != "wan_many_calls_per_group" or (strength == 0.7 and schedule != "linear")
    ],
)
def test_patched_attention_matches_reference(layout_name, schedule, strength, ref_frames, chained):
    family, patch_size, frames, height, width, prefix, text = LAYOUTS[layout_name]
    grid = (frames, -(-height // patch_size[1]), -(-width // patch_size[2]))
    tokens_per_frame = grid[1] * grid[2]
    video_tokens = frames * tokens_per_frame
    heads, dim_head, batch = 2, 16, 2
    generator = torch.Generator().manual_seed(hash((layout_name, schedule, strength, ref_frames)) % 2**31)
    seq = prefix + video_tokens + text
    q, k, v = (torch.randn(batch, heads, seq, dim_head, generator=generator) for _ in range(3))

    joint = family.joint_attention
    state = forward_state(family, frames, height, width, patch_size, sigma=0.99, block_tokens=prefix + video_tokens
                          if joint else seq)
    effect = DyMoSEffect(strength, tau=0.5, schedule=schedule, reference_frames=ref_frames)
    patch = MotionDialsPatch(family, patch_size, (effect,), scaled_values_override if chained else None)

    text_mask = None
    if text:
        text_mask = torch.zeros(1, 1, seq)
        text_mask[..., -2:] = -1e4  # padding of the text, as HunyuanVideo masks it
    if joint:
        got = run_override(q, k, v, heads, state, patch, skip_reshape=True, mask=text_mask)  # as flux.math calls it
    else:
        flat = [t.transpose(1, 2).reshape(batch, seq, heads * dim_head) for t in (q, k, v)]
        got = run_override(*flat, heads, state, patch, skip_reshape=False)

    ref_v = v * 0.5 if chained else v
    expected = reference_attention(
        q, k, ref_v, heads, video_start=prefix, frames=frames, tokens_per_frame=tokens_per_frame,
        ref_frames=ref_frames, strength=strength, schedule=schedule, text_mask=text_mask,
    )
    expected = expected.transpose(1, 2).reshape(batch, seq, heads * dim_head) + (1.0 if chained else 0.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chained", [False, True])
def test_inactive_step_and_zero_strength_are_bit_identical(chained):
    heads, batch, seq, width = 2, 2, 4 * 3 * 2, 32
    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(batch, seq, width, generator=generator) for _ in range(3))
    previous = scaled_values_override if chained else None

    def unpatched():
        if previous is None:
            return COMFY_ATTENTION(q, k, v, heads, skip_reshape=False)
        return previous(COMFY_ATTENTION, q, k, v, heads, skip_reshape=False)

    sampling = flow_sampling()
    late_sigma = sampling.percent_to_sigma(0.6)
    for strength, sigma in ((1.0, late_sigma), (0.0, 0.999)):
        state = forward_state(WAN, 4, 6, 4, (1, 2, 2), sigma=sigma, block_tokens=seq)
        patch = MotionDialsPatch(WAN, (1, 2, 2), (DyMoSEffect(strength, 0.5, "uniform", 1),), previous)
        got = run_override(q, k, v, heads, state, patch, skip_reshape=False)
        assert torch.equal(got, unpatched())


def test_active_window_follows_percent_to_sigma():
    """The step sitting on percent_to_sigma(tau) already belongs to the inactive part."""
    sampling = flow_sampling()
    sigmas = [sampling.percent_to_sigma(p / 10) for p in range(10)]
    state = forward_state(WAN, 2, 2, 2, (1, 2, 2), sigma=0.0, block_tokens=4)
    active = []
    for sigma in sigmas:
        state.sigma = sigma
        active.append(state.before_percent(0.2))
    assert active == [True, True] + [False] * 8
