"""MIVA image to video on a T2V base: the torch pieces against written-out references, the nodes on the tiny
Wan 2.1 T2V with ComfyUI's own VAE loader, KSampler and SamplerCustomAdvanced."""

import math

import comfy.k_diffusion.sampling
import comfy.model_sampling
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import pytest
import torch
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced
from sampling import conditioning, load_tiny, sigmas_of

import nodes
from motion_dials.models.latent_init import (
    adain_to_first_frame,
    dct_3d,
    dct_low_pass_mix,
    idct_3d,
    low_pass_mask,
    share_first_frame_noise,
)
from motion_dials.nodes.image_to_video import (
    NODES,
    MIVAAdaIN,
    MIVAImageToVideoLatent,
    MIVANoise,
    sigma_at_timestep,
)

CASE = "wan2.1_t2v"
WIDTH = HEIGHT = 64  # 8 x 8 latent
LENGTH = 9  # 3 latent frames
WAN_SIGMA_975 = 0.975  # Wan's timestep is 1000 sigma


def cosine_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix: C[k, i] = c_k cos(pi k (2i + 1) / 2n), c_0 = sqrt(1/n), c_k = sqrt(2/n)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * k * (2 * i + 1) / (2 * n)) * math.sqrt(2 / n)
    matrix[0] /= math.sqrt(2)
    return matrix


def reference_dct_3d(x: torch.Tensor) -> torch.Tensor:
    frames, height, width = (cosine_matrix(n) for n in x.shape[-3:])
    return torch.einsum("af,bh,cw,...fhw->...abc", frames, height, width, x.double())


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_tiny(CASE)


@pytest.fixture(scope="module")
def vae(tiny_models):
    return nodes.VAELoader().load_vae("wan_2.1_vae.safetensors")[0]


@pytest.fixture(scope="module")
def start_image():
    return torch.rand(1, 48, 80, 3, generator=torch.Generator().manual_seed(7))  # not square: the crop matters


@pytest.fixture(scope="module")
def video_latent(vae, start_image):
    return MIVAImageToVideoLatent.execute(vae, start_image, WIDTH, HEIGHT, LENGTH, 1).result[0]


# The torch pieces.

@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 8), (1, 2, 1, 6, 1), (1, 1, 4, 60, 104)])
def test_dct_3d_is_the_orthonormal_cosine_transform_and_inverts(shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(dct_3d(x), reference_dct_3d(x), atol=1e-10)
    x32 = x.float()
    assert (idct_3d(dct_3d(x32)) - x32).abs().max() < 1e-5
    # Orthonormal: energy is kept.
    assert math.isclose(float(dct_3d(x).square().sum()), float(x.square().sum()), rel_tol=1e-10)


def test_low_pass_mask_is_cinemo_rectangle_of_each_spatial_axis():
    mask = low_pass_mask(60, 104, 0.23)  # Wan 480 x 832
    assert mask.shape == (60, 104)
    assert mask.sum() == 13 * 23 and mask[:13, :23].all()  # int(60 * 0.23), int(104 * 0.23)
    assert low_pass_mask(8, 8, 1.0).all() and not low_pass_mask(8, 8, 0.0).any()


def test_low_pass_mix_takes_low_frequencies_from_one_source_and_the_rest_from_the_other():
    generator = torch.Generator().manual_seed(1)
    low_source, high_source = (torch.randn(2, 3, 4, 10, 12, generator=generator) for _ in range(2))
    assert torch.allclose(dct_low_pass_mix(low_source, high_source, 1.0), low_source, atol=1e-5)
    assert torch.allclose(dct_low_pass_mix(low_source, high_source, 0.0), high_source, atol=1e-5)

    mixed = reference_dct_3d(dct_low_pass_mix(low_source, high_source, 0.3))
    mask = low_pass_mask(10, 12, 0.3)  # 3 x 3, every temporal frequency
    assert mask.sum() == 9
    assert torch.allclose(mixed[..., mask], reference_dct_3d(low_source)[..., mask], atol=1e-5)
    assert torch.allclose(mixed[..., ~mask], reference_dct_3d(high_source)[..., ~mask], atol=1e-5)


def test_shared_noise_mixes_frame_zero_into_the_others_by_the_formula():
    noise = torch.randn(2, 4, 5, 6, 7, generator=torch.Generator().manual_seed(2))
    shared = share_first_frame_noise(noise, 0.05)
    assert torch.equal(shared[:, :, 0], noise[:, :, 0])
    for f in range(1, 5):
        assert torch.allclose(shared[:, :, f], 0.05 * noise[:, :, 0] + 0.95 * noise[:, :, f], atol=1e-7)
    assert torch.equal(share_first_frame_noise(noise, 0.0), noise)
    assert torch.equal(share_first_frame_noise(noise, 1.0)[:, :, 3], noise[:, :, 0])


def test_adain_gives_frames_after_the_first_its_mean_and_std_per_channel():
    generator = torch.Generator().manual_seed(3)
    video = torch.randn(2, 3, 4, 8, 9, generator=generator) * torch.rand(2, 3, 4, 1, 1, generator=generator) * 3
    video = video + torch.randn(2, 3, 4, 1, 1, generator=generator) * 5
    matched = adain_to_first_frame(video)

    assert torch.equal(matched[:, :, 0], video[:, :, 0])
    std, mean = torch.std_mean(matched, dim=(-2, -1))
    assert torch.allclose(mean, mean[:, :, :1].expand_as(mean), atol=1e-5)
    assert torch.allclose(std, std[:, :, :1].expand_as(std), atol=1e-5)
    # Only statistics move: each frame's standardised pattern stays.
    standardise = lambda x: (x - x.mean((-2, -1), keepdim=True)) / x.std(dim=(-2, -1), keepdim=True)  # noqa: E731
    assert torch.allclose(standardise(matched), standardise(video), atol=1e-5)


def test_adain_node_keeps_the_latent_keys_but_the_noise_mask():
    samples = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    latent = {"samples": samples, "noise_mask": torch.ones(1, 1, 3, 4, 4), "batch_index": [5]}
    out = MIVAAdaIN.execute(latent).result[0]
    assert set(out) == {"samples", "batch_index"} and out["batch_index"] == [5]
    assert torch.equal(out["samples"], adain_to_first_frame(samples))
    assert torch.equal(latent["samples"], samples)  # the input is left as it was
    with pytest.raises(ValueError, match="video latent"):
        MIVAAdaIN.execute({"samples": torch.zeros(1, 4, 8, 8)})


def test_every_node_has_its_category_and_a_tooltip_on_every_input_and_output():
    for node in NODES:
        schema = node.define_schema()
        assert schema.category == "Motion Dials/MIVA" and schema.description
        for port in [*schema.inputs, *schema.outputs]:
            assert port.tooltip, f"{schema.node_id}.{port.id} has no tooltip"


# The nodes with ComfyUI.

def test_latent_has_the_encoded_resized_image_in_frame_zero_and_a_mask_the_samplers_read(vae, start_image):
    latent = MIVAImageToVideoLatent.execute(vae, start_image, WIDTH, HEIGHT, LENGTH, 2).result[0]
    samples, mask = latent["samples"], latent["noise_mask"]
    assert samples.shape == (2, 16, 3, HEIGHT // 8, WIDTH // 8)
    resized = comfy.utils.common_upscale(start_image.movedim(-1, 1), WIDTH, HEIGHT, "bilinear", "center")
    expected = vae.encode(resized.movedim(1, -1))
    assert expected.shape == (1, 16, 1, HEIGHT // 8, WIDTH // 8)
    assert torch.allclose(samples[:, :, :1], expected.expand(2, -1, -1, -1, -1), atol=1e-6)
    assert samples[:, :, 1:].abs().max() == 0

    assert mask.shape == (2, 1, 3, HEIGHT // 8, WIDTH // 8)
    assert mask[:, :, 0].abs().max() == 0 and mask[:, :, 1:].min() == 1
    # What the sampler makes of it: the same mask on every channel, unchanged by the resize to the latent.
    denoise_mask = comfy.sampler_helpers.prepare_mask(mask, samples.shape, "cpu")
    assert denoise_mask.shape == samples.shape
    assert denoise_mask[:, :, 0].abs().max() == 0 and denoise_mask[:, :, 1:].min() == 1


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "uni_pc"])
def test_ksampler_keeps_frame_zero_as_the_image_and_generates_the_others(model, video_latent, sampler):
    positive, negative, _ = conditioning(CASE)
    image_latent = video_latent["samples"][:, :, :1]
    out = nodes.common_ksampler(model, 3, 4, 2.0, sampler, "simple", positive, negative, video_latent)[0]["samples"]
    assert torch.isfinite(out).all()
    # ComfyUI's UniPC ends at sigma 0.001, not 0: every frame keeps 0.1 % of its noise, frame 0 too.
    tolerance = 2e-2 if sampler == "uni_pc" else 1e-4
    assert (out[:, :, :1] - image_latent).abs().max() < tolerance
    assert (out[:, :, 1:] - image_latent).abs().mean() > 0.1  # generated, not copies of the image

    unmasked = {"samples": video_latent["samples"]}
    free = nodes.common_ksampler(model, 3, 4, 2.0, sampler, "simple", positive, negative, unmasked)[0]["samples"]
    assert (free[:, :, :1] - image_latent).abs().mean() > 0.1  # without the mask the image is not kept


def test_sigma_of_timestep_975():
    wan = load_tiny(CASE).get_model_object("model_sampling")
    assert math.isclose(sigma_at_timestep(wan, 975.0), WAN_SIGMA_975, abs_tol=1e-12)

    class DiscreteEps(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    discrete = DiscreteEps()
    sigma = sigma_at_timestep(discrete, 975.0)
    assert int(discrete.timestep(torch.tensor([sigma], dtype=torch.float64))) == 975  # its lower edge
    assert float(discrete.sigmas[974]) < sigma < float(discrete.sigmas[975])

    class FluxLike(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
        pass

    with pytest.raises(ValueError, match="reach 975"):
        sigma_at_timestep(FluxLike(), 975.0)  # timesteps from 0 to 1


def noise_of(model, video_latent, seed=11, **settings):
    settings = {"shared_noise": 0.05, "dct_init": True, "cutoff": 0.23} | settings
    return MIVANoise.execute(seed, model, **settings).result[0].generate_noise(video_latent)


def test_noise_is_random_noise_without_the_changes_and_deterministic_per_seed(model, video_latent):
    plain = noise_of(model, video_latent, shared_noise=0.0, dct_init=False)
    assert torch.equal(plain, Noise_RandomNoise(11).generate_noise(video_latent))
    assert torch.equal(noise_of(model, video_latent), noise_of(model, video_latent))
    assert not torch.allclose(noise_of(model, video_latent), noise_of(model, video_latent, seed=12))
    assert MIVANoise.execute(11, model, 0.05, True, 0.23).result[0].seed == 11
    single_frame = {"samples": video_latent["samples"][:, :, :1]}  # the image alone: nothing to initialise
    random = Noise_RandomNoise(11).generate_noise(single_frame)
    assert torch.equal(noise_of(model, single_frame, shared_noise=0.0), random)


def recording_euler(record: list):
    """A KSAMPLER that records the x it starts from (x_T, after ComfyUI's noise scaling), then runs Euler."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        record.append(x.detach().clone())
        return comfy.k_diffusion.sampling.sample_euler(model, x, sigmas, extra_args=extra_args, callback=callback,
                                                       disable=disable)
    return comfy.samplers.KSAMPLER(sample)


def test_sampler_custom_advanced_starts_from_the_image_low_frequencies_and_the_noise_high_ones(model, video_latent):
    seed, weight, cutoff = 11, 0.05, 0.5  # cutoff 0.5: a 4 x 4 low block of the 8 x 8 latent
    noise = MIVANoise.execute(seed, model, weight, True, cutoff).result[0]
    positive, negative, _ = conditioning(CASE)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(2.0)
    recorded = []
    out = SamplerCustomAdvanced.execute(noise, guider, recording_euler(recorded), sigmas_of(model, 4),
                                        video_latent).result[0]["samples"]

    # The intended start, written out for Wan (flow, sigma_max 1, t = 975 is sigma 0.975) in model space.
    raw = video_latent["samples"]
    eps = comfy.sample.prepare_noise(raw, seed)
    eps[:, :, 1:] = weight * eps[:, :, :1] + (1 - weight) * eps[:, :, 1:]
    image = model.get_model_object("latent_format").process_in(raw[:, :, :1])
    noised_image = (1 - WAN_SIGMA_975) * image + WAN_SIGMA_975 * eps[:, :, 1:]

    (x_start,) = recorded
    assert torch.allclose(x_start[:, :, 0], eps[:, :, 0], atol=1e-6)  # frame 0 keeps its own noise
    start, low, high = (reference_dct_3d(x) for x in (x_start[:, :, 1:], noised_image, eps[:, :, 1:]))
    mask = low_pass_mask(HEIGHT // 8, WIDTH // 8, cutoff)
    assert mask.sum() == 16
    assert torch.allclose(start[..., mask], low[..., mask], atol=1e-5)
    assert torch.allclose(start[..., ~mask], high[..., ~mask], atol=1e-5)
    # The image does show: the low block is not the noise's.
    assert (start[..., mask] - high[..., mask]).abs().max() > 1e-2

    assert (out[:, :, :1] - raw[:, :, :1]).abs().max() < 1e-4  # the mask holds here too
