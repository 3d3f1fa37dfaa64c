"""What Motion Dials shows to ComfyUI: one extension listing every node of the pack."""

from comfy_api.latest import ComfyExtension, io

from .diagnostics import AttentionDistance, AttentionInspector, ReferenceAttentionShare
from .dymos import DyMoSMotionSlider
from .edg import DareAddDifference, EDGMerge, EDGTimestepSwitch, ModelMergeExtrapolate
from .image_to_video import NODES as IMAGE_TO_VIDEO_NODES
from .input_checks import install_prompt_handler
from .miva import NODES as MIVA_NODES
from .miva_train import NODES as MIVA_TRAIN_NODES
from .motion_score import MotionScore
from .subject_mask import NODES as SUBJECT_MASK_NODES

NODES = (DyMoSMotionSlider, EDGMerge, EDGTimestepSwitch, ModelMergeExtrapolate, DareAddDifference,
         *MIVA_NODES, *MIVA_TRAIN_NODES, *SUBJECT_MASK_NODES, *IMAGE_TO_VIDEO_NODES,
         ReferenceAttentionShare, AttentionInspector, AttentionDistance, MotionScore)


class MotionDialsExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        install_prompt_handler(NODES)
        return list(NODES)


async def comfy_entrypoint() -> MotionDialsExtension:
    return MotionDialsExtension()
