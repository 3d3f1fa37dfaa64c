"""M-MIVA's subject-mask attention bias, grouped, against full biased logits from the MIVA paper's
mask equation (M-MIVA)."""

import math

import comfy.ldm.modules.attention as comfy_attention
import pytest
import torch

from motion_dials.models import attention as grouped
from motion_dials.models.attention import combine_groups, grouped_bias_attention
from motion_dials.models.dymos import dymos_query_groups
from motion_dials.models.mask_attention import region_groups, region_map, score_groups
from motion_dials.models.miva import ReferenceFrames, cross_frame_bias
from motion_dials.nodes.miva import token_scores

ATTENTION_FUNCTIONS = {"host default": comfy_attention.optimized_attention.__wrapped__,
                       "pytorch": comfy_attention.attention_pytorch,
                       "sub-quadratic": comfy_attention.attention_sub_quad}
BATCH, HEADS, DIM_HEAD = 2, 3, 8
FRAMES, TOKENS_PER_FRAME = 4, 24
N = FRAMES * TOKENS_PER_FRAME


def reference_pair_bias(query_scores, key_scores):
    """clamp(log(m_p m_q + (1 - m_p)(1 - m_q) + 1e-4), -20, 0), pair by pair, in float64."""
    bias = torch.empty(len(query_scores), len(key_scores), dtype=torch.float64)
    for p, m_p in enumerate(query_scores.double().tolist()):
        for q, m_q in enumerate(key_scores.double().tolist()):
            bias[p, q] = min(max(math.log(m_p * m_q + (1 - m_p) * (1 - m_q) + 1e-4), -20.0), 0.0)
    return bias


def reference_region_bias(subject_scores):
    """Regions: each token to the last subject whose score is above 0.5, else the background (0)."""
    labels = [0] * subject_scores.shape[1]
    for k in range(subject_scores.shape[0]):
        for token in range(subject_scores.shape[1]):
            if subject_scores[k, token] > 0.5:
                labels[token] = k + 1
    labels = torch.tensor(labels)
    return torch.where(labels[:, None] == labels[None, :], 0.0, math.log(1e-4)).double(), labels


def full_attention(q, k, v, bias):
    """softmax(q k^T / sqrt(D) + bias) v for [B, H, N, D], in float64."""
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    return (logits.softmax(-1) @ v.double()).float()


def scores(kind: str, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    binary = torch.randint(0, 2, (n,), generator=generator).float()
    if kind == "binary":
        return binary
    soft = torch.rand(n, generator=generator)
    if kind == "soft":
        return soft
    edge = torch.rand(n, generator=generator) < 0.3  # a resized mask: 0 and 1 inside, soft on the edge
    return torch.where(edge, soft, binary)


def qkv(seed: int, queries: int = N, keys: int = N):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, HEADS, length, DIM_HEAD, generator=generator) * 2
            for length in (queries, keys, keys)]


def run_grouped(attend, q, k, v, groups, skip_reshape):
    if skip_reshape:
        return grouped_bias_attention(attend, q, k, v, HEADS, groups, skip_reshape=True, skip_output_reshape=True)
    flat = [t.transpose(1, 2).flatten(2) for t in (q, k, v)]
    out = grouped_bias_attention(attend, *flat, HEADS, groups)
    return out.unflatten(-1, (HEADS, DIM_HEAD)).transpose(1, 2)


@pytest.mark.parametrize("attention", list(ATTENTION_FUNCTIONS))
@pytest.mark.parametrize("kind", ["binary", "edge", "soft"])
@pytest.mark.parametrize("skip_reshape", [False, True])
def test_one_subject_equals_full_biased_attention(attention, kind, skip_reshape):
    subject = scores(kind, N, seed=1)
    q, k, v = qkv(2)
    groups = score_groups(subject, subject)
    expected = full_attention(q, k, v, reference_pair_bias(subject, subject))
    got = run_grouped(ATTENTION_FUNCTIONS[attention], q, k, v, groups, skip_reshape)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # every query in exactly one group
    covered = torch.cat([g.positions if g.positions is not None else torch.arange(g.start, g.stop) for g in groups])
    assert sorted(covered.tolist()) == list(range(N))


def test_queries_of_one_score_share_a_row_and_soft_rows_come_in_small_chunks(monkeypatch):
    subject = scores("edge", N, seed=3)
    groups = score_groups(subject, subject)
    shared = [g for g in groups if g.pair_bias is None]
    assert len(shared) == 2 and all(g.key_bias.shape == (N,) for g in shared)
    (soft,) = [g for g in groups if g.pair_bias is not None]
    assert soft.positions.tolist() == ((subject > 0) & (subject < 1)).nonzero().flatten().tolist()

    asked = []
    recording = grouped.QueryGroup(soft.start, soft.stop, None, soft.positions,
                                   lambda positions: asked.append(len(positions)) or soft.pair_bias(positions))
    monkeypatch.setattr(grouped, "CALLS_PER_OUTPUT", 16)  # a small budget, so the soft rows need several chunks
    q, k, v = qkv(4)
    grouped_bias_attention(grouped.sdpa, q, k, v, HEADS, [*shared, recording], skip_reshape=True,
                           skip_output_reshape=True)
    budget = BATCH * HEADS * N * DIM_HEAD // (16 * N)  # 3 rows: their bias holds at most 1/16 of the output
    assert sum(asked) == soft.positions.numel() and len(asked) > 1 and max(asked) <= budget


def test_several_subjects_follow_the_region_map_the_last_winning_overlaps():
    generator = torch.Generator().manual_seed(5)
    subjects = torch.rand(3, N, generator=generator)
    subjects[:, :6] = torch.tensor([[0.9, 0.9, 0.2, 0.6, 0.1, 0.5],
                                    [0.9, 0.1, 0.2, 0.7, 0.1, 0.5],
                                    [0.1, 0.1, 0.2, 0.8, 0.9, 0.5]])
    expected_bias, expected_labels = reference_region_bias(subjects)
    labels = region_map(subjects)
    assert labels[:6].tolist() == [2, 1, 0, 3, 3, 0]  # overlap: the later subject; 0.5 itself is not above one half
    assert torch.equal(labels, expected_labels)
    q, k, v = qkv(6)
    for attention in ATTENTION_FUNCTIONS.values():
        got = run_grouped(attention, q, k, v, region_groups(labels, labels), skip_reshape=True)
        torch.testing.assert_close(got, full_attention(q, k, v, expected_bias), atol=1e-5, rtol=1e-5)


def test_cross_frame_shape_queries_of_one_frame_against_two_frames_of_keys():
    frame = scores("edge", TOKENS_PER_FRAME, seed=7)
    keys = torch.cat([frame, frame])
    q, k, v = qkv(8, queries=TOKENS_PER_FRAME, keys=2 * TOKENS_PER_FRAME)
    got = run_grouped(grouped.sdpa, q, k, v, score_groups(frame, keys), skip_reshape=True)
    torch.testing.assert_close(got, full_attention(q, k, v, reference_pair_bias(frame, keys)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frames", [1, 2, 3, 5])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_cross_frame_attention_equals_each_frame_against_frame_0_and_its_previous_frame(frames, masked):
    """Frames 0 and 1 take the shortcut (frame 0's keys once, values weighted by the mean lambda), later frames the
    gathered 2T keys: both must equal the MIVA
    paper's cross-frame attention written frame by frame, lambdas that need not sum to 1."""
    width, per_frame = HEADS * DIM_HEAD, TOKENS_PER_FRAME
    generator = torch.Generator().manual_seed(frames)
    q, k, v = (torch.randn(BATCH, frames * per_frame, width, generator=generator) for _ in range(3))
    lambdas = torch.rand(BATCH, 2, generator=generator)
    frame = scores("edge", per_frame, seed=3)
    bias = cross_frame_bias(frame, frames) if masked else None
    got = ReferenceFrames.gather(k, v, frames, HEADS).attend(q, lambdas, bias)

    split = lambda t, f: t[:, f * per_frame:(f + 1) * per_frame].unflatten(-1, (HEADS, -1)).transpose(1, 2)  # noqa: E731
    key_bias = reference_pair_bias(frame, torch.cat([frame, frame])) if masked else 0.0
    expected = []
    for f in range(frames):
        keys = torch.cat([split(k, 0), split(k, max(f - 1, 0))], dim=2)
        values = torch.cat([lambdas[:, 0, None, None, None] * split(v, 0),
                            lambdas[:, 1, None, None, None] * split(v, max(f - 1, 0))], dim=2)
        expected.append(full_attention(split(q, f), keys, values, key_bias).transpose(1, 2).flatten(2))
    torch.testing.assert_close(got, torch.cat(expected, dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["edge", "regions"])
def test_mask_and_dymos_biases_add(kind):
    strength = 1.5
    if kind == "edge":
        subject = scores("edge", N, seed=9)
        mask_groups, mask_bias = score_groups(subject, subject), reference_pair_bias(subject, subject)
    else:
        subjects = scores("soft", 2 * N, seed=9).view(2, N)
        mask_bias, labels = reference_region_bias(subjects)
        mask_groups = region_groups(labels, labels)
    dymos = dymos_query_groups(sequence_length=N, video_start=0, num_frames=FRAMES, tokens_per_frame=TOKENS_PER_FRAME,
                               ref_frames=1, strength=strength, schedule="uniform")
    dymos_bias = torch.zeros(N, N, dtype=torch.float64)
    dymos_bias[TOKENS_PER_FRAME:, :TOKENS_PER_FRAME] = -strength
    q, k, v = qkv(10)
    expected = full_attention(q, k, v, mask_bias + dymos_bias)
    for first, second in ((dymos, mask_groups), (mask_groups, dymos)):
        got = run_grouped(ATTENTION_FUNCTIONS["pytorch"], q, k, v, combine_groups(first, second), skip_reshape=False)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_mask_becomes_token_scores_cropped_like_the_start_image():
    mask = torch.zeros(60, 120)  # 2:1; a 4 x 4 grid is 1:1, so the centre 60 x 60 is kept
    mask[:, :60] = 1.0  # the image's left half: the left half of the kept square
    grid = token_scores(mask, 4, 4, "cpu").view(4, 4)
    assert torch.equal(grid[:, :2], torch.ones(4, 2)) and torch.equal(grid[:, 2:], torch.zeros(4, 2))
    same_size = torch.rand(4, 6)
    assert torch.equal(token_scores(same_size, 4, 6, "cpu"), same_size.flatten())


# Masked adapters on the tiny Wan 2.1 T2V: whole blocks against the plain reference block of test_miva.

def tiny_masks():
    """Two subject masks on the tiny sample's 4 x 4 token grid (their own size: no resizing), overlapping."""
    first = torch.zeros(4, 4)
    first[:, :2] = 1.0
    first[:, 2] = torch.tensor([0.25, 0.5, 0.75, 0.9])  # a soft edge
    second = torch.zeros(4, 4)
    second[1:3, 1:4] = 1.0
    second[3, 3] = 0.6
    return first, second


@pytest.mark.parametrize("case", ["one masked adapter", "masked and plain", "a plain implicit prompt beside a mask",
                                  "two masked, overlapping", "with DyMoS"])
def test_masked_adapters_on_tiny_wan_equal_the_plain_reference(tiny_models, case):
    from sampling import load_tiny, sample_tiny
    from test_miva import (
        CASE,
        HORSE,
        STEPS,
        WATERFALL,
        adapter,
        float64_state,
        record_blocks,
        reference_block,
        time_embedding,
    )

    from motion_dials.nodes.dymos import DyMoSMotionSlider
    from motion_dials.nodes.miva import StackRow, apply_stack

    model = load_tiny(CASE)
    first, second = tiny_masks()
    rows = {"one masked adapter": [(adapter(HORSE), 0.8, first)],
            "masked and plain": [(adapter(HORSE), 0.8, first), (adapter(WATERFALL), -0.6, None)],
            "a plain implicit prompt beside a mask": [(adapter(WATERFALL), 0.5, first), (adapter(HORSE), 0.8, None)],
            "two masked, overlapping": [(adapter(HORSE), 0.8, first), (adapter(WATERFALL), 0.5, second)],
            "with DyMoS": [(adapter(HORSE), 0.8, first), (adapter(WATERFALL), 0.5, second)]}[case]
    patched = apply_stack(model, tuple(StackRow(a, w, True, m) for a, w, m in rows))
    frames, per_frame, strength = 3, 16, 1.5
    if case == "with DyMoS":
        patched = DyMoSMotionSlider.execute(patched, strength, 1.0, "uniform", 1).result[0]

    if len(rows) == 1:
        frame = first.flatten()
        sa_bias = reference_pair_bias(frame.repeat(frames), frame.repeat(frames))
        cfa_biases = [reference_pair_bias(frame, torch.cat([frame, frame]))]
        prompt_gates = [frame.repeat(frames)]
    else:
        masked = torch.stack([m.flatten() for _, _, m in rows if m is not None])
        region_bias, labels = reference_region_bias(masked)
        video_labels = labels.repeat(frames)
        sa_bias = torch.where(video_labels[:, None] == video_labels[None, :], 0.0, math.log(1e-4)).double()
        background = (labels == 0).float()
        cfa_biases, prompt_gates = [], []
        for _, _, m in rows:  # an adapter without a mask takes the background, in its CFA and its implicit prompt
            frame = background if m is None else m.flatten()
            cfa_biases.append(reference_pair_bias(frame, torch.cat([frame, frame])))
            prompt_gates.append(frame.repeat(frames))
    if case == "with DyMoS":
        sa_bias = sa_bias.clone()
        sa_bias[per_frame:, :per_frame] -= strength

    with record_blocks(patched) as log:
        sample_tiny(CASE, patched, STEPS)
    state = float64_state(patched)
    model_sampling = patched.get_model_object("model_sampling")
    assert len(log) == STEPS * 2
    for index, args, out, sigmas in log:
        t_emb = time_embedding(state, model_sampling.timestep(sigmas).double())
        block_rows = [(a.blocks[index], w, a.info.prompt_query_bias) for a, w, _ in rows]
        expected = reference_block(state, index, args["img"], args["vec"], args["pe"], args["txt"], block_rows, t_emb,
                                   frames, patched.model.diffusion_model.num_heads, sa_bias, cfa_biases,
                                   prompt_gates)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
        unmasked = reference_block(state, index, args["img"], args["vec"], args["pe"], args["txt"], block_rows, t_emb,
                                   frames, patched.model.diffusion_model.num_heads)
        assert (out.double() - unmasked).abs().max() > 1e-4, "the masks change the block"


def test_mask_biases_are_planned_once_and_reused_by_every_step_and_block(tiny_models, monkeypatch):
    from sampling import load_tiny, sample_tiny
    from test_miva import CASE, HORSE, WATERFALL

    import motion_dials.nodes.miva as miva_nodes

    planned = []
    plan_masks = miva_nodes.plan_masks
    monkeypatch.setattr(miva_nodes, "plan_masks", lambda *args: planned.append(args[1]) or plan_masks(*args))
    model = load_tiny(CASE)
    first, second = tiny_masks()
    stack = miva_nodes.MIVALoader.execute(HORSE.file_name, 0.8, subject_mask=first[None]).result[0]
    stack = miva_nodes.MIVALoader.execute(WATERFALL.file_name, 0.5, stack, subject_mask=second[None]).result[0]
    assert [torch.equal(row.mask, mask) for row, mask in zip(stack, (first, second), strict=True)] == [True, True]
    patched = miva_nodes.MIVAApply.execute(model, stack).result[0]
    sample_tiny(CASE, patched, 4)
    assert len(planned) == 1 and (planned[0].frames, planned[0].height, planned[0].width) == (3, 4, 4)
    sample_tiny(CASE, patched, 2)
    assert len(planned) == 1


def test_loader_shows_the_mask_and_refuses_a_mask_of_the_wrong_shape(tiny_models):
    from test_miva import HORSE

    from motion_dials.nodes.miva import MIVALoader

    mask = torch.zeros(1, 48, 64)
    mask[:, :, :16] = 1.0
    shown = MIVALoader.execute(HORSE.file_name, 1.0, subject_mask=mask)
    assert "subject mask 64 x 48, covering 25% of the image" in shown.ui.as_dict()["text"][0]
    with pytest.raises(ValueError, match=r"MASK of shape \[batch, height, width\]; got \[1, 1, 48, 64\]"):
        MIVALoader.execute(HORSE.file_name, 1.0, subject_mask=mask[None])
