"""DyMoS Motion Slider: one scalar from static to dynamic.

From the DyMoS paper, "Rebalancing Reference Frame Dominance to Improve Motion in Image-to-Video Models".
"""

from __future__ import annotations

from comfy_api.latest import io

from ..models.dymos import SCHEDULES, dymos_query_groups
from .families import supported_families
from .input_checks import MotionDialsNode, warn_on_node
from .patcher_core import AttentionContext, AttentionKind, MotionEffect, apply_effect

CATEGORY = "Motion Dials"

PAPER_SETTINGS = (
    "Paper settings: Wan 2.2 I2V A14B strength 0.6, tau 0.2; Wan 2.1 I2V 14B strength 1.0, tau 0.25; "
    "HunyuanVideo 1.5 I2V strength 1.0, tau 0.2; CogVideoX-5B I2V strength 0.8, tau 0.24."
)


class DyMoSEffect(MotionEffect):
    """Subtract ``strength * g(f)`` from the logits of generated-frame queries on reference-frame keys."""

    def __init__(self, strength: float, tau: float, schedule: str, reference_frames: int, node_id: str | None = None):
        self.strength = strength
        self.tau = tau
        self.schedule = schedule
        self.reference_frames = reference_frames
        self.node_id = node_id
        self._groups_by_layout = {}

    def active_in(self, forward):
        return forward.before_percent(self.tau)

    def logit_bias(self, ctx: AttentionContext):
        if ctx.kind not in (AttentionKind.VIDEO_SELF, AttentionKind.JOINT):
            return None
        cache_key = (ctx.layout, ctx.forward.device)
        if cache_key in self._groups_by_layout:
            return self._groups_by_layout[cache_key]
        layout = ctx.layout
        if layout.frames <= self.reference_frames:
            warn_on_node(self.node_id, f"DyMoS Motion Slider: reference_frames is {self.reference_frames}, but the "
                         f"latent has {layout.frames} latent frames, so no frame is generated and the slider does "
                         "nothing. Use 1 for image-to-video, or a longer video.")
            groups = None
        else:
            groups = dymos_query_groups(
                sequence_length=layout.sequence_length,
                video_start=layout.video_start,
                num_frames=layout.frames,
                tokens_per_frame=layout.tokens_per_frame,
                ref_frames=self.reference_frames,
                strength=self.strength,
                schedule=self.schedule,
                device=ctx.forward.device,
            )
        self._groups_by_layout[cache_key] = groups
        return groups


class DyMoSMotionSlider(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DyMoSMotionSlider",
            display_name="DyMoS Motion Slider",
            category=CATEGORY,
            description=(
                "Training-free motion control for image-to-video models: during the first part of denoising, "
                "generated frames pay less attention to the reference frame (positive strength: more motion) "
                "or more (negative: more static). " + PAPER_SETTINGS
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip=f"A {supported_families()} video model. For Wan 2.2's two experts, put one "
                    "slider on each.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0, min=-4.0, max=4.0, step=0.05, round=0.001,
                    display_mode=io.NumberDisplay.slider,
                    tooltip="lambda: how much the generated frames' attention logits on the reference frame are "
                    "lowered. 0 leaves the model untouched; positive gives more motion; negative keeps the video "
                    "closer to the image. " + PAPER_SETTINGS,
                ),
                io.Float.Input(
                    "tau",
                    display_name="active fraction (tau)",
                    default=0.2, min=0.0, max=1.0, step=0.01,
                    tooltip="The first fraction of denoising during which the slider acts (by sigma, so it stays "
                    "right when sampling is split over several samplers). The paper uses 0.2 to 0.25.",
                ),
                io.Combo.Input(
                    "frame_schedule",
                    options=list(SCHEDULES),
                    default="uniform",
                    tooltip="How the bias grows with the frame index f of F latent frames: uniform (same for every "
                    "frame, the paper's best), linear (f / (F-1)), log (ln(1+f) / ln F).",
                ),
                io.Int.Input(
                    "reference_frames",
                    default=1, min=1, max=64, optional=True,
                    tooltip="How many leading latent frames count as the reference. 1 for image-to-video "
                    "(the image is latent frame 0).",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with the motion slider applied.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, strength, tau, frame_schedule, reference_frames=1) -> io.NodeOutput:
        cls.check_inputs(strength=strength, tau=tau, reference_frames=reference_frames)
        if strength == 0.0 or tau == 0.0:
            return io.NodeOutput(model)
        node_id = getattr(cls.hidden, "unique_id", None)
        return io.NodeOutput(apply_effect(model, DyMoSEffect(strength, tau, frame_schedule, reference_frames,
                                                             node_id)))
