"""M-MIVA's subject-mask attention bias (the MIVA paper) as query groups for ``models/attention.py``.

Tokens p and q with subject scores m_p, m_q in [0, 1] agree by ``M = m_p m_q + (1 - m_p)(1 - m_q)``, and their
logit gets ``clamp(log(M + 1e-4), -20, 0)``: 0 inside one region, log(1e-4) = -9.2 across regions. A query's bias
row depends on its own score only, so queries of one score share a row: a binary mask makes two groups (subject and
background), a map of several subjects one group per region, and the soft edge of a resized mask (scores strictly
between 0 and 1) one group whose rows are computed a chunk of queries at a time. No N x N bias is ever built.

Several masked adapters share one region map: a token belongs to the subject of the last adapter (in stack order)
whose score is above one half there, else to the background; the bias is then 0 inside a region and log(1e-4)
across regions. An adapter without a mask, stacked with masked ones, takes the background as its mask.
"""

from __future__ import annotations

import math

import torch

from .attention import QueryGroup

MASK_EPS = 1e-4
BIAS_FLOOR, BIAS_CEILING = -20.0, 0.0
ACROSS_REGIONS = math.log(MASK_EPS)
SUBJECT_THRESHOLD = 0.5  # a token belongs to a subject's region where the subject's score is above this
BACKGROUND = 0


def pair_bias(query_scores: torch.Tensor, key_scores: torch.Tensor) -> torch.Tensor:
    """The bias of every (query, key) pair, ``[n, L]`` from scores ``[n]`` and ``[L]``.

    ``m_p m_q + (1 - m_p)(1 - m_q)`` is written as ``(2 m_p - 1) m_q + (1 - m_p)``, so the whole bias takes one
    ``[n, L]`` tensor, finished in place.
    """
    query_scores = query_scores[:, None]
    agreement = torch.addcmul(1 - query_scores, 2 * query_scores - 1, key_scores[None, :])
    return agreement.add_(MASK_EPS).log_().clamp_(BIAS_FLOOR, BIAS_CEILING)


def _group(positions: torch.Tensor, length: int, key_bias=None, pair=None) -> QueryGroup:
    """Queries at ``positions`` of ``length``; as a plain range when they are one contiguous run (no gathering)."""
    first, last = int(positions[0]), int(positions[-1])
    if last - first + 1 == positions.numel():
        return QueryGroup(first, last + 1, key_bias, None, pair)
    return QueryGroup(0, length, key_bias, positions, pair)


def score_groups(query_scores: torch.Tensor, key_scores: torch.Tensor) -> list[QueryGroup]:
    """One subject's bias for queries with scores ``[Lq]`` against keys with scores ``[Lk]``.

    Queries at exactly 0 or 1 share one key-bias row each; the others form one group with their own rows.
    """
    length = query_scores.numel()
    groups = []
    for value in (0.0, 1.0):
        positions = (query_scores == value).nonzero().flatten()
        if positions.numel():
            groups.append(_group(positions, length, pair_bias(query_scores.new_tensor([value]), key_scores)[0]))
    soft = ((query_scores > 0) & (query_scores < 1)).nonzero().flatten()
    if soft.numel():
        groups.append(_group(soft, length, pair=lambda positions: pair_bias(query_scores[positions], key_scores)))
    return groups


def region_map(subject_scores: torch.Tensor) -> torch.Tensor:
    """Region labels ``[L]`` from the scores ``[K, L]`` of K subjects in stack order: k (1-based) for the last
    subject whose score is above one half at a token, 0 for the background."""
    numbers = torch.arange(1, subject_scores.shape[0] + 1, device=subject_scores.device)[:, None]
    return (numbers * (subject_scores > SUBJECT_THRESHOLD)).amax(dim=0)


def region_groups(query_labels: torch.Tensor, key_labels: torch.Tensor) -> list[QueryGroup]:
    """The joint bias of a region map: 0 between tokens of one region, log(1e-4) across regions."""
    groups = []
    for label in query_labels.unique().tolist():
        positions = (query_labels == label).nonzero().flatten()
        row = torch.where(key_labels == label, 0.0, ACROSS_REGIONS).to(torch.float32)
        groups.append(_group(positions, query_labels.numel(), row))
    return groups

