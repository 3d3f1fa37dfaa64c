"""MIVA's image-to-video on a text-to-video base (the MIVA paper): the image as latent frame 0, the initial noise,
AdaIN after sampling.

The image is held by a noise mask, not by the model: every sampler then re-noises latent frame 0 from the image
at each step and puts the image back into its prediction (ComfyUI's inpainting path), so frame 0 comes out as
the image with any sampler (as far as it denoises: ComfyUI's UniPC stops at sigma 0.001). MIVA Noise adds the
paper's two pre-processing steps for SamplerCustomAdvanced, MIVA AdaIN its post-processing step.
"""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.utils
import torch
from comfy_api.latest import io

import nodes as comfy_nodes

from ..models.latent_init import adain_to_first_frame, dct_low_pass_mix, share_first_frame_noise
from .input_checks import MotionDialsNode, check_image

CATEGORY = "Motion Dials/MIVA"
DCT_INIT_TIMESTEP = 975.0  # the image latent is noised to t = 975 (of 1000) before its low frequencies are kept
TEMPORAL_COMPRESSION = 4  # Wan's VAE: pixel frames 4k + 1 -> latent frames k + 1


def image_to_video_latent(vae, start_image: torch.Tensor, width: int, height: int, length: int,
                          batch_size: int) -> dict:
    """``{"samples": [B, C, F, H, W], "noise_mask": [B, 1, F, H, W]}`` with the encoded image as frame 0.

    The image is resized and centre-cropped to ``width`` x ``height`` as WanImageToVideo does; frames >= 1 are
    zero. The mask is 0 on frame 0 (kept) and 1 elsewhere (denoised). ComfyUI 0.3.75 takes a 5-D mask as it is
    (``comfy.utils.reshape_mask`` interpolates its last three axes trilinearly to the latent's, an identity at
    the same size, and repeats channels and batch); a mask of fewer axes would be read as ``[frames, H, W]``.
    """
    image = comfy.utils.common_upscale(start_image[:1].movedim(-1, 1), width, height, "bilinear", "center")
    image_latent = vae.encode(image.movedim(1, -1)[:, :, :, :3])
    if image_latent.ndim != 5:
        raise ValueError(f"MIVA Image To Video Latent needs a video VAE such as Wan 2.1's; this one encodes an "
                         f"image to {list(image_latent.shape)} instead of [1, C, 1, H, W].")
    frames = (length - 1) // TEMPORAL_COMPRESSION + 1
    device = comfy.model_management.intermediate_device()
    samples = torch.zeros((batch_size, image_latent.shape[1], frames, *image_latent.shape[-2:]), device=device)
    samples[:, :, :1] = image_latent[:, :, :1].to(device)
    noise_mask = torch.ones((batch_size, 1, frames, *image_latent.shape[-2:]), device=device)
    noise_mask[:, :, 0] = 0.0
    return {"samples": samples, "noise_mask": noise_mask}


def sigma_at_timestep(model_sampling, timestep: float) -> float:
    """The smallest sigma at which the model's own timestep reaches ``timestep``, by bisection.

    A model's timestep grows with sigma. For flow models (Wan: timestep = 1000 sigma, whatever the shift) the
    answer for 975 is exactly 0.975; for models with discrete steps (SD) it is within half a step of step 975.
    """
    def timestep_of(sigma: float) -> float:
        return float(model_sampling.timestep(torch.tensor([sigma], dtype=torch.float64)))

    low, high = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    if not timestep_of(low) <= timestep <= timestep_of(high):
        raise ValueError(f"this model's timesteps run from {timestep_of(low):g} to {timestep_of(high):g}; "
                         f"MIVA's DCT initialisation needs a model whose timesteps reach {timestep:g} (of 1000).")
    for _ in range(64):
        middle = (low + high) / 2
        if timestep_of(middle) < timestep:
            low = middle
        else:
            high = middle
    return high


class MIVAInitialNoise:
    """A NOISE for SamplerCustomAdvanced: MIVA's pre-processing of ComfyUI's seeded Gaussian noise.

    With ``eps = comfy.sample.prepare_noise(latent, seed)`` (RandomNoise's noise, per frame ``eps_f``):

    1. shared noise: ``eps_f <- w * eps_0 + (1 - w) * eps_f`` for ``f >= 1`` (``w = shared_noise``);
    2. DCT initialisation, frames ``f >= 1``:
       ``noise_f = idct_3d(M * dct_3d(x_975) + (1 - M) * dct_3d(eps))`` with the image latent (frame 0 of the
       latent, in the model's latent space, the same for every frame as in LAMP and Cinemo) noised to t = 975 by
       the model itself with the same ``eps``:
       ``x_975 = calculate_input(s, noise_scaling(s, eps_f, image))``, ``s`` = the sigma of timestep 975
       (Wan: ``0.025 * image + 0.975 * eps_f``; for an EPS model, the DDPM ``x_t``); ``M`` keeps the lowest
       ``cutoff`` of each spatial axis and every temporal frequency (``models.latent_init.low_pass_mask``).
    Frame 0 keeps ``eps_0``: the sampler re-noises the image with it at every step.

    What the model meets: the sampler starts from ``x_T = noise_scaling(sigma_max, noise, latent)``. For flow
    models (Wan) ``sigma_max`` is 1, so on frames >= 1 ``x_T`` is exactly ``noise`` above: low frequencies of the
    image noised to t = 975, high frequencies of the fresh noise. Made for sampling from the model's top sigma
    (denoise 1), as in the paper.
    """

    def __init__(self, seed: int, model_sampling, latent_format, shared_noise: float, dct_cutoff: float | None):
        self.seed = seed
        self.model_sampling = model_sampling
        self.latent_format = latent_format
        self.shared_noise = shared_noise
        self.dct_cutoff = dct_cutoff
        self.dct_sigma = None if dct_cutoff is None else sigma_at_timestep(model_sampling, DCT_INIT_TIMESTEP)

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        latent = input_latent["samples"]
        if latent.ndim != 5:
            raise ValueError(f"MIVA Noise needs a video latent [B, C, F, H, W]; got {list(latent.shape)}.")
        noise = comfy.sample.prepare_noise(latent, self.seed, input_latent.get("batch_index"))
        noise = share_first_frame_noise(noise.float(), self.shared_noise)
        if self.dct_cutoff is None or latent.shape[2] == 1:  # a single frame is the image: nothing to initialise
            return noise.to(latent.dtype)
        image = latent[:, :, :1].float()
        if torch.count_nonzero(latent) > 0:  # the sampler moves a latent into model space only when it is not empty
            image = self.latent_format.process_in(image)
        fresh = noise[:, :, 1:]
        sigma = torch.tensor([self.dct_sigma])
        noised_image = self.model_sampling.calculate_input(
            sigma, self.model_sampling.noise_scaling(sigma, fresh, image.expand_as(fresh)))
        noise[:, :, 1:] = dct_low_pass_mix(noised_image, fresh, self.dct_cutoff)
        return noise.to(latent.dtype)


class MIVAImageToVideoLatent(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MIVAImageToVideoLatent",
            display_name="MIVA Image To Video Latent",
            category=CATEGORY,
            description="Image to video on a text-to-video model (MIVA's Wan 2.1 T2V setting): the VAE-encoded "
            "image becomes latent frame 0 and a noise mask keeps it there through sampling with any sampler; "
            "the other frames are generated. Use with MIVA Noise for the paper's initial noise.",
            inputs=[
                io.Vae.Input("vae", tooltip="The video model's VAE (wan_2.1_vae for Wan 2.1)."),
                io.Image.Input("start_image", tooltip="The image that becomes the first frame; resized and "
                               "centre-cropped to width x height. Of a batch, only the first image is used."),
                io.Int.Input("width", default=832, min=16, max=comfy_nodes.MAX_RESOLUTION, step=16,
                             tooltip="Video width in pixels (the paper's Wan setting: 832)."),
                io.Int.Input("height", default=480, min=16, max=comfy_nodes.MAX_RESOLUTION, step=16,
                             tooltip="Video height in pixels (the paper's Wan setting: 480)."),
                io.Int.Input("length", default=17, min=1, max=comfy_nodes.MAX_RESOLUTION, step=4,
                             tooltip="Video frames, 4k + 1 for Wan (17 frames = 5 latent frames, the paper's "
                             "Wan setting)."),
                io.Int.Input("batch_size", default=1, min=1, max=4096,
                             tooltip="Videos to generate at once, all from the same image."),
            ],
            outputs=[io.Latent.Output(
                tooltip="Latent frame 0 is the image, the other frames are empty; its noise mask keeps frame 0 "
                "as the image through sampling.")],
        )

    @classmethod
    def execute(cls, vae, start_image, width, height, length, batch_size) -> io.NodeOutput:
        cls.check_inputs(width=width, height=height, length=length, batch_size=batch_size)
        check_image("MIVA Image To Video Latent", "start_image", start_image)
        return io.NodeOutput(image_to_video_latent(vae, start_image, width, height, length, batch_size))


class MIVANoise(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MIVANoise",
            display_name="MIVA Noise",
            category=CATEGORY,
            description="The initial noise of MIVA's image-to-video sampling, for SamplerCustomAdvanced: seeded "
            "Gaussian noise (as RandomNoise), with a share of frame 0's noise in every frame and, with DCT "
            "initialisation, the low spatial frequencies taken from the image latent noised to t = 975. With "
            "shared_noise 0 and dct_init off it is RandomNoise.",
            inputs=[
                io.Int.Input("noise_seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The seed of the Gaussian noise; the same seed gives RandomNoise's noise "
                             "before MIVA's changes."),
                io.Model.Input("model", tooltip="The model that samples: its noise schedule says which sigma "
                               "is t = 975 and its latent format how the image latent looks to it."),
                io.Float.Input("shared_noise", default=0.05, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of frame 0's noise mixed into every other frame: "
                               "eps_f = w * eps_0 + (1 - w) * eps_f. 0 turns it off; the paper uses 0.05."),
                io.Boolean.Input("dct_init", default=True,
                                 tooltip="DCT initialisation (Cinemo's DCTInit): the low spatial frequencies of "
                                 "frames >= 1 come from the image latent noised to t = 975, the rest from the "
                                 "noise. Needs the latent from MIVA Image To Video Latent (image in frame 0)."),
                io.Float.Input("cutoff", default=0.23, min=0.0, max=1.0, step=0.01,
                               tooltip="DCT initialisation: the share of each spatial axis's frequencies that "
                               "counts as low (every temporal frequency does). 0: none, 1: all; the paper "
                               "uses 0.23."),
            ],
            outputs=[io.Noise.Output(tooltip="For SamplerCustomAdvanced's noise input. Made for sampling from "
                                     "the model's top sigma (denoise 1).")],
        )

    @classmethod
    def execute(cls, noise_seed, model, shared_noise, dct_init, cutoff) -> io.NodeOutput:
        cls.check_inputs(noise_seed=noise_seed, shared_noise=shared_noise, dct_init=dct_init, cutoff=cutoff)
        return io.NodeOutput(MIVAInitialNoise(
            noise_seed, model.get_model_object("model_sampling"), model.get_model_object("latent_format"),
            shared_noise, cutoff if dct_init else None))


class MIVAAdaIN(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MIVAAdaIN",
            display_name="MIVA AdaIN",
            category=CATEGORY,
            description="MIVA's post-processing, once after the last step and before VAE decoding: every latent "
            "frame after the first takes frame 0's mean and standard deviation, per channel.",
            inputs=[io.Latent.Input("samples", tooltip="The sampled video latent, frame 0 being the image.")],
            outputs=[io.Latent.Output(
                tooltip="The same latent with frames >= 1 matched to frame 0; frame 0 is unchanged and the noise "
                "mask is dropped (the video is finished).")],
        )

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        video = samples["samples"]
        if video.ndim != 5:
            raise ValueError(f"MIVA AdaIN needs a video latent [B, C, F, H, W]; got {list(video.shape)}.")
        matched = {key: value for key, value in samples.items() if key != "noise_mask"}
        matched["samples"] = adain_to_first_frame(video)
        return io.NodeOutput(matched)


NODES = (MIVAImageToVideoLatent, MIVANoise, MIVAAdaIN)
