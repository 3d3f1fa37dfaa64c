"""The frame-to-frame attention matrix of the DyMoS paper (appendix B) and the T2V-I2V distance between two.

``A[a, b]`` is the mean, over the query tokens of latent frame ``a`` (and heads), of the attention mass they put
on the key tokens of frame ``b``. It is built from post-softmax attention a few queries at a time
(``attention_probabilities``), so no token-level attention is ever stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .attention import QueryGroup, attention_probabilities


def frame_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: int,
    groups: Sequence[QueryGroup],
    *,
    video_start: int,
    frames: int,
    tokens_per_frame: int,
    mask: torch.Tensor | None = None,
    skip_reshape: bool = False,
    head_indices: Sequence[int] | None = None,
) -> torch.Tensor:
    """``[B, F, F]``: per batch entry, the attention mass query frame ``a`` puts on key frame ``b``, averaged over
    the frame's queries and the chosen heads. Keys outside the video (text of a joint attention) are left out, so
    a row sums to the video's share of the attention (1 for a pure video self-attention)."""
    video_end = video_start + frames * tokens_per_frame
    matrix = torch.zeros(q.shape[0], frames, frames, dtype=torch.float32, device=q.device)
    for positions, probabilities in attention_probabilities(q, k, heads, groups, (video_start, video_end),
                                                            mask=mask, skip_reshape=skip_reshape,
                                                            head_indices=head_indices):
        by_key_frame = probabilities[..., video_start:video_end].unflatten(-1, (frames, tokens_per_frame)).sum(-1)
        query_frames = (positions - video_start) // tokens_per_frame
        matrix.index_add_(1, query_frames.to(q.device), by_key_frame.sum(1))
    picked = heads if head_indices is None else len(head_indices)
    return matrix / (tokens_per_frame * picked)


def reference_share(matrix: torch.Tensor, reference_frames: int = 1) -> torch.Tensor:
    """Per query frame, the share of its attention that goes to the reference frames, ``[..., F]``."""
    return matrix[..., :reference_frames].sum(-1)


def js_divergence(first: torch.Tensor, second: torch.Tensor, reference_frames: int = 1) -> torch.Tensor:
    """The paper's T2V-I2V attention distance: the Jensen-Shannon divergence (base 2, so in [0, 1]) between the
    rows of two ``[F, F]`` matrices, averaged over the non-reference query frames. Rows are normalised first."""
    if first.shape != second.shape or first.ndim != 2 or first.shape[0] != first.shape[1]:
        raise ValueError(f"Two frame-to-frame matrices of one size are needed; got {list(first.shape)} and "
                         f"{list(second.shape)}.")
    if first.shape[0] <= reference_frames:
        raise ValueError(f"The matrices have {first.shape[0]} frames: none left after {reference_frames} "
                         "reference frame(s).")
    p = first[reference_frames:].double()
    q = second[reference_frames:].double()
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    middle = (p + q) / 2

    def kl(a, b):  # 0 log 0 = 0
        return torch.where(a > 0, a * (a / b).log2(), torch.zeros_like(a)).sum(-1)

    return ((kl(p, middle) + kl(q, middle)) / 2).mean().float()


def heatmap(matrix: torch.Tensor, cell: int = 24) -> torch.Tensor:
    """An ``[1, F*cell, F*cell, 3]`` IMAGE of an ``[F, F]`` matrix (rows: query frames, columns: key frames), dark
    blue (0) through yellow (the largest entry), each entry a ``cell`` x ``cell`` square."""
    scaled = (matrix / matrix.max().clamp_min(1e-12)).clamp(0, 1).float().cpu()
    low, high = torch.tensor([0.05, 0.05, 0.25]), torch.tensor([1.0, 0.85, 0.1])
    colours = low + scaled[..., None] * (high - low)
    return colours.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[None]
