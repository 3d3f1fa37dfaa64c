"""Attention with a block-structured logit bias, computed without any N x N tensor.

The biases of this pack (DyMoS now, subject masks later) share one shape: the
queries fall into a few groups, and inside a group the bias depends on the key
only. So each group is one ordinary attention call whose ``mask`` is a single
row of key biases, broadcast over the group's queries. Fused kernels (PyTorch's
flash / memory-efficient SDPA) take such a broadcast mask without expanding it,
so memory stays what plain attention needs, and the logits are exactly
``q.k / sqrt(d) + bias``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

AttentionFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class QueryGroup:
    """Queries ``start:stop`` of the attention sequence, biased by ``key_bias``.

    ``key_bias`` is a 1-D tensor over the keys (added to every logit of these
    queries) or ``None`` for no bias.
    """

    start: int
    stop: int
    key_bias: torch.Tensor | None = None


def combine_groups(first: Sequence[QueryGroup], second: Sequence[QueryGroup]) -> list[QueryGroup]:
    """The bias of two effects applied together: ranges intersected, key biases summed.

    Both lists must cover the same queries with non-overlapping ranges.
    """
    combined = []
    for a in first:
        for b in second:
            start, stop = max(a.start, b.start), min(a.stop, b.stop)
            if start >= stop:
                continue
            if a.key_bias is None:
                bias = b.key_bias
            elif b.key_bias is None:
                bias = a.key_bias
            else:
                bias = a.key_bias + b.key_bias
            combined.append(QueryGroup(start, stop, bias))
    return combined


def _as_4d_additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A caller's mask in the [batch, heads, queries, keys] broadcast form, additive."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    while mask.ndim < 4:
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask.unsqueeze(1)
    return mask


def grouped_bias_attention(
    attend: AttentionFn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    groups: Sequence[QueryGroup],
    *,
    mask: torch.Tensor | None = None,
    skip_reshape: bool = False,
    skip_output_reshape: bool = False,
    **kwargs,
) -> torch.Tensor:
    """Run ``attend`` (any ComfyUI attention function) once per query group.

    q/k/v follow ComfyUI's conventions: ``[B, N, heads*D]``, or ``[B, heads, N, D]``
    with ``skip_reshape``. The groups must tile all queries. The output has the
    layout the caller asked for; each group's result is written straight into
    it, so the peak extra memory is one group's output.
    """
    query_axis = 2 if skip_reshape else 1
    batch, num_queries = q.shape[0], q.shape[query_axis]
    dim_head = q.shape[-1] if skip_reshape else q.shape[-1] // heads
    base_mask = _as_4d_additive(mask, q.dtype)

    if skip_output_reshape:
        out = torch.empty((batch, heads, num_queries, dim_head), dtype=q.dtype, device=q.device)
        out_by_head = out
    else:
        out = torch.empty((batch, num_queries, heads * dim_head), dtype=q.dtype, device=q.device)
        out_by_head = out.view(batch, num_queries, heads, dim_head).transpose(1, 2)

    for group in groups:
        length = group.stop - group.start
        group_mask = base_mask
        if group_mask is not None and group_mask.shape[2] != 1:
            group_mask = group_mask[:, :, group.start:group.stop]
        if group.key_bias is not None:
            key_bias = group.key_bias.to(dtype=q.dtype, device=q.device).view(1, 1, 1, -1)
            group_mask = key_bias if group_mask is None else group_mask + key_bias
        out_by_head[:, :, group.start:group.stop] = attend(
            q.narrow(query_axis, group.start, length),
            k,
            v,
            heads,
            mask=group_mask,
            skip_reshape=skip_reshape,
            skip_output_reshape=True,
            **kwargs,
        )
    return out
