"""How much a decoded video moves, as numbers, in the spirit of VBench's dynamic degree.

Dense optical flow between consecutive frames, by OpenCV's Farneback method (classical: no weights to
download, about 10 ms a pair at 256 pixels on one CPU core). VBench computes RAFT flow and scores each pair
by the mean of its largest 5 % flow magnitudes; here that number and the plain mean magnitude are both
reported, averaged over the pairs, in pixels of the original frame whatever size the flow was computed at.
Frames are ``[F, H, W]`` or ``[F, H, W, C]`` floats in 0..1, as ComfyUI's IMAGE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

TOP_SHARE = 0.05  # VBench's dynamic degree scores a pair by its top 5 % magnitudes: the moving part, not the mean
REC601_LUMA = (0.299, 0.587, 0.114)  # the weights of OpenCV's own RGB to grey conversion
# Farneback settings: OpenCV's documented example, with two more pyramid levels so that motions of tens of
# pixels (at the flow size) are still found; OpenCV stops the pyramid itself where a level would fall under
# 32 pixels, so small frames are safe.
FARNEBACK = dict(pyr_scale=0.5, levels=5, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


@dataclass(frozen=True)
class ClipMotion:
    mean: float  # mean flow magnitude over every pixel of every pair, in original-frame pixels
    top_mean: float  # per pair, the mean of its largest TOP_SHARE magnitudes; then the mean over pairs
    magnitudes: torch.Tensor  # [F - 1, h, w] per-pair magnitude at the flow size, in original-frame pixels


def to_luma(frames: torch.Tensor) -> torch.Tensor:
    """``[F, H, W]`` grey frames from grey ``[F, H, W]`` / ``[F, H, W, 1]``, grey + alpha, RGB or RGBA frames."""
    if frames.ndim == 3:
        return frames.float()
    if frames.ndim != 4:
        raise ValueError(f"Expected frames as [F, H, W, C] (a ComfyUI IMAGE batch), got shape {tuple(frames.shape)}.")
    if frames.shape[-1] < 3:  # grey, or grey + alpha: alpha says nothing about motion
        return frames[..., 0].float()
    weights = torch.tensor(REC601_LUMA, dtype=torch.float32, device=frames.device)
    return frames[..., :3].float() @ weights


def flow_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The frame size scaled down (never up) so that its longer side is at most ``max_side``; 0 keeps it."""
    longest = max(height, width)
    if max_side <= 0 or longest <= max_side:
        return height, width
    scale = max_side / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def flow_magnitudes(frames: torch.Tensor, max_side: int = 256,
                    on_pair: Callable[[], None] | None = None) -> torch.Tensor:
    """``[F - 1, h, w]``: the Farneback flow magnitude from each frame to the next, in original-frame pixels.

    The flow is computed on grey frames scaled to ``flow_size(H, W, max_side)``; each flow component is then
    multiplied by the ratio of original to flow size along its own axis, so the result does not depend (beyond
    the detail lost in scaling) on ``max_side``. ``on_pair`` is called after each pair (a progress bar: full-size
    flow of a long clip takes a while).
    """
    if frames.shape[0] < 2:
        raise ValueError(f"Motion is measured between consecutive frames: it needs at least two frames, got "
                         f"{frames.shape[0]}. Connect a video (an IMAGE batch of several frames).")
    luma = to_luma(frames)
    height, width = luma.shape[-2:]
    small_height, small_width = flow_size(height, width, max_side)
    if (small_height, small_width) != (height, width):
        # antialiased, so that fine texture averages out rather than aliasing into patterns that seem to move
        luma = F.interpolate(luma[:, None], size=(small_height, small_width), mode="bilinear", antialias=True,
                             align_corners=False)[:, 0]
    # Farneback's polynomial fit is tuned for 0..255 intensities; float input keeps subtle shading unquantised
    grey = np.ascontiguousarray((luma.clamp(0, 1) * 255).cpu().numpy(), dtype=np.float32)
    to_original = np.array([width / small_width, height / small_height], dtype=np.float32)  # (x, y)
    magnitudes = np.empty((len(grey) - 1, small_height, small_width), dtype=np.float32)
    for pair, (current, following) in enumerate(zip(grey[:-1], grey[1:], strict=True)):
        flow = cv2.calcOpticalFlowFarneback(current, following, None, **FARNEBACK) * to_original
        magnitudes[pair] = np.hypot(flow[..., 0], flow[..., 1])
        if on_pair is not None:
            on_pair()
    return torch.from_numpy(magnitudes)


def top_share_mean(magnitudes: torch.Tensor, share: float = TOP_SHARE) -> torch.Tensor:
    """``[P]``: for each pair of ``[P, h, w]`` magnitudes, the mean of its largest ``share`` (at least one pixel)."""
    flat = magnitudes.flatten(1)
    count = max(1, round(flat.shape[1] * share))
    return flat.topk(count, dim=1, sorted=False).values.mean(dim=1)


def motion_score(frames: torch.Tensor, max_side: int = 256,
                 on_pair: Callable[[], None] | None = None) -> ClipMotion:
    """The clip's mean and top-5 % flow magnitude (see the module docstring) and the per-pair magnitudes."""
    magnitudes = flow_magnitudes(frames, max_side, on_pair)
    return ClipMotion(mean=float(magnitudes.mean()), top_mean=float(top_share_mean(magnitudes).mean()),
                       magnitudes=magnitudes)


def _inferno_palette() -> torch.Tensor:
    """``[256, 3]`` RGB in 0..1: OpenCV's inferno map (black for still, through red, to pale yellow)."""
    bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_INFERNO)[:, 0]
    return torch.from_numpy(bgr[:, ::-1].copy()).float() / 255


def magnitude_preview(magnitudes: torch.Tensor, brightest: float) -> torch.Tensor:
    """``[P, h, w, 3]`` IMAGE: the magnitudes through the inferno colour map, ``brightest`` pixels and more at
    the top of the map. One scale for the whole clip keeps pairs comparable (a still pair stays black)."""
    levels = (magnitudes / brightest).clamp(0, 1) if brightest > 0 else torch.zeros_like(magnitudes)
    return _inferno_palette()[(levels * 255).round().long()]
