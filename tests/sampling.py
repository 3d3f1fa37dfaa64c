"""Sampling the tiny models in-process with ComfyUI's real loaders, nodes and samplers.

Text and vision encoders cannot be tiny, so the test-fixture nodes (tests/host_fixture) give their
outputs, as in the server tests; everything downstream (WanImageToVideo with the tiny VAE, the model,
KSampler) is ComfyUI's own.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass

import torch

if __package__:  # tests.sampling, from the benchmarks
    from .host import FIXTURE_NODES
else:  # from the tests, with tests/ on sys.path
    from host import FIXTURE_NODES

sys.path.insert(0, str(FIXTURE_NODES))
from motion_dials_test_fixture import MotionDialsTestClipVision, MotionDialsTestConditioning  # noqa: E402

FRAMES, HEIGHT, WIDTH = 9, 64, 64  # pixels: 3 latent frames of 8 x 8 (Wan) or 4 x 4 (HunyuanVideo 1.5)


@dataclass(frozen=True)
class Case:
    model_file: str
    family: str  # of the fixture encoders
    # How the reference image enters: "wan_clip" (Wan 2.1 I2V), "wan_first_last" (FLF2V), "wan_latent", "none",
    # "hunyuan15", "cogvideox".
    image: str
    latent_channels: int
    needs: str = ""  # a module of the host, for families not every host has


ALL_CASES = {
    "wan2.1_i2v": Case("wan2.1_i2v_480p_14B_fp16.safetensors", "wan", "wan_clip", 16),
    "wan2.1_flf2v": Case("wan2.1_flf2v_720p_14B_fp16.safetensors", "wan", "wan_first_last", 16),
    "wan2.1_t2v": Case("wan2.1_t2v_1.3B_fp16.safetensors", "wan", "none", 16),
    "wan2.2_i2v_high": Case("wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors", "wan", "wan_latent", 16),
    "wan2.2_i2v_low": Case("wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors", "wan", "wan_latent", 16),
    "wan2.2_ti2v_5b": Case("wan2.2_ti2v_5B_fp16.safetensors", "wan", "none", 48),
    "hunyuan15_i2v": Case("hunyuanvideo1.5_720p_i2v_fp16.safetensors", "hunyuan_video_1.5", "hunyuan15", 32),
    "cogvideox_i2v": Case("cogvideox_5b_i2v_bf16.safetensors", "cogvideox", "cogvideox", 16, "comfy.ldm.cogvideo"),
}
# The cases of this host: every supported family it has.
CASES = {name: case for name, case in ALL_CASES.items()
         if not case.needs or importlib.util.find_spec(case.needs) is not None}


def load_tiny(name: str):
    import nodes

    return nodes.UNETLoader().load_unet(CASES[name].model_file, "default")[0]


@functools.cache
def conditioning(name: str):
    """(positive, negative, latent) for a case, built the way the real I2V nodes build them."""
    import comfy_extras.nodes_wan
    import node_helpers

    import nodes

    case = CASES[name]
    generator = torch.Generator().manual_seed(1234)
    positive = MotionDialsTestConditioning().encode(case.family, "a red ball rolls across the table", 8)[0]
    negative = MotionDialsTestConditioning().encode(case.family, "static", 8)[0]
    image = torch.rand(1, HEIGHT, WIDTH, 3, generator=generator)
    vision = None if case.image == "cogvideox" else MotionDialsTestClipVision().encode(image, case.family)[0]

    if case.image in ("wan_clip", "wan_latent"):
        vae = nodes.VAELoader().load_vae("wan_2.1_vae.safetensors")[0]
        clip_vision = vision if case.image == "wan_clip" else None
        positive, negative, latent = comfy_extras.nodes_wan.WanImageToVideo.execute(
            positive, negative, vae, WIDTH, HEIGHT, FRAMES, 1, start_image=image, clip_vision_output=clip_vision
        ).result
        return positive, negative, latent
    if case.image == "wan_first_last":
        vae = nodes.VAELoader().load_vae("wan_2.1_vae.safetensors")[0]
        last = torch.rand(1, HEIGHT, WIDTH, 3, generator=generator)
        last_vision = MotionDialsTestClipVision().encode(last, case.family)[0]
        positive, negative, latent = comfy_extras.nodes_wan.WanFirstLastFrameToVideo.execute(
            positive, negative, vae, WIDTH, HEIGHT, FRAMES, 1, start_image=image, end_image=last,
            clip_vision_start_image=vision, clip_vision_end_image=last_vision,
        ).result
        return positive, negative, latent

    scale = 16 if case.latent_channels in (32, 48) else 8
    latent_frames = (FRAMES - 1) // 4 + 1
    samples = torch.zeros(1, case.latent_channels, latent_frames, HEIGHT // scale, WIDTH // scale)
    if case.image == "cogvideox":
        # What an I2V conditioning gives CogVideoX: the image latent as frame 0 of concat_latent_image (the model
        # pads the later frames with zeros), a random stand-in as its VAE is not tiny.
        image_latent = torch.randn(samples[:, :, :1].shape, generator=generator)
        positive = node_helpers.conditioning_set_values(positive, {"concat_latent_image": image_latent})
        negative = node_helpers.conditioning_set_values(negative, {"concat_latent_image": image_latent})
    if case.image == "hunyuan15":
        # What HunyuanVideo15ImageToVideo adds, with a random stand-in for the image latent (its VAE is not tiny).
        image_latent = torch.zeros_like(samples)
        image_latent[:, :, :1] = torch.randn(samples[:, :, :1].shape, generator=generator)
        mask = torch.ones(1, 1, latent_frames, *samples.shape[-2:])
        mask[:, :, :1] = 0.0
        extra = {"concat_latent_image": image_latent, "concat_mask": mask, "clip_vision_output": vision}
        positive = node_helpers.conditioning_set_values(positive, extra)
        negative = node_helpers.conditioning_set_values(negative, extra)
    return positive, negative, {"samples": samples}


def sample_tiny(name: str, model, steps: int = 3, *, seed: int = 0, cfg: float = 2.0, sampler: str = "euler",
                start_step: int | None = None, last_step: int | None = None, latent=None) -> torch.Tensor:
    """Sample with ComfyUI's KSampler path (common_ksampler); returns the latent samples."""
    import nodes

    positive, negative, start_latent = conditioning(name)
    return nodes.common_ksampler(
        model, seed, steps, cfg, sampler, "simple", positive, negative, latent or start_latent,
        start_step=start_step, last_step=last_step, force_full_denoise=last_step is None,
        disable_noise=start_step not in (None, 0),
    )[0]["samples"]


def sigmas_of(model, steps: int) -> torch.Tensor:
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)


def boundary_between(model, step: int, steps: int) -> float:
    """An EDG boundary that makes the switch happen right before ``step`` (its sigma is the first late one)."""
    sampling, sigmas = model.get_model_object("model_sampling"), sigmas_of(model, steps)
    above, below = (float(sampling.timestep(sigmas[i : i + 1])) / 1000 for i in (step - 1, step))
    return (above + below) / 2
