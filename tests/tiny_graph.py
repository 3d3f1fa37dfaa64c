"""Make a shipped workflow runnable on the tiny models.

Real text and vision encoders cannot be tiny, so their loader and encode nodes are swapped for the
test-fixture nodes (tests/host_fixture); sizes and step counts shrink so a run takes seconds on a CPU.
Everything else, the DyMoS node included, stays exactly as shipped.
"""

from __future__ import annotations

import copy

ENCODER_LOADERS = {"CLIPLoader", "DualCLIPLoader", "CLIPVisionLoader"}
LATENT_BUILDERS = {"WanImageToVideo", "HunyuanVideo15ImageToVideo"}
SAMPLERS = {"KSampler", "KSamplerAdvanced"}


def family_of(workflow: dict) -> str:
    names = " ".join(str(node["inputs"].get("unet_name", "")) for node in workflow.values())
    return "hunyuan_video_1.5" if "hunyuanvideo1.5" in names else "wan"


def tinyify_api(workflow: dict) -> dict:
    """An API-format workflow with the text/vision encoders replaced by the test-fixture nodes."""
    family = family_of(workflow)
    tiny = copy.deepcopy(workflow)
    for node_id, node in list(tiny.items()):
        if node["class_type"] == "CLIPTextEncode":
            tiny[node_id] = {"class_type": "MotionDialsTestConditioning",
                             "inputs": {"family": family, "text": node["inputs"]["text"], "tokens": 8},
                             "_meta": node.get("_meta", {})}
        elif node["class_type"] == "CLIPVisionEncode":
            tiny[node_id] = {"class_type": "MotionDialsTestClipVision",
                             "inputs": {"image": node["inputs"]["image"], "family": family},
                             "_meta": node.get("_meta", {})}
    return {node_id: node for node_id, node in tiny.items() if node["class_type"] not in ENCODER_LOADERS}


def shrink_api(workflow: dict, *, size: int = 64, length: int = 9, steps: int = 4) -> dict:
    """Small frames, few frames, few steps (sampler splits scaled along), for a run of seconds."""
    small = copy.deepcopy(workflow)
    for node in small.values():
        inputs = node["inputs"]
        if node["class_type"] in LATENT_BUILDERS:
            inputs.update(width=size, height=size, length=length)
        if node["class_type"] in SAMPLERS:
            full = inputs["steps"]
            inputs["steps"] = steps
            for key in ("start_at_step", "end_at_step"):
                if key in inputs:
                    inputs[key] = min(steps, round(inputs[key] * steps / full))
    return small
