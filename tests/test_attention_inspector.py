"""Attention Inspector and Attention Distance: the frame-to-frame matrix against full attention, the distance, the
nodes on a tiny model, and the inspector's memory at N = 16,384."""

import math

import pytest
import torch
from bench import measure_memory
from sampling import conditioning, load_tiny

from motion_dials.models.attention import QueryGroup, combine_groups
from motion_dials.models.dymos import dymos_query_groups
from motion_dials.models.frame_attention import frame_attention, js_divergence
from motion_dials.models.mask_attention import score_groups
from motion_dials.nodes.diagnostics import AttentionDistance, AttentionInspector, ReferenceAttentionShare, parse_indices
from motion_dials.nodes.dymos import DyMoSMotionSlider

HEADS, DIM_HEAD, FRAMES, PER_FRAME = 3, 8, 4, 12


def sampling_inputs(case: str, model) -> dict:
    positive, negative, latent = conditioning(case)
    return dict(model=model, positive=positive, negative=negative, latent_image=latent, seed=0, steps=4, cfg=2.0,
                sampler_name="euler", scheduler="simple")


def full_frame_attention(q, k, bias, video_start, heads_used):
    """Softmax of the whole logits matrix, then sums and means by frame: the definition. q/k: [B, H, N, D]."""
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    probabilities = logits.softmax(-1)[:, heads_used]
    matrix = torch.zeros(q.shape[0], FRAMES, FRAMES, dtype=torch.float64)
    for a in range(FRAMES):
        rows = slice(video_start + a * PER_FRAME, video_start + (a + 1) * PER_FRAME)
        for b in range(FRAMES):
            keys = slice(video_start + b * PER_FRAME, video_start + (b + 1) * PER_FRAME)
            matrix[:, a, b] = probabilities[:, :, rows, keys].sum(-1).mean(dim=(1, 2))
    return matrix.float()


@pytest.mark.parametrize("case", ["plain", "dymos", "dymos and mask", "text around the video", "two heads"])
def test_frame_matrix_equals_the_one_from_full_attention(case):
    video_start = 5 if case == "text around the video" else 0
    length = video_start + FRAMES * PER_FRAME + (7 if case == "text around the video" else 0)
    generator = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, HEADS, length, DIM_HEAD, generator=generator) * 2 for _ in range(2))
    bias = torch.zeros(length, length, dtype=torch.float64)
    groups = [QueryGroup(0, length)]
    if case.startswith("dymos") or case == "text around the video":
        groups = dymos_query_groups(sequence_length=length, video_start=video_start, num_frames=FRAMES,
                                    tokens_per_frame=PER_FRAME, ref_frames=1, strength=1.5, schedule="linear")
        for frame in range(1, FRAMES):
            rows = slice(video_start + frame * PER_FRAME, video_start + (frame + 1) * PER_FRAME)
            bias[rows, video_start:video_start + PER_FRAME] = -1.5 * frame / (FRAMES - 1)
    if case == "dymos and mask":
        scores = torch.rand(length, generator=generator)
        scores[: length // 2] = 1.0
        groups = combine_groups(groups, score_groups(scores, scores))
        agreement = scores[:, None] * scores[None] + (1 - scores[:, None]) * (1 - scores[None])
        bias = bias + torch.log(agreement.double() + 1e-4).clamp(-20, 0)
    heads_used = [0, 2] if case == "two heads" else list(range(HEADS))
    got = frame_attention(q, k, HEADS, groups, video_start=video_start, frames=FRAMES, tokens_per_frame=PER_FRAME,
                          skip_reshape=True, head_indices=None if case != "two heads" else heads_used)
    expected = full_frame_attention(q, k, bias, video_start, heads_used)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if case != "text around the video":
        torch.testing.assert_close(got.sum(-1), torch.ones(2, FRAMES), atol=1e-5, rtol=0)  # rows: all the mass
    else:
        assert (got.sum(-1) < 1).all()  # some of it went to the text


def test_distance_is_the_mean_jensen_shannon_divergence_of_the_generated_rows():
    uniform = torch.full((3, 3), 1 / 3)
    onto_reference = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0]])
    onto_self = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    assert float(js_divergence(uniform, uniform)) == 0.0
    assert float(js_divergence(onto_reference, onto_self)) == pytest.approx(1.0)  # disjoint rows: 1 bit
    assert float(js_divergence(onto_self, onto_reference)) == pytest.approx(1.0)
    # one generated row of two differs: [1, 0, 0] against uniform, its divergence written out
    p, q = [1.0, 0.0, 0.0], [1 / 3] * 3
    m = [(x + y) / 2 for x, y in zip(p, q, strict=True)]
    kl = lambda a, b: sum(x * math.log2(x / y) for x, y in zip(a, b, strict=True) if x > 0)  # noqa: E731
    half = (kl(p, m) + kl(q, m)) / 2
    p = torch.tensor(p)
    mixed = uniform.clone()
    mixed[1] = p
    assert float(js_divergence(mixed, uniform)) == pytest.approx(half / 2, rel=1e-6)
    assert float(js_divergence(mixed, uniform, reference_frames=2)) == 0.0  # row 1 is then a reference row
    with pytest.raises(ValueError, match="one size"):
        js_divergence(uniform, torch.ones(2, 2))


def test_block_and_head_lists():
    assert parse_indices("all", "blocks", 30) is None
    assert parse_indices(" 0-2, 7 ", "blocks", 30) == [0, 1, 2, 7]
    with pytest.raises(ValueError, match="blocks 30 does not exist: the model has 30"):
        parse_indices("28-30", "blocks", 30)
    with pytest.raises(ValueError, match="'all' or a list"):
        parse_indices("first", "heads", 12)
    with pytest.raises(ValueError, match="runs backwards"):
        parse_indices("5-2", "heads", 12)


def test_inspector_on_tiny_wan_agrees_with_the_reference_share_and_sees_dymos(tiny_models):
    model = load_tiny("wan2.1_i2v")
    inputs = sampling_inputs("wan2.1_i2v", model)
    inspected = AttentionInspector.execute(**inputs, reference_frames=1, fraction=0.01, blocks="all", heads="all")
    matrix, picture, share, per_frame = inspected.result
    shares = [float(v) for v in per_frame.split(", ")]
    assert len(shares) == 2 and sum(shares) / 2 == pytest.approx(share, abs=1e-4)
    torch.testing.assert_close(torch.tensor(shares), matrix[1:, 0], atol=1e-4, rtol=0)
    frames = matrix.shape[0]
    assert matrix.shape == (frames, frames) and frames == 3
    torch.testing.assert_close(matrix.sum(-1), torch.ones(frames), atol=1e-5, rtol=0)
    assert picture.shape == (1, frames * 24, frames * 24, 3) and 0 <= float(picture.min()) <= float(picture.max()) <= 1
    reference = ReferenceAttentionShare.execute(**inputs, reference_frames=1).result[0]
    assert share == pytest.approx(reference, abs=1e-5)  # the first step, every block, head and CFG branch
    assert "reference share per generated frame" in inspected.ui.as_dict()["text"][0]

    slid = DyMoSMotionSlider.execute(model, 2.0, 0.5, "uniform", 1).result[0]
    slid_matrix, _, slid_share, _ = AttentionInspector.execute(**{**inputs, "model": slid}, reference_frames=1,
                                                            fraction=0.01, blocks="all", heads="all").result
    assert slid_share < share - 0.05
    distance = AttentionDistance.execute(matrix, slid_matrix, 1).result[0]
    assert 0 < distance < 1 and AttentionDistance.execute(matrix, matrix, 1).result[0] == 0.0
    first_block = AttentionInspector.execute(**inputs, reference_frames=1, fraction=0.01, blocks="0",
                                             heads="1").result[0]
    assert not torch.allclose(first_block, matrix)


def test_inspector_memory_at_16384_tokens_stays_within_1_10_of_plain_attention():
    """Peak memory in a fresh process each, inputs included: the inspector's work on one call's q and k, against
    the plain attention call it observes (the inspected call peaks at the larger of the two)."""
    plain = measure_memory(16384, "unpatched", "attention_pytorch")
    inspector = measure_memory(16384, "inspector", "attention_pytorch")
    assert max(plain, inspector) / plain <= 1.10, f"{inspector / 2**20:.0f} MiB vs {plain / 2**20:.0f} MiB"
    assert inspector > 0.5 * plain  # it did hold q and k and work on them
