"""Test fixture, loaded by ComfyUI only in Motion Dials' tests and demo (never in a user's install).

Real text and vision encoders cannot be made tiny (their widths are fixed by their configs), so
these two nodes stand in for CLIPTextEncode and CLIPVisionEncode: they give random tensors of the
shapes the tiny models expect, derived deterministically from the text or the image.
"""

import hashlib

import comfy.clip_vision
import torch

FAMILIES = ("wan", "hunyuan_video_1.5")
TEXT_WIDTH = {"wan": 4096, "hunyuan_video_1.5": 3584}  # umt5-xxl; Qwen2.5-VL 7B
CATEGORY = "Motion Dials/test fixture"


def _generator(*parts) -> torch.Generator:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class MotionDialsTestConditioning:
    """Test fixture: conditioning in place of a text encoder."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (FAMILIES, {"tooltip": "Which model family the conditioning is shaped for."}),
            "text": ("STRING", {"multiline": True, "default": "", "tooltip": "Hashed into the random seed."}),
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512, "tooltip": "Sequence length of the fake text."}),
        }}

    def encode(self, family, text, tokens):
        embedding = torch.randn(1, tokens, TEXT_WIDTH[family], generator=_generator(family, text, tokens))
        extra = {"pooled_output": torch.zeros(1, 768)} if family == "hunyuan_video_1.5" else {}
        return ([[embedding, extra]],)


class MotionDialsTestClipVision:
    """Test fixture: a CLIP-vision output in place of a vision encoder."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image the real encoder would see (its mean seeds the output)."}),
            "family": (FAMILIES, {"tooltip": "wan: clip_vision_h penultimate states (257 x 1280); "
                                             "hunyuan_video_1.5: SigLIP states (16 x 1152, shortened)."}),
        }}

    def encode(self, image, family):
        generator = _generator(family, round(float(image.float().mean()), 6))
        output = comfy.clip_vision.Output()
        if family == "wan":
            output.penultimate_hidden_states = torch.randn(image.shape[0], 257, 1280, generator=generator)
        else:
            output.last_hidden_state = torch.randn(image.shape[0], 16, 1152, generator=generator)
        return (output,)


NODE_CLASS_MAPPINGS = {
    "MotionDialsTestConditioning": MotionDialsTestConditioning,
    "MotionDialsTestClipVision": MotionDialsTestClipVision,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MotionDialsTestConditioning": "Test fixture: tiny conditioning (Motion Dials tests only)",
    "MotionDialsTestClipVision": "Test fixture: tiny CLIP vision output (Motion Dials tests only)",
}
