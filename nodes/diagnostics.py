"""Diagnostics: numbers that show what the dials do."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io, ui

import nodes as comfy_nodes

from ..models.attention import attention_mass
from .patcher_core import AttentionKind, MotionEffect, apply_effect

CATEGORY = "Motion Dials/diagnostics"


class ReferenceShareProbe(MotionEffect):
    """Records the attention mass that generated-frame queries put on reference-frame keys."""

    def __init__(self, reference_frames: int):
        self.reference_frames = reference_frames
        self.shares: list[float] = []

    def observe_attention(self, ctx, q, k, heads, groups, attention_kwargs):
        if ctx.kind not in (AttentionKind.VIDEO_SELF, AttentionKind.JOINT):
            return
        layout = ctx.layout
        reference_end = layout.video_start + self.reference_frames * layout.tokens_per_frame
        if reference_end >= layout.video_end:
            return
        mass = attention_mass(
            q, k, heads, groups, queries=(reference_end, layout.video_end), keys=(layout.video_start, reference_end),
            mask=attention_kwargs.get("mask"), skip_reshape=attention_kwargs.get("skip_reshape", False),
        )
        self.shares.append(float(mass.mean()))


class ReferenceAttentionShare(io.ComfyNode):
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
            inputs=[
                io.Model.Input("model", tooltip="The video model to measure, patched or not (e.g. after DyMoS)."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning, as for the sampler."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning, as for the sampler."),
                io.Latent.Input("latent_image", tooltip="The starting latent, as for the sampler."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed of the measured step."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="Steps of the sampling being measured; only the first one is run."),
                io.Float.Input("cfg", default=6.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale, as for the sampler."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler, as for the sampler node."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="Scheduler, as for the sampler node."),
                io.Int.Input("reference_frames", default=1, min=1, max=64,
                             tooltip="How many leading latent frames are the reference (1 for image-to-video)."),
            ],
            outputs=[io.Float.Output(display_name="reference_share",
                                     tooltip="Mean attention share on the reference frame, 0 to 1.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                reference_frames) -> io.NodeOutput:
        probe = ReferenceShareProbe(reference_frames)
        comfy_nodes.common_ksampler(
            apply_effect(model, probe), seed, steps, cfg, sampler_name, scheduler, positive, negative,
            latent_image, start_step=0, last_step=1,
        )
        if not probe.shares:
            raise ValueError("No video self-attention ran: the latent has a single frame, so there is no "
                             "generated frame to measure. Use a latent of several frames.")
        share = sum(probe.shares) / len(probe.shares)
        return io.NodeOutput(share, ui=ui.PreviewText(f"reference share {share:.4f}"))
