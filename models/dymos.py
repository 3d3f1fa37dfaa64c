"""DyMoS, the dynamic motion slider, as plain torch (the DyMoS paper, "Rebalancing Reference Frame Dominance
to Improve Motion in Image-to-Video Models").

For a query in latent frame ``f >= ref_frames`` and a key in the reference
frames, the attention logit gets ``- strength * g(f)``. Everything else is
untouched: reference-frame queries, and text tokens of a joint attention.
"""

from __future__ import annotations

import math

import torch

from .attention import QueryGroup

SCHEDULES = ("uniform", "linear", "log")


def frame_weight(schedule: str, frame: int, num_frames: int) -> float:
    """g(f), the frame-wise schedule (reconstructed: the paper's text lost the equation).

    uniform: 1; linear: f / (F - 1); log: ln(1 + f) / ln(F).
    """
    if schedule == "uniform":
        return 1.0
    if num_frames < 2:
        return 0.0
    if schedule == "linear":
        return frame / (num_frames - 1)
    if schedule == "log":
        return math.log1p(frame) / math.log(num_frames)
    raise ValueError(f"Unknown DyMoS frame schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")


def dymos_query_groups(
    *,
    sequence_length: int,
    video_start: int,
    num_frames: int,
    tokens_per_frame: int,
    ref_frames: int,
    strength: float,
    schedule: str,
    device: torch.device | str = "cpu",
) -> list[QueryGroup]:
    """The DyMoS bias of one attention call as query groups with key-bias rows.

    The attention sequence holds ``num_frames * tokens_per_frame`` video tokens
    (frame-major) from ``video_start``; any other tokens (a prefix, or the text
    of a joint attention) are neither biased queries nor biased keys.
    Consecutive frames with the same weight share one group.
    """
    ref_frames = min(ref_frames, num_frames)
    ref_end = video_start + ref_frames * tokens_per_frame
    video_end = video_start + num_frames * tokens_per_frame
    reference_keys = torch.zeros(sequence_length, device=device)
    reference_keys[video_start:ref_end] = 1.0

    biased_runs: list[list] = []  # [start, stop, offset], consecutive frames merged
    for frame in range(ref_frames, num_frames):
        offset = -strength * frame_weight(schedule, frame, num_frames)
        start = video_start + frame * tokens_per_frame
        if biased_runs and biased_runs[-1][2] == offset:
            biased_runs[-1][1] = start + tokens_per_frame
        else:
            biased_runs.append([start, start + tokens_per_frame, offset])

    groups = [QueryGroup(0, ref_end)]
    groups += [QueryGroup(start, stop, reference_keys * offset) for start, stop, offset in biased_runs]
    if video_end < sequence_length:
        groups.append(QueryGroup(video_end, sequence_length))
    return groups
