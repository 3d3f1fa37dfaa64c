"""Test fixture, loaded by ComfyUI only in Motion Dials' tests and demo (never in a user's install).

The tiny models (tests/tiny_models.py) can be tiny, the real text and vision encoders cannot: their
widths are fixed by the checkpoints, and billions of random weights would make no better a test. So
these two nodes stand in for CLIPLoader + CLIPTextEncode and CLIPVisionLoader + CLIPVisionEncode.
They give random tensors with the shapes, dtypes and conditioning keys the real encoders give, drawn
from a seed hashed from the text or the image, so equal inputs give equal outputs.
"""

import hashlib
import re

import comfy.clip_vision
import torch

CATEGORY = "Motion Dials/test fixture"
FAMILIES = ["wan", "hunyuan_video_1.5", "cogvideox"]

# Hidden width of each family's text encoder: umt5-xxl for Wan, Qwen2.5-VL 7B for HunyuanVideo 1.5, T5-XXL for
# CogVideoX.
TEXT_WIDTH = {"wan": 4096, "hunyuan_video_1.5": 3584, "cogvideox": 4096}
# HunyuanVideo 1.5 also encodes quoted text (what should be written in the video) with ByT5-small,
# one token per UTF-8 byte plus an end token, into the conditioning key "conditioning_byt5small".
BYT5_WIDTH = 1472
QUOTED_TEXT = re.compile(r"\"(.*?)\"|‘(.*?)’|“(.*?)”")

# (tokens, hidden width, pooled width) of each family's vision encoder output:
# Wan 2.1: clip_vision_h, ViT-H/14 at 224 px: 16 x 16 patches + a class token.
# HunyuanVideo 1.5: sigclip_vision_patch14_384, SigLIP at 384 px: 27 x 27 patches, no class token.
VISION_SHAPE = {"wan": (257, 1280, 1024), "hunyuan_video_1.5": (729, 1152, 1152)}
VISION_FAMILIES = list(VISION_SHAPE)  # CogVideoX sees the image only as a latent


def _generator(*parts: bytes | str | int) -> torch.Generator:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
    return torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little"))


def _glyph_bytes(text: str) -> int:
    """Bytes of the ByT5 prompt the real tokenizer builds from the quoted parts of the text (0 if none)."""
    quoted = ["".join(groups) for groups in QUOTED_TEXT.findall(text)]
    return len("".join(f'Text "{part}". ' for part in quoted).encode()) if quoted else 0


class MotionDialsTestConditioning:
    DESCRIPTION = ("Test fixture (Motion Dials tests only): random conditioning shaped like the family's real "
                   "text encoder output, in place of CLIPLoader + CLIPTextEncode.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (FAMILIES, {"tooltip": "Model family the conditioning is shaped for: wan (umt5-xxl, 4096 "
                                             "wide), hunyuan_video_1.5 (Qwen2.5-VL, 3584 wide, plus ByT5 for "
                                             "quoted text) or cogvideox (T5-XXL, 4096 wide)."}),
            "text": ("STRING", {"multiline": True, "default": "",
                                "tooltip": "The prompt. Hashed into the random seed, so different prompts give "
                                           "different conditioning; quoted parts add ByT5 tokens for "
                                           "hunyuan_video_1.5, as with the real encoder."}),
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512,
                               "tooltip": "Sequence length of the text embedding."}),
        }}

    def encode(self, family, text, tokens):
        generator = _generator(family, text, tokens)
        extra = {"pooled_output": None}  # neither umt5 nor Qwen2.5-VL gives a pooled output
        embedding = torch.randn(1, tokens, TEXT_WIDTH[family], generator=generator)
        glyph_bytes = _glyph_bytes(text) if family == "hunyuan_video_1.5" else 0
        if glyph_bytes:
            extra["conditioning_byt5small"] = torch.randn(1, glyph_bytes + 1, BYT5_WIDTH, generator=generator)
        return ([[embedding, extra]],)


class MotionDialsTestClipVision:
    DESCRIPTION = ("Test fixture (Motion Dials tests only): a random CLIP_VISION_OUTPUT shaped like the family's "
                   "real vision encoder output, in place of CLIPVisionLoader + CLIPVisionEncode.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image the real encoder would see; its pixels seed the output, one "
                                           "seed per image of the batch."}),
            "family": (VISION_FAMILIES, {"tooltip": "wan: clip_vision_h output (257 x 1280 hidden states); "
                                             "hunyuan_video_1.5: SigLIP 384 output (729 x 1152)."}),
        }}

    def encode(self, image, family):
        tokens, width, pooled_width = VISION_SHAPE[family]
        hidden, penultimate, pooled = [], [], []
        for frame in image:
            generator = _generator(family, frame.float().cpu().numpy().tobytes())
            hidden.append(torch.randn(tokens, width, generator=generator))
            penultimate.append(torch.randn(tokens, width, generator=generator))
            pooled.append(torch.randn(pooled_width, generator=generator))
        output = comfy.clip_vision.Output()
        output["last_hidden_state"] = torch.stack(hidden)  # what HunyuanVideo 1.5 reads
        output["penultimate_hidden_states"] = torch.stack(penultimate)  # what Wan 2.1 I2V reads
        output["image_embeds"] = torch.stack(pooled)
        output["mm_projected"] = None
        return (output,)


NODE_CLASS_MAPPINGS = {
    "MotionDialsTestConditioning": MotionDialsTestConditioning,
    "MotionDialsTestClipVision": MotionDialsTestClipVision,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MotionDialsTestConditioning": "Test fixture: tiny conditioning (Motion Dials tests only)",
    "MotionDialsTestClipVision": "Test fixture: tiny CLIP vision output (Motion Dials tests only)",
}
