"""DyMoS through the real model of every supported family, on this host, against a plain dense reference.

One model call of the patched clone must equal the unpatched model whose video self-attention (joint attention
for MM-DiT families) is replaced, for that call only, by the definition: full logits, the DyMoS bias on the
logits of generated-frame queries for reference-frame keys, softmax. Compared at the model output and at the
output of every attention layer the bias touches (a two-block model: a wrong layout can hide at the output).

The reference finds the video tokens from what the host itself says, never from the core:
* Wan: the tokens of the latent's grid (``transformer_options["grid_sizes"]`` where the host reports it, else
  the latent's shape over the patch size) open the stream; anything appended follows them;
* HunyuanVideo 1.5: where the image stream sits in the joint attention, as the host reports it to attention
  patches (``img_slice``, ComfyUI 0.33.0), or as the block states it (``flipped_img_txt``, ComfyUI 0.3.75);
* CogVideoX: text first, as its block splits the joint output (``attn_out.split([text_seq_length, ...])``).
"""

from __future__ import annotations

import math

import node_helpers
import pytest
import torch
from sampling import CASES, conditioning, load_tiny
from test_dymos_exactness import reference_attention

from motion_dials.nodes.dymos import DyMoSEffect, DyMoSMotionSlider
from motion_dials.nodes.patcher_core import AttentionKind, MotionEffect, apply_effect

VARIANTS = {"strength 1.5 uniform": (1.5, "uniform", 1), "strength 0.8 linear": (0.8, "linear", 1),
            "strength -2 log, 2 reference frames": (-2.0, "log", 2)}


class HostLayout:
    """The family's video attention calls and video positions as the host states them, seen through test hooks."""

    def __init__(self, model, case_name: str):
        self.diffusion_model = model.get_model_object("diffusion_model")
        self.family = CASES[case_name].family
        self.latent_shape = conditioning(case_name)[2]["samples"].shape
        self.block = None  # the module making the video attention call, while it runs
        self.image_offset = None  # HunyuanVideo: where its image stream starts, as the host reported it
        self.layer_outputs: list[torch.Tensor] = []
        self.hooks = []

    def attention_modules(self):
        """(module whose run makes the video attention call, module whose input or output is that call's result)."""
        if self.family == "wan":
            return [(block.self_attn, block.self_attn, "output") for block in self.diffusion_model.blocks]
        if self.family == "hunyuan_video_1.5":
            return [(block, module, "input") for block in self.diffusion_model.double_blocks
                    for module in (block.img_attn.proj, block.txt_attn.proj)]
        return [(block, block.attn_out, "input") for block in self.diffusion_model.blocks]

    def __enter__(self):
        def enter(module, *_):
            self.block = module

        def leave(*_):
            self.block = None

        def keep_output(_module, _inputs, output):
            self.layer_outputs.append(output.detach().clone())

        def keep_input(_module, inputs):
            self.layer_outputs.append(inputs[0].detach().clone())

        modules = self.attention_modules()
        for caller in dict.fromkeys(caller for caller, _, _ in modules):
            self.hooks += [caller.register_forward_pre_hook(enter), caller.register_forward_hook(leave)]
        for _, module, kind in modules:
            self.hooks.append(module.register_forward_hook(keep_output) if kind == "output"
                              else module.register_forward_pre_hook(keep_input))
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()

    def attention_patches(self) -> dict:
        """HunyuanVideo, on hosts that report img_slice to attention patches: a patch that keeps it."""
        if self.family != "hunyuan_video_1.5":
            return {}

        def keep(q, k, v, extra_options=None, **_):
            self.image_offset = extra_options["img_slice"][0]
            return {}

        return {"attn1_patch": [keep]}

    def add_patches_to(self, model):
        for name, patches in self.attention_patches().items():
            model.model_options["transformer_options"].setdefault("patches", {})[name] = patches

    def video_positions(self, q, attention_kwargs):
        """(video start, token grid) of the attention call being made, or None outside the video attention."""
        if self.block is None:
            return None
        options = attention_kwargs["transformer_options"]
        grid = self._token_grid(options)
        sequence = q.shape[2 if attention_kwargs.get("skip_reshape", False) else 1]
        video = math.prod(grid)
        if self.family == "wan":
            return 0, grid
        if self.family == "hunyuan_video_1.5":
            if self.image_offset is not None:
                return self.image_offset, grid
            if hasattr(self.block, "flipped_img_txt"):
                return (0 if self.block.flipped_img_txt else sequence - video), grid
            raise AssertionError("this host reports no order of HunyuanVideo's joint attention")
        return sequence - video, grid  # CogVideoX: text, then video

    def _token_grid(self, transformer_options):
        reported = transformer_options.get("grid_sizes")
        if self.family == "wan" and reported is not None:
            return tuple(int(size) for size in reported)
        patch = self.diffusion_model.patch_size
        if isinstance(patch, int):  # CogVideoX: spatial patch, and an optional temporal one
            patch = (self.diffusion_model.patch_size_t or 1, patch, patch)
        return tuple(-(-size // p) for size, p in zip(self.latent_shape[-3:], patch, strict=True))


def dense_dymos(q, k, v, heads, *, mask, skip_reshape, skip_output_reshape, video_start, grid, strength, schedule,
                reference_frames):
    """The definition (tests/test_dymos_exactness.py's reference_attention, float64) in and out in ComfyUI's
    attention layouts: [B, N, H*D], or [B, H, N, D] with skip_reshape / skip_output_reshape."""
    if not skip_reshape:
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    frames, height, width = grid
    out = reference_attention(q, k, v, heads, video_start=video_start, frames=frames, tokens_per_frame=height * width,
                              ref_frames=reference_frames, strength=strength, schedule=schedule,
                              text_mask=mask).to(q.dtype)
    return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


def reference_model(model, layout: HostLayout, strength, schedule, reference_frames):
    """The unpatched model with the dense reference in place of its video attention."""
    def override(func, q, k, v, heads=None, **kwargs):
        heads = heads if heads is not None else kwargs.pop("heads")
        found = layout.video_positions(q, kwargs)
        if found is None:
            return func(q, k, v, heads, **kwargs)
        start, grid = found
        return dense_dymos(q, k, v, heads, mask=kwargs.get("mask"), skip_reshape=kwargs.get("skip_reshape", False),
                           skip_output_reshape=kwargs.get("skip_output_reshape", False), video_start=start,
                           grid=grid, strength=strength, schedule=schedule, reference_frames=reference_frames)

    clone = model.clone()
    clone.model_options["transformer_options"]["optimized_attention_override"] = override
    layout.add_patches_to(clone)
    return clone


def one_call(model, case_name, positive=None):
    """One step from pure noise, Euler to sigma 0: the latent is the model's denoised output of that one call."""
    import nodes

    default_positive, negative, latent = conditioning(case_name)
    return nodes.common_ksampler(model, 0, 1, 2.0, "euler", "simple", positive or default_positive, negative,
                                 latent)[0]["samples"]


def compare(case_name, model, patched, strength, schedule, reference_frames, positive=None):
    """The patched clone's call against the reference's, at every recorded attention layer and at the output."""
    with HostLayout(model, case_name) as layout:
        expected = one_call(reference_model(model, layout, strength, schedule, reference_frames), case_name, positive)
        expected_layers, layout.layer_outputs = layout.layer_outputs, []
        layout.add_patches_to(patched)
        got = one_call(patched, case_name, positive)
        got_layers = layout.layer_outputs
    assert len(got_layers) == len(expected_layers) > 0
    for index, (got_layer, expected_layer) in enumerate(zip(got_layers, expected_layers, strict=True)):
        scale = float(expected_layer.abs().max())
        torch.testing.assert_close(got_layer, expected_layer, rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda message, i=index: f"attention layer output {i}: {message}")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    return expected


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case_name", list(CASES))
def test_one_model_call_equals_the_dense_reference_at_the_output_and_every_attention_layer(
        tiny_models, case_name, variant):
    strength, schedule, reference_frames = VARIANTS[variant]
    model = load_tiny(case_name)
    assert model.model.get_dtype() == torch.float32, "the tolerance of 1e-5 is stated for float32"
    patched = DyMoSMotionSlider.execute(model, strength, 1.0, schedule, reference_frames).result[0]
    expected = compare(case_name, model, patched, strength, schedule, reference_frames)
    # The reference is not the plain model: it carries the bias.
    assert not torch.allclose(expected, one_call(model, case_name), rtol=0, atol=1e-7)


class BiasRecorder(MotionEffect):
    """Keeps, for each attention call, which queries carry a key bias, on which keys, and the host's layout."""

    def __init__(self, layout: HostLayout):
        self.layout = layout
        self.calls = []

    def observe_attention(self, ctx, q, k, heads, groups, attention_kwargs):
        biased_queries, biased_keys = set(), set()
        for group in groups:
            if group.key_bias is not None and bool((group.key_bias != 0).any()):
                queries = range(group.start, group.stop) if group.positions is None else group.positions.tolist()
                biased_queries.update(queries)
                biased_keys.update(torch.nonzero(group.key_bias).flatten().tolist())
        self.calls.append((ctx.kind, biased_queries, biased_keys, self.layout.video_positions(q, attention_kwargs)))


@pytest.mark.parametrize("case_name", list(CASES))
def test_the_bias_lands_on_exactly_the_latent_frames_after_the_reference(tiny_models, case_name):
    """What would have caught HunyuanVideo 1.5 on ComfyUI 0.33.0 (text first): every biased query is a token of a
    latent frame >= 1 and every biased key a token of frame 0, by the host's own layout, and all of them are."""
    model = load_tiny(case_name)
    with HostLayout(model, case_name) as layout:
        recorder = BiasRecorder(layout)
        patched = apply_effect(apply_effect(model, DyMoSEffect(1.0, 1.0, "uniform", 1)), recorder)
        layout.add_patches_to(patched)
        one_call(patched, case_name)
    video_calls = [call for call in recorder.calls if call[3] is not None]
    assert video_calls, "no video attention call was seen"
    assert all(kind in (AttentionKind.VIDEO_SELF, AttentionKind.JOINT) for kind, *_ in video_calls)
    assert all(not queries for kind, queries, _, found in recorder.calls if found is None)
    for _, queries, keys, (start, (frames, height, width)) in video_calls:
        per_frame = height * width
        assert queries == set(range(start + per_frame, start + frames * per_frame))
        assert keys == set(range(start, start + per_frame))


def test_wan_tokens_appended_after_the_video_are_left_alone(tiny_models):
    """Wan's in-context latents (context_latents, ComfyUI 0.33.0) append tokens after the video: the bias stays on
    the video's frames, and one call still equals the reference. A host without them ignores the conditioning."""
    case_name = "wan2.1_t2v"
    model = load_tiny(case_name)
    positive, _, latent = conditioning(case_name)
    context = [torch.randn(1, 16, 1, *latent["samples"].shape[-2:], generator=torch.Generator().manual_seed(5))]
    positive = node_helpers.conditioning_set_values(positive, {"context_latents": context})
    patched = DyMoSMotionSlider.execute(model, 1.5, 1.0, "uniform", 1).result[0]
    compare(case_name, model, patched, 1.5, "uniform", 1, positive=positive)
