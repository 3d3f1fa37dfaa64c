"""DyMoS's bias as the attention kernel applies it equals a plain biased softmax, over many token layouts.

(Through the real model of each family, with the layout the host gives: tests/test_layout_exactness.py.)
"""

import functools
import itertools
import math

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_sampling
import pytest
import torch

from motion_dials.models.attention import grouped_bias_attention
from motion_dials.models.dymos import dymos_query_groups, frame_weight
from motion_dials.nodes.families import WAN
from motion_dials.nodes.patcher_core import ForwardState

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


LAYOUTS = {
    # name: patch size, latent frames/height/width, tokens before the video, text tokens after it
    "wan": ((1, 2, 2), 4, 6, 4, 0, 0),
    "wan_odd_grid": ((1, 2, 2), 3, 5, 7, 0, 0),
    # 4,800 queries: groups are cut into several attention calls (checked on fewer combinations: it is slow)
    "wan_many_calls_per_group": ((1, 2, 2), 5, 64, 60, 0, 0),
    "joint_text_after": ((1, 1, 1), 3, 3, 4, 0, 5),
    "joint_prefix_and_text": ((1, 1, 1), 3, 2, 3, 6, 4),
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
def test_biased_attention_matches_the_dense_reference(layout_name, schedule, strength, ref_frames, chained):
    patch_size, frames, height, width, prefix, text = LAYOUTS[layout_name]
    grid = (frames, -(-height // patch_size[1]), -(-width // patch_size[2]))
    tokens_per_frame = grid[1] * grid[2]
    heads, dim_head, batch = 2, 16, 2
    generator = torch.Generator().manual_seed(hash((layout_name, schedule, strength, ref_frames)) % 2**31)
    seq = prefix + frames * tokens_per_frame + text
    q, k, v = (torch.randn(batch, heads, seq, dim_head, generator=generator) for _ in range(3))
    groups = dymos_query_groups(sequence_length=seq, video_start=prefix, num_frames=frames,
                                tokens_per_frame=tokens_per_frame, ref_frames=ref_frames, strength=strength,
                                schedule=schedule)
    attend = functools.partial(scaled_values_override, COMFY_ATTENTION) if chained else COMFY_ATTENTION

    text_mask = None
    if text:
        text_mask = torch.zeros(1, 1, seq)
        text_mask[..., -2:] = -1e4  # padding of the text, as HunyuanVideo masks it
        got = grouped_bias_attention(attend, q, k, v, heads, groups, mask=text_mask, skip_reshape=True)
    else:
        flat = [t.transpose(1, 2).reshape(batch, seq, heads * dim_head) for t in (q, k, v)]
        got = grouped_bias_attention(attend, *flat, heads, groups)

    ref_v = v * 0.5 if chained else v
    expected = reference_attention(
        q, k, ref_v, heads, video_start=prefix, frames=frames, tokens_per_frame=tokens_per_frame,
        ref_frames=ref_frames, strength=strength, schedule=schedule, text_mask=text_mask,
    )
    expected = expected.transpose(1, 2).reshape(batch, seq, heads * dim_head) + (1.0 if chained else 0.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_active_window_follows_percent_to_sigma():
    """The step sitting on percent_to_sigma(tau) already belongs to the inactive part."""
    sampling = flow_sampling()
    sigmas = [sampling.percent_to_sigma(p / 10) for p in range(10)]
    state = ForwardState(family=WAN, sigma=0.0, device=torch.device("cpu"), model_sampling=sampling,
                         cond_or_uncond=[0, 1], latent_grid=(2, 2, 2))
    active = []
    for sigma in sigmas:
        state.sigma = sigma
        active.append(state.before_percent(0.2))
    assert active == [True, True] + [False] * 8
