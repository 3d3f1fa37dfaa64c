"""Motion Score: Farneback flow magnitudes against clips of known motion (a texture translated by whole pixels per
frame), the scale back from the downscaled flow, grey / RGBA input, and the node's outputs, preview and text."""

import math

import pytest
import torch
import torch.nn.functional as F

from motion_dials.models.motion_score import flow_size, motion_score, top_share_mean
from motion_dials.nodes.motion_score import MotionScore

HEIGHT, WIDTH = 96, 128


def texture(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """``[height, width, 3]`` smooth random texture in 0..1: blobs of about 8 pixels, which optical flow can track
    at full size and after scaling down by 4."""
    noise = torch.rand(1, 3, height // 8 + 1, width // 8 + 1, generator=torch.Generator().manual_seed(seed))
    smooth = F.interpolate(noise, scale_factor=8, mode="bicubic", align_corners=False)[0, :, :height, :width]
    return smooth.clamp(0, 1).permute(1, 2, 0)


def translated_clip(dx: int, dy: int, frames: int = 4, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """``[frames, height, width, 3]``: a view on a larger texture whose content moves by (dx, dy) pixels a frame.

    Cropped, not rolled, so no wrapped edge shows a motion of its own."""
    margin = (frames - 1) * max(abs(dx), abs(dy))
    big = texture(height + 2 * margin, width + 2 * margin)
    # content moving by +dx means the window moving by -dx
    return torch.stack([big[margin - f * dy:margin - f * dy + height, margin - f * dx:margin - f * dx + width]
                        for f in range(frames)])


def test_a_still_clip_scores_zero():
    still = translated_clip(0, 0)
    pairs_done = []
    score = motion_score(still, max_side=0, on_pair=lambda: pairs_done.append(True))
    assert len(pairs_done) == 3  # the progress callback, once per frame pair
    # Farneback's polynomial fit leaves a few hundredths of a pixel at the frame border, against 1 for a pixel of motion
    assert score.mean < 0.01 and score.top_mean < 0.05
    assert score.magnitudes[:, 8:-8, 8:-8].max() < 1e-3
    assert score.magnitudes.shape == (3, HEIGHT, WIDTH)


@pytest.mark.parametrize("shift", [1, 2, 4])
def test_a_shift_of_k_pixels_a_frame_scores_about_k(shift):
    score = motion_score(translated_clip(shift, 0), max_side=0)
    assert score.mean == pytest.approx(shift, rel=0.15)
    assert score.top_mean == pytest.approx(shift, rel=0.15)  # every pixel moves alike: the top 5 % are no faster


def test_larger_shifts_give_larger_scores():
    scores = [motion_score(translated_clip(shift, 0), max_side=0) for shift in (0, 1, 2, 4, 8)]
    assert [s.mean for s in scores] == sorted(s.mean for s in scores)
    assert [s.top_mean for s in scores] == sorted(s.top_mean for s in scores)
    assert scores[-1].mean > 6 > 3 * scores[1].mean  # 8 pixels tracked too, well apart from 1


def test_downscaled_flow_is_reported_in_original_pixels():
    # Non-square frames and a diagonal motion: each axis is scaled back by its own ratio.
    clip = translated_clip(6, 4, height=192, width=256)
    expected = math.hypot(6, 4)
    full = motion_score(clip, max_side=0)
    small = motion_score(clip, max_side=64)  # flow on 48 x 64 frames: the motion is 1.5 x 1 pixels there
    assert small.magnitudes.shape[-2:] == (48, 64)
    assert full.mean == pytest.approx(expected, rel=0.15)
    assert small.mean == pytest.approx(expected, rel=0.15)
    assert small.mean == pytest.approx(full.mean, rel=0.1)


def test_flow_size_scales_the_longer_side_down_never_up():
    assert flow_size(480, 832, 256) == (148, 256)
    assert flow_size(832, 480, 256) == (256, 148)
    assert flow_size(96, 128, 256) == (96, 128)
    assert flow_size(480, 832, 0) == (480, 832)


def test_top_share_mean_averages_the_largest_five_percent_of_each_pair():
    magnitudes = torch.stack([torch.arange(100.0), torch.zeros(100)]).reshape(2, 10, 10)
    assert top_share_mean(magnitudes).tolist() == [97.0, 0.0]  # mean of 95..99; a still pair stays 0


def test_grey_and_rgba_frames_score_like_rgb():
    rgb = translated_clip(0, 0, frames=2)
    grey = torch.stack([rgb[0, ..., 0], rgb[0, ..., 0].roll(2, dims=1)])[..., None]  # a 2-pixel shift, [2, H, W, 1]
    as_rgb = grey.expand(-1, -1, -1, 3)  # the luma weights sum to 1: the same grey frames
    alpha = torch.rand(2, HEIGHT, WIDTH, 1, generator=torch.Generator().manual_seed(1))  # must not read as motion
    rgba = torch.cat([as_rgb, alpha], dim=-1)
    reference = motion_score(as_rgb, max_side=0).mean
    assert reference > 1
    assert motion_score(grey, max_side=0).mean == pytest.approx(reference, rel=1e-5)
    assert motion_score(rgba, max_side=0).mean == pytest.approx(reference, rel=1e-5)
    assert motion_score(grey[..., 0], max_side=0).mean == pytest.approx(reference, rel=1e-5)  # [F, H, W]


def test_node_outputs_numbers_a_preview_per_pair_and_text():
    moving = translated_clip(4, 0, frames=4)
    clip = torch.cat([moving[:1], moving])  # a repeated first frame: pair 0 is still, pairs 1 to 3 move 4 pixels
    out = MotionScore.execute(clip, max_side=64)
    mean_flow, top_flow, preview = out.result
    assert isinstance(mean_flow, float) and isinstance(top_flow, float)
    assert mean_flow == pytest.approx(3 / 4 * 4, rel=0.15)  # 4 pixels in three of the four pairs
    assert top_flow == pytest.approx(3 / 4 * 4, rel=0.15)
    assert preview.shape == (4, 48, 64, 3) and preview.dtype == torch.float32
    assert 0 <= preview.min() and preview.max() <= 1
    assert preview[0].max() < 0.05  # the still pair is black
    assert preview[1:].mean() > 0.5  # the moving ones sit near the top of the map
    text = out.ui.as_dict()["text"][0]
    assert f"mean flow {mean_flow:.3f} px" in text and f"top 5% flow {top_flow:.3f} px" in text
    assert "over 4 frame pairs" in text


def test_a_single_frame_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="frames needs at least 2 pictures, got 1"):
        MotionScore.execute(translated_clip(0, 0, frames=1))
