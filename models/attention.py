"""Attention with a block-structured logit bias, computed without any N x N tensor.

The biases of this pack (DyMoS, M-MIVA's subject masks) share one shape: the
queries fall into a few groups, and inside a group the bias depends on the key
only. So each group is one ordinary attention call whose ``mask`` is a single
row of key biases, broadcast over the group's queries. Fused kernels (PyTorch's
flash / memory-efficient SDPA) take such a broadcast mask without expanding it,
so memory stays what plain attention needs, and the logits are exactly
``q.k / sqrt(d) + bias``.

A group is a range of queries (a frame, for DyMoS) or the queries at given
positions inside a range (a region of a subject mask; they are gathered for the
call and scattered back). Queries whose bias row is their own (the soft edge of
a mask) form a group with a ``pair_bias``: their rows are computed a small
chunk of queries at a time, so no more than a fraction of one output is ever
held as bias.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

AttentionFn = Callable[..., torch.Tensor]
MIN_QUERIES_PER_CALL = 1024
# Each call's output is at most 1/8 of the whole: the only memory beyond plain attention, whose own peak
# (q, k, v and the output) is about four outputs, so 1/8 adds about 3 %. Smaller calls cost time on CPU.
CALLS_PER_OUTPUT = 8


PairBias = Callable[[torch.Tensor], torch.Tensor]  # query positions [n] -> their bias rows [n, keys]


@dataclass(frozen=True)
class QueryGroup:
    """Queries ``start:stop`` of the attention sequence (or only those at ``positions``), biased by
    ``key_bias`` and ``pair_bias``.

    ``key_bias`` is a 1-D tensor over the keys (added to every logit of these
    queries) or ``None`` for no bias. ``positions``, when given, is a sorted 1-D
    long tensor of the group's queries, all inside ``start:stop``. ``pair_bias``,
    when given, returns the bias rows of any of the group's queries, added on
    top of ``key_bias``.
    """

    start: int
    stop: int
    key_bias: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    pair_bias: PairBias | None = None

    @property
    def empty(self) -> bool:
        return self.start >= self.stop or (self.positions is not None and self.positions.numel() == 0)


def _sum_or_either(a, b, add):
    if a is None:
        return b
    if b is None:
        return a
    return add(a, b)


def _shared_positions(a: QueryGroup, b: QueryGroup, start: int, stop: int) -> torch.Tensor | None:
    if a.positions is None and b.positions is None:
        return None
    if a.positions is None or b.positions is None:
        positions = a.positions if b.positions is None else b.positions
    else:
        positions = a.positions[torch.isin(a.positions, b.positions)]
    return positions[(positions >= start) & (positions < stop)]


def combine_groups(first: Sequence[QueryGroup], second: Sequence[QueryGroup]) -> list[QueryGroup]:
    """The bias of two effects applied together: query sets intersected, biases summed.

    Each list must cover the same queries, every query in exactly one group.
    """
    combined = []
    for a in first:
        for b in second:
            start, stop = max(a.start, b.start), min(a.stop, b.stop)
            if start >= stop:
                continue
            group = QueryGroup(
                start, stop,
                _sum_or_either(a.key_bias, b.key_bias, lambda x, y: x + y),
                _shared_positions(a, b, start, stop),
                _sum_or_either(a.pair_bias, b.pair_bias, lambda f, g: lambda positions: f(positions) + g(positions)),
            )
            if not group.empty:
                combined.append(group)
    return combined


def query_chunks(group: QueryGroup, rows: int):
    """The group's queries ``rows`` at a time: ``(start, stop)`` ranges, or position tensors for a gathered group."""
    if group.positions is None:
        for start in range(group.start, group.stop, rows):
            yield start, min(start + rows, group.stop)
    else:
        yield from torch.split(group.positions, rows)


def sdpa(q, k, v, heads, *, mask=None, **_):
    """PyTorch's SDPA in the shape of a ComfyUI attention function, for ``[B, H, N, D]`` tensors in and out."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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
    """Run ``attend`` (any ComfyUI attention function) with each group's key bias on its queries.

    q/k/v follow ComfyUI's conventions: ``[B, N, heads*D]``, or ``[B, heads, N, D]``
    with ``skip_reshape``; the output has the layout the caller asked for. The
    groups must tile all queries.

    Memory stays close to one plain call's: the work runs in calls of at most
    1/8 of the output (a block of queries, and of heads when a block
    would otherwise be larger), each copied into the output and freed before
    the next, so the only extra memory is one such call's output. Calls never
    take fewer than 1,024 queries: below that PyTorch's CPU flash kernel slows.
    """
    head_axis, query_axis = (1, 2) if skip_reshape else (2, 1)
    batch, num_queries = q.shape[0], q.shape[query_axis]
    dim_head = q.shape[-1] if skip_reshape else q.shape[-1] // heads
    if not skip_reshape:  # [B, N, H*D] -> a [B, N, H, D] view, so heads can be sliced like queries
        q, k, v = (t.view(t.shape[0], t.shape[1], heads, dim_head) for t in (q, k, v))
    base_mask = _as_4d_additive(mask, q.dtype)

    if skip_output_reshape:
        out = q.new_empty((batch, heads, num_queries, dim_head))
        out_by_head = out
    else:
        out = q.new_empty((batch, num_queries, heads * dim_head))
        out_by_head = out.view(batch, num_queries, heads, dim_head).transpose(1, 2)

    rows = max(MIN_QUERIES_PER_CALL, -(-num_queries // CALLS_PER_OUTPUT))
    if heads * num_queries <= CALLS_PER_OUTPUT * MIN_QUERIES_PER_CALL:
        heads_per_call = heads  # a small call: splitting it would only add per-call overhead
    else:
        heads_per_call = max(1, min(heads, heads * num_queries // (CALLS_PER_OUTPUT * rows)))
    # Own bias rows (broadcast over batch and heads) held for at most 1/8 of the output's elements.
    pair_rows = max(1, min(rows, batch * heads * num_queries * dim_head // (CALLS_PER_OUTPUT * k.shape[query_axis])))
    for group in groups:
        key_bias = None
        if group.key_bias is not None:
            key_bias = group.key_bias.to(dtype=q.dtype, device=q.device).view(1, 1, 1, -1)
        for chunk in query_chunks(group, pair_rows if group.pair_bias is not None else rows):
            chunk_bias = key_bias
            if group.pair_bias is not None:
                positions = chunk if group.positions is not None else torch.arange(*chunk, device=q.device)
                own = group.pair_bias(positions).to(dtype=q.dtype, device=q.device)[None, None]
                chunk_bias = own if chunk_bias is None else own + chunk_bias
            for head in range(0, heads, heads_per_call):
                head_stop = min(head + heads_per_call, heads)
                call_mask = base_mask
                if call_mask is not None:
                    call_mask = call_mask[:, head:head_stop] if call_mask.shape[1] != 1 else call_mask
                    call_mask = _select_queries(call_mask, 2, chunk) if call_mask.shape[2] != 1 else call_mask
                if chunk_bias is not None:
                    call_mask = chunk_bias if call_mask is None else call_mask + chunk_bias
                part = [t.narrow(head_axis, head, head_stop - head) for t in (q, k, v)]
                part[0] = _select_queries(part[0], query_axis, chunk)
                if not skip_reshape:
                    part = [t.flatten(2) for t in part]
                result = attend(*part, head_stop - head, mask=call_mask, skip_reshape=skip_reshape,
                                skip_output_reshape=True, **kwargs)
                if isinstance(chunk, tuple):
                    out_by_head[:, head:head_stop, chunk[0]:chunk[1]].copy_(result)
                else:
                    out_by_head[:, head:head_stop].index_copy_(2, chunk, result)
                del result  # before the next call allocates its own
    return out


def _select_queries(tensor: torch.Tensor, axis: int, chunk) -> torch.Tensor:
    """A range of queries as a view, or gathered positions as a copy."""
    if isinstance(chunk, tuple):
        return tensor.narrow(axis, chunk[0], chunk[1] - chunk[0])
    return tensor.index_select(axis, chunk.to(tensor.device))


def attention_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: int,
    groups: Sequence[QueryGroup],
    queries: tuple[int, int],
    *,
    mask: torch.Tensor | None = None,
    skip_reshape: bool = False,
    head_indices: Sequence[int] | None = None,
):
    """Post-softmax attention of the queries in range ``queries``, a few queries at a time: yields
    ``(positions [n], probabilities [B, h, n, keys] in float32)``.

    The logits include the groups' biases and the caller's mask exactly as ``grouped_bias_attention`` applies
    them. ``head_indices`` picks heads (all by default). Each block of probabilities holds at most 1/8 as many
    elements as q, so no attention matrix is ever held whole.
    """
    if not skip_reshape:
        q = q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
        k = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
    base_mask = _as_4d_additive(mask, torch.float32)
    if head_indices is not None:
        picked = torch.as_tensor(list(head_indices), device=q.device)
        q, k = q.index_select(1, picked), k.index_select(1, picked)
        if base_mask is not None and base_mask.shape[1] != 1:
            base_mask = base_mask.index_select(1, picked)
    scale = q.shape[-1] ** -0.5
    rows = max(1, q.shape[2] * q.shape[-1] // (CALLS_PER_OUTPUT * k.shape[2]))
    for group in groups:
        start, stop = max(group.start, queries[0]), min(group.stop, queries[1])
        if start >= stop:
            continue
        inside = group.positions
        if inside is not None:
            inside = inside[(inside >= start) & (inside < stop)]
        for positions in query_chunks(QueryGroup(start, stop, positions=inside), rows):
            if isinstance(positions, tuple):
                positions = torch.arange(*positions, device=q.device)
            logits = (q[:, :, positions] @ k.transpose(-1, -2)).float() * scale
            if base_mask is not None:
                logits += base_mask if base_mask.shape[2] == 1 else base_mask[:, :, positions]
            if group.key_bias is not None:
                logits += group.key_bias.to(logits).view(1, 1, 1, -1)
            if group.pair_bias is not None:
                logits += group.pair_bias(positions).to(logits)[None, None]
            yield positions, logits.softmax(-1)


def attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: int,
    groups: Sequence[QueryGroup],
    queries: tuple[int, int],
    keys: tuple[int, int],
    *,
    mask: torch.Tensor | None = None,
    skip_reshape: bool = False,
) -> torch.Tensor:
    """Per batch entry: the mean, over ``queries`` (a range) and heads, of the attention mass on ``keys``."""
    total = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    for _, probabilities in attention_probabilities(q, k, heads, groups, queries, mask=mask,
                                                    skip_reshape=skip_reshape):
        total += probabilities[..., keys[0]:keys[1]].sum(dim=(1, 2, 3))
    return total / (max(queries[1] - queries[0], 0) * heads)
