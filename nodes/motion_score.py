"""Motion Score: how much a decoded video moves, by optical flow, to compare what the dials do to a clip."""

from __future__ import annotations

import comfy.utils
from comfy_api.latest import io, ui

from ..models.motion_score import TOP_SHARE, magnitude_preview, motion_score
from .diagnostics import CATEGORY
from .input_checks import MotionDialsNode, check_image

DEFAULT_MAX_SIDE = 256


class MotionScore(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        top_percent = f"{TOP_SHARE:.0%}"
        return io.Schema(
            node_id="MotionDialsMotionScore",
            display_name="Motion Score",
            category=CATEGORY,
            description=(
                "Measures how much a decoded video moves: optical flow (OpenCV Farneback, no model to download) "
                "between consecutive frames, reported as the mean flow magnitude and, as VBench's dynamic degree "
                f"scores a pair, the mean of the largest {top_percent} magnitudes, both averaged over the frame "
                "pairs and in pixels of the original frames."
            ),
            inputs=[
                io.Image.Input("frames", tooltip="The decoded video: an IMAGE batch of at least two frames, in "
                                                 "order (grey, RGB or RGBA)."),
                io.Int.Input("max_side", default=DEFAULT_MAX_SIDE, min=0, max=8192, step=16, optional=True,
                             tooltip="Frames are scaled down to this longer side before the flow is computed, for "
                                     "speed; the results are scaled back to original pixels. 0 keeps the full "
                                     "size. Larger finds finer motion, slower."),
            ],
            outputs=[
                io.Float.Output(display_name="mean_flow",
                                tooltip="Mean flow magnitude over every pixel and frame pair, in original pixels "
                                        "per frame."),
                io.Float.Output(display_name="top_5_percent_flow",
                                tooltip=f"Per frame pair, the mean of the largest {top_percent} flow magnitudes "
                                        "(the moving part); then averaged over the pairs. In original pixels per "
                                        "frame."),
                io.Image.Output(display_name="flow_preview",
                                tooltip="One image per frame pair, at the flow size: flow magnitude from black "
                                        "(still) to pale yellow (the clip's largest magnitude, given in the "
                                        "node's text), one scale for the whole clip."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, frames, max_side=DEFAULT_MAX_SIDE) -> io.NodeOutput:
        cls.check_inputs(max_side=max_side)
        check_image("Motion Score", "frames", frames, least=2)
        # updating ComfyUI's progress bar is also where its cancel button takes effect
        progress = comfy.utils.ProgressBar(len(frames) - 1)
        score = motion_score(frames, max_side, on_pair=lambda: progress.update(1))
        brightest = float(score.magnitudes.max())
        text = (f"mean flow {score.mean:.3f} px, top {TOP_SHARE:.0%} flow {score.top_mean:.3f} px "
                f"over {len(score.magnitudes)} frame pairs\npreview: brightest = {brightest:.3f} px")
        return io.NodeOutput(score.mean, score.top_mean, magnitude_preview(score.magnitudes, brightest),
                             ui=ui.PreviewText(text))
