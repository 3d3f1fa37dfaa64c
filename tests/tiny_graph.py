"""Make a shipped workflow runnable on the tiny models.

The diffusion models and the Wan 2.1 VAE can be tiny (tests/tiny_models.py); real text and vision
encoders cannot, their widths being fixed by their checkpoints. So `tinyify_api` swaps
CLIPTextEncode and CLIPVisionEncode for the test-fixture nodes (tests/host_fixture), which give random
outputs of the real shapes, and drop the encoder loaders left unused; the GroundingDINO and SAM 2 loaders get the
tiny segmenters (tests/tiny_segmenters.py, named apart from the published files, whose absence the tests also
check). `shrink_api` makes sizes and step
counts small so a run takes seconds on a CPU. Everything else, the Motion Dials nodes included, stays as
shipped. (A UI-format graph for the tiny models is made from the API one with
tests/workflow_formats.py, as the browser test does.)
"""

from __future__ import annotations

import copy

if __package__:
    from .tiny_segmenters import GROUNDING_DINO_FILE, SAM2_PT_FILE
else:
    from tiny_segmenters import GROUNDING_DINO_FILE, SAM2_PT_FILE

TEXT_ENCODE, VISION_ENCODE = "CLIPTextEncode", "CLIPVisionEncode"
FIXTURE_TEXT_ENCODE, FIXTURE_VISION_ENCODE = "MotionDialsTestConditioning", "MotionDialsTestClipVision"
FIXTURE_TOKENS = 8
ENCODER_LOADERS = {"CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "QuadrupleCLIPLoader", "CLIPVisionLoader"}
MODEL_LOADERS = {"UNETLoader", "CheckpointLoaderSimple"}
LATENT_BUILDERS = {"WanImageToVideo", "HunyuanVideo15ImageToVideo", "Wan22ImageToVideoLatent",
                   "EmptyHunyuanLatentVideo", "EmptyHunyuanVideo15Latent", "MIVAImageToVideoLatent"}
STEP_SETTERS = {"KSampler", "KSamplerAdvanced", "BasicScheduler"}
TINY_SEGMENTERS = {"MotionDialsGroundingDINOLoader": GROUNDING_DINO_FILE, "MotionDialsSAM2Loader": SAM2_PT_FILE}


def family_from_model_names(names) -> str:
    """The fixture family ("wan" or "hunyuan_video_1.5") of the diffusion model files a graph loads."""
    names = [str(name) for name in names]
    families = set()
    for name in names:
        file_name = name.replace("\\", "/").rsplit("/", 1)[-1]  # names may carry a subfolder
        squashed = file_name.lower().replace("_", "").replace("-", "").replace(".", "")
        if "hunyuanvideo15" in squashed:
            families.add("hunyuan_video_1.5")
        elif squashed.startswith("wan"):
            families.add("wan")
    if len(families) != 1:
        raise ValueError(f"cannot tell the model family from the loaded files {sorted(names)}: "
                         "pass family= explicitly")
    return families.pop()


def family_of(workflow: dict) -> str:
    """The fixture family of an API-format workflow, from its diffusion model loaders."""
    return family_from_model_names(
        value for node in workflow.values() if node["class_type"] in MODEL_LOADERS
        for value in node["inputs"].values() if isinstance(value, str) and value.endswith(".safetensors")
    )


def tinyify_api(workflow: dict, family: str | None = None) -> dict:
    """A copy of an API-format workflow with the text and vision encoders replaced by the fixture nodes.

    An encoder loader is dropped only once nothing reads it; one still read elsewhere (say by a
    LoraLoader's clip input) stays, and the run then fails on its missing file rather than silently.
    """
    family = family or family_of(workflow)
    tiny = copy.deepcopy(workflow)
    for node in tiny.values():
        inputs = node["inputs"]
        if node["class_type"] == TEXT_ENCODE:
            node["class_type"] = FIXTURE_TEXT_ENCODE
            node["inputs"] = {"family": family, "text": inputs["text"], "tokens": FIXTURE_TOKENS}
        elif node["class_type"] == VISION_ENCODE:
            node["class_type"] = FIXTURE_VISION_ENCODE
            node["inputs"] = {"image": inputs["image"], "family": family}
        elif node["class_type"] in TINY_SEGMENTERS:
            inputs["model_name"] = TINY_SEGMENTERS[node["class_type"]]
    read = {str(value[0]) for node in tiny.values() for value in node["inputs"].values() if _is_api_link(value)}
    return {node_id: node for node_id, node in tiny.items()
            if node["class_type"] not in ENCODER_LOADERS or node_id in read}


def _is_api_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def shrink_api(workflow: dict, *, size: int = 64, length: int = 9, steps: int = 4) -> dict:
    """Small frames, few frames, few steps (sampler splits scaled along), for a run of seconds."""
    small = copy.deepcopy(workflow)
    for node in small.values():
        inputs = node["inputs"]
        if node["class_type"] in LATENT_BUILDERS:
            inputs.update(width=size, height=size, length=length)
        if node["class_type"] in STEP_SETTERS:
            full = inputs["steps"]
            inputs["steps"] = steps
            for key in ("start_at_step", "end_at_step"):
                if key in inputs:
                    inputs[key] = min(steps, round(inputs[key] * steps / full))
    return small
