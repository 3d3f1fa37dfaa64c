"""MIVA's inference-time tricks for image-to-video on a text-to-video base, as plain torch (the MIVA paper).

Video latents are ``[B, C, F, H, W]`` with the image in frame 0. Before sampling: LAMP's shared noise and
Cinemo's DCTInit build the initial noise; after sampling: AdaIN pulls every frame's statistics to frame 0's.
The model-specific part (which sigma is t = 975, how a latent is noised) stays with the nodes.
"""

from __future__ import annotations

import math

import torch

VIDEO_DIMS = (-3, -2, -1)  # frames, height, width of [B, C, F, H, W]


def share_first_frame_noise(noise: torch.Tensor, weight: float = 0.05) -> torch.Tensor:
    """LAMP's shared noise: ``eps_f = weight * eps_0 + (1 - weight) * eps_f`` for every frame ``f >= 1``.

    Frame 0 is returned unchanged. Like LAMP and the MIVA code, the mix is not variance preserving (with 0.05,
    frames >= 1 have variance 0.905 for unit Gaussian noise). ``weight`` 0 returns the noise as it was.
    """
    shared = noise.clone()
    shared[:, :, 1:] = weight * noise[:, :, :1] + (1.0 - weight) * noise[:, :, 1:]
    return shared


def _orthonormal_scale(n: int, like: torch.Tensor) -> torch.Tensor:
    scale = torch.full((n,), math.sqrt(2.0 / n), dtype=like.dtype, device=like.device)
    scale[0] = math.sqrt(1.0 / n)
    return scale


def _quarter_turns(n: int, like: torch.Tensor, sign: float) -> torch.Tensor:
    """``exp(sign * i * pi * k / (2 n))`` for k < n."""
    angle = torch.arange(n, dtype=like.dtype, device=like.device) * (sign * math.pi / (2 * n))
    return torch.polar(torch.ones_like(angle), angle)


def _dct_last(x: torch.Tensor) -> torch.Tensor:
    # Makhoul's DCT-II by one FFT: reorder to (even samples, odd samples reversed), then
    # y_k = sum_n x_n cos(pi k (2n + 1) / 2N) = Re(exp(-i pi k / 2N) FFT_k).
    n = x.shape[-1]
    reordered = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    y = (torch.fft.fft(reordered, dim=-1) * _quarter_turns(n, x, -1.0)).real
    return y * _orthonormal_scale(n, x)


def _idct_last(coefficients: torch.Tensor) -> torch.Tensor:
    # The same FFT backwards: for real input, exp(-i pi k / 2N) FFT_k = y_k - i y_(N-k) (with y_N = 0).
    n = coefficients.shape[-1]
    y = coefficients / _orthonormal_scale(n, coefficients)
    y_mirrored = torch.cat([torch.zeros_like(y[..., :1]), y[..., 1:].flip(-1)], dim=-1)
    spectrum = torch.complex(y, -y_mirrored) * _quarter_turns(n, coefficients, 1.0)
    reordered = torch.fft.ifft(spectrum, dim=-1).real
    evens = (n + 1) // 2
    x = torch.empty_like(reordered)
    x[..., ::2] = reordered[..., :evens]
    x[..., 1::2] = reordered[..., evens:].flip(-1)
    return x


def dct_3d(video: torch.Tensor) -> torch.Tensor:
    """Orthonormal 3-D DCT-II over (frames, height, width) of a ``[..., F, H, W]`` tensor (real floating point).

    Separable: a 1-D orthonormal DCT-II (``scipy.fft.dct(norm="ortho")``) along each of the three axes, each by
    one FFT. Coefficient ``[..., f, h, w]`` is the frequency ``f`` in time, ``h`` and ``w`` in space.
    """
    for dim in VIDEO_DIMS:
        video = _dct_last(video.movedim(dim, -1)).movedim(-1, dim)
    return video


def idct_3d(coefficients: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`dct_3d` (orthonormal DCT-III along each axis): ``idct_3d(dct_3d(x)) == x``."""
    for dim in VIDEO_DIMS:
        coefficients = _idct_last(coefficients.movedim(dim, -1)).movedim(-1, dim)
    return coefficients


def low_pass_mask(height: int, width: int, cutoff: float, device=None) -> torch.Tensor:
    """Which 3-D DCT coefficients count as low: Cinemo's DCTInit mask (its default "rect" shape).

    Coefficient ``(f, h, w)`` is low when ``h < int(height * cutoff)`` and ``w < int(width * cutoff)``, for every
    temporal frequency ``f``: the time axis is never cut (Cinemo's ``dct_low_pass_filter`` and the MIVA code
    set ``mask[:, :, :, :cutoff_h, :cutoff_w] = 1`` over all frames). Returned as an ``[H, W]`` boolean that
    broadcasts over frames. Cutoff 1 keeps every coefficient, 0 none.
    """
    rows = torch.arange(height, device=device) < int(height * cutoff)
    columns = torch.arange(width, device=device) < int(width * cutoff)
    return rows[:, None] & columns[None, :]


def dct_low_pass_mix(low_source: torch.Tensor, high_source: torch.Tensor, cutoff: float = 0.23) -> torch.Tensor:
    """Cinemo's DCTInit: ``idct_3d(M * dct_3d(low_source) + (1 - M) * dct_3d(high_source))``.

    ``M`` is :func:`low_pass_mask` (spatial frequencies below ``cutoff`` of each axis, every temporal
    frequency), so the result takes its coarse layout from ``low_source`` and its detail from ``high_source``.
    Because no temporal frequency is cut, this equals the same mix done frame by frame in 2-D; it is written
    in 3-D as Cinemo writes it. Both inputs are ``[B, C, F, H, W]`` of one shape.
    """
    mask = low_pass_mask(*low_source.shape[-2:], cutoff, device=low_source.device)
    return idct_3d(torch.where(mask, dct_3d(low_source), dct_3d(high_source)))


def adain_to_first_frame(video: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """AdaIN after sampling: every frame ``f >= 1`` takes frame 0's mean and std, per batch entry and channel.

    ``x_f -> (x_f - mean_f) / std_f * std_0 + mean_0`` with mean and std over height and width of one frame,
    ``std = sqrt(unbiased variance + eps)`` (LAMP's ``calc_mean_std``). Frame 0 is returned bit-identical. A
    per-channel scale and shift of the latent (what a latent format does) commutes with this up to ``eps``, so
    raw and model-space latents give the same result.
    """
    variance, mean = torch.var_mean(video, dim=(-2, -1), keepdim=True)
    std = (variance + eps).sqrt()
    matched = video.clone()
    matched[:, :, 1:] = (video[:, :, 1:] - mean[:, :, 1:]) / std[:, :, 1:] * std[:, :, :1] + mean[:, :, :1]
    return matched
