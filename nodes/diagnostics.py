"""Diagnostics: numbers that show what the dials do."""

from __future__ import annotations

import comfy.samplers
import torch
from comfy_api.latest import io, ui

import nodes as comfy_nodes

from ..models.attention import attention_mass
from ..models.frame_attention import frame_attention, heatmap, js_divergence, reference_share
from .input_checks import MotionDialsNode
from .patcher_core import AttentionKind, MotionEffect, apply_effect, detect_family, sigma_before

CATEGORY = "Motion Dials/diagnostics"
FrameAttentionType = io.Custom("MD_FRAME_ATTENTION")


def sampling_inputs() -> list:
    """The inputs of a KSampler, for diagnostics that run the first steps of a sampling themselves."""
    return [
        io.Model.Input("model", tooltip="The video model to measure, patched or not (e.g. after DyMoS)."),
        io.Conditioning.Input("positive", tooltip="Positive conditioning, as for the sampler."),
        io.Conditioning.Input("negative", tooltip="Negative conditioning, as for the sampler."),
        io.Latent.Input("latent_image", tooltip="The starting latent, as for the sampler."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Noise seed of the measured steps."),
        io.Int.Input("steps", default=20, min=1, max=10000,
                     tooltip="Steps of the sampling being measured; only the measured ones are run."),
        io.Float.Input("cfg", default=6.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale, as for the sampler."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                       tooltip="Sampler, as for the sampler node."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                       tooltip="Scheduler, as for the sampler node."),
        io.Int.Input("reference_frames", default=1, min=1, max=64,
                     tooltip="How many leading latent frames are the reference (1 for image-to-video)."),
    ]


class ReferenceShareProbe(MotionEffect):
    """Records the attention mass that generated-frame queries put on reference-frame keys."""

    def __init__(self, reference_frames: int):
        self.reference_frames = reference_frames
        self.shares: list[float] = []
        self.frames_seen: set[int] = set()

    def observe_attention(self, ctx, q, k, heads, groups, attention_kwargs):
        if ctx.kind not in (AttentionKind.VIDEO_SELF, AttentionKind.JOINT):
            return
        layout = ctx.layout
        self.frames_seen.add(layout.frames)
        reference_end = layout.frame_start(self.reference_frames)
        if reference_end >= layout.video_end:
            return
        mass = attention_mass(
            q, k, heads, groups, queries=(reference_end, layout.video_end), keys=(layout.video_start, reference_end),
            mask=attention_kwargs.get("mask"), skip_reshape=attention_kwargs.get("skip_reshape", False),
        )
        self.shares.append(float(mass.mean()))


class ReferenceAttentionShare(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialsReferenceAttentionShare",
            display_name="Reference Attention Share",
            category=CATEGORY,
            description=(
                "Runs the first sampling step and reports the mean share of attention that the generated frames "
                "give to the reference frame (over every video self-attention, head, query and CFG branch). "
                "DyMoS lowers it as its strength rises; high values mean the video copies the image."
            ),
            inputs=sampling_inputs(),
            outputs=[io.Float.Output(display_name="reference_share",
                                     tooltip="Mean attention share on the reference frame, 0 to 1.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                reference_frames) -> io.NodeOutput:
        cls.check_inputs(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                         reference_frames=reference_frames)
        probe = ReferenceShareProbe(reference_frames)
        sample_with_probe(probe, 1, model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                          scheduler)
        if not probe.shares:
            if probe.frames_seen:
                raise ValueError(f"Reference Attention Share: reference_frames is {reference_frames}, but the latent "
                                 f"has {max(probe.frames_seen)} latent frames, so no generated frame is left to "
                                 "measure. Use 1 for image-to-video, or a longer video.")
            raise ValueError("Reference Attention Share: no video self-attention ran. Connect a video model and a "
                             "video latent.")
        share = sum(probe.shares) / len(probe.shares)
        return io.NodeOutput(share, ui=ui.PreviewText(f"reference share {share:.4f}"))


def index_spans(text: str, what: str) -> list[tuple[int, int]] | None:
    """``"all"`` (None), or the (first, last) spans of a list like ``"0-3, 7"``; a clear error for anything else."""
    text = text.strip().lower()
    if text in ("", "all"):
        return None
    spans = []
    for part in text.replace(" ", "").split(","):
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"{what} must be 'all' or a list like '0-3, 7'; got {text!r}.")
        low, high = int(first), int(last or first)
        if low > high:
            raise ValueError(f"{what}: the range {part!r} runs backwards; write it as '{high}-{low}'.")
        spans.append((low, high))
    return spans


def parse_indices(text: str, what: str, count: int) -> list[int] | None:
    """The indices a list like ``"0-3, 7"`` names (None for all), each below ``count``: the bounds are checked
    before any span is expanded, so '0-10000000' costs nothing."""
    spans = index_spans(text, what)
    if spans is None:
        return None
    highest = max(high for _, high in spans)
    if highest >= count:
        raise ValueError(f"{what} {highest} does not exist: the model has {count} (0 to {count - 1}).")
    return sorted({index for low, high in spans for index in range(low, high + 1)})


class FrameAttentionProbe(MotionEffect):
    """Sums the frame-to-frame attention of the chosen blocks and heads over the calls in the first ``fraction``
    of denoising."""

    def __init__(self, fraction: float, blocks: list[int] | None, heads: list[int] | None):
        self.fraction, self.blocks, self.heads = fraction, blocks, heads
        self.total: torch.Tensor | None = None
        self.count = 0

    def active_in(self, forward) -> bool:
        return forward.before_percent(self.fraction)

    def observe_attention(self, ctx, q, k, heads, groups, attention_kwargs):
        if ctx.kind not in (AttentionKind.VIDEO_SELF, AttentionKind.JOINT) or ctx.layout.frames < 2:
            return
        if self.blocks is not None and ctx.block_index not in self.blocks:
            return
        layout = ctx.layout
        matrices = frame_attention(q, k, heads, groups, video_start=layout.video_start, frames=layout.frames,
                                   tokens_per_frame=layout.tokens_per_frame, mask=attention_kwargs.get("mask"),
                                   skip_reshape=attention_kwargs.get("skip_reshape", False), head_indices=self.heads)
        summed = matrices.sum(0)  # kept on the device: no wait for the GPU in the middle of sampling
        self.total = summed if self.total is None else self.total + summed
        self.count += matrices.shape[0]


def measured_steps(model, steps: int, scheduler: str, fraction: float) -> int:
    """How many of the sampling's steps start in the first ``fraction`` of denoising (at least one)."""
    model_sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps)
    threshold = float(model_sampling.percent_to_sigma(fraction))
    return max(1, int(sigma_before(sigmas[:-1], threshold).sum()))


def sample_with_probe(probe: MotionEffect, last_step: int, model, positive, negative, latent_image, seed, steps,
                      cfg, sampler_name, scheduler) -> None:
    """The first ``last_step`` steps of the sampling a KSampler with these inputs would run, ``probe`` watching."""
    comfy_nodes.common_ksampler(apply_effect(model, probe), seed, steps, cfg, sampler_name, scheduler, positive,
                                negative, latent_image, start_step=0, last_step=last_step)


class AttentionInspector(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialsAttentionInspector",
            display_name="Attention Inspector",
            category=CATEGORY,
            description="Runs the first part of a sampling and records the frame-to-frame attention matrix of the "
            "DyMoS paper (appendix B): for query frame a, the mean over its tokens of the attention mass on the "
            "tokens of frame b, averaged over the chosen blocks, heads, CFG branches and steps. Computed a few "
            "queries at a time: no token-level attention is kept. Wire it like a KSampler.",
            inputs=[
                *sampling_inputs(),
                io.Float.Input("fraction", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="The first part of denoising to average over (by sigma), as the paper's "
                               "first 10 %; at least the first step is measured."),
                io.String.Input("blocks", default="all",
                                tooltip="Transformer blocks to average over: 'all' or a list like '0-9, 20'."),
                io.String.Input("heads", default="all",
                                tooltip="Attention heads to average over: 'all' or a list like '0-3'."),
            ],
            outputs=[
                FrameAttentionType.Output(display_name="frame_attention",
                                          tooltip="The [frames x frames] matrix, for Attention Distance."),
                io.Image.Output(display_name="heatmap",
                                tooltip="The matrix as a picture: rows are query frames, columns key frames, "
                                "yellow the largest share."),
                io.Float.Output(display_name="reference_share",
                                tooltip="Mean share of attention the generated frames give to the reference."),
                io.String.Output(display_name="reference_share_per_frame",
                                 tooltip="The share of each generated latent frame, comma-separated, first to last."),
            ],
            is_output_node=True,
        )

    @classmethod
    def extra_problems(cls, values: dict) -> list[str]:
        problems = []
        for name in ("blocks", "heads"):
            if isinstance(values.get(name), str):
                try:
                    index_spans(values[name], name)
                except ValueError as error:
                    problems.append(f"Attention Inspector: {error}")
        return problems

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                reference_frames, fraction, blocks, heads) -> io.NodeOutput:
        cls.check_inputs(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                         reference_frames=reference_frames, fraction=fraction, blocks=blocks, heads=heads)
        diffusion_model = model.get_model_object("diffusion_model")
        family = detect_family(model)
        # Block indices count within each block type of the family (as the core numbers them).
        block_count = 1 + max(index for _, index, _ in family.blocks(diffusion_model))
        probe = FrameAttentionProbe(fraction, parse_indices(blocks, "blocks", block_count),
                                    parse_indices(heads, "heads", family.attention_heads(diffusion_model)))
        sample_with_probe(probe, measured_steps(model, steps, scheduler, fraction), model, positive, negative,
                          latent_image, seed, steps, cfg, sampler_name, scheduler)
        if probe.total is None:
            raise ValueError("No video self-attention of the chosen blocks ran: the latent needs several frames "
                             "and the blocks must exist in the model.")
        matrix = (probe.total / probe.count).cpu()
        shares = reference_share(matrix, reference_frames)[reference_frames:]
        mean_share = float(shares.mean()) if shares.numel() else 0.0
        per_frame = ", ".join(f"{v:.4f}" for v in shares.tolist())
        text = (f"{matrix.shape[0]} latent frames, {probe.count} attention maps averaged\n"
                f"reference share per generated frame: {per_frame}\nmean reference share {mean_share:.4f}")
        return io.NodeOutput(matrix, heatmap(matrix), mean_share, per_frame, ui=ui.PreviewText(text))


class AttentionDistance(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialsAttentionDistance",
            display_name="Attention Distance",
            category=CATEGORY,
            description="The DyMoS paper's T2V-I2V attention distance: the Jensen-Shannon divergence (base 2: 0 for "
            "equal rows, 1 at most) between the rows of two frame-to-frame attention matrices, averaged over the "
            "generated (non-reference) query frames. Smaller: the two models route attention alike.",
            inputs=[
                FrameAttentionType.Input("first", tooltip="From an Attention Inspector (e.g. the T2V model)."),
                FrameAttentionType.Input("second", tooltip="From another Attention Inspector (e.g. the I2V model)."),
                io.Int.Input("reference_frames", default=1, min=0, max=64,
                             tooltip="Leading query frames left out of the average (the reference)."),
            ],
            outputs=[io.Float.Output(display_name="distance", tooltip="The mean Jensen-Shannon divergence.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, first, second, reference_frames) -> io.NodeOutput:
        distance = float(js_divergence(first, second, reference_frames))
        return io.NodeOutput(distance, ui=ui.PreviewText(f"Jensen-Shannon divergence {distance:.4f}"))
