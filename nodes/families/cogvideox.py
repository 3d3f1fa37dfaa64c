"""CogVideoX (in ComfyUI 0.33.0; not in 0.3.75): ``CogVideoXTransformer3DModel`` under a ``CogVideoX`` model.

Its blocks take the video stream and the text stream separately, normalise both, and run one joint attention
over them with shared projections. ComfyUI gives these blocks no block replacement and no block index; the core
tracks them with forward hooks like any other family's. Where the video sits in the joint attention is found, on
the first block of a model call, by finding the block's normalised video stream in the input of its value
projection.
"""

from __future__ import annotations

import math

import comfy.model_base

from .base import BlockRun, JointFamily, locate_rows


class CogVideoXFamily(JointFamily):
    name = "CogVideoX"
    needs_module = "comfy.ldm.cogvideo"

    def claims(self, base_model) -> bool:
        return isinstance(base_model, comfy.model_base.CogVideoX)

    def refusal(self, base_model) -> str | None:
        if type(base_model) is not comfy.model_base.CogVideoX:
            return f"{type(base_model).__name__} is a variant whose token layout Motion Dials does not state yet."
        # I2V: 16 noise + 16 image-latent channels (text-to-video has 16, the VOID inpainting model 48).
        if base_model.diffusion_model.in_channels != 32:
            return "only the image-to-video model (32 input channels) is supported."
        return None

    def blocks(self, diffusion_model):
        return [("block", index, block) for index, block in enumerate(diffusion_model.blocks)]

    def patch_size(self, diffusion_model):
        return (diffusion_model.patch_size_t or 1, diffusion_model.patch_size, diffusion_model.patch_size)

    def attention_heads(self, diffusion_model):
        return diffusion_model.num_attention_heads

    def enter_block(self, forward, block_type, index, module, args, kwargs) -> BlockRun:
        video, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        if video.shape[1] != math.prod(forward.token_grid):
            raise self.mismatch(forward, f"the video stream has {video.shape[1]} tokens, not the latent's "
                                f"{math.prod(forward.token_grid)}")
        run = BlockRun(block_type, index, module, kwargs, video, 0, text_tokens=text.shape[1])
        if not self.stream_offset_known(forward):
            def keep_normalised(_module, _inputs, output):
                run.probe["video"] = output[0]

            def keep_joint(_module, inputs):
                run.probe["joint"] = inputs[0]

            run.probe_hooks += [module.norm1.register_forward_hook(keep_normalised),
                                module.v.register_forward_pre_hook(keep_joint)]
        return run

    def locate_stream(self, forward, run, v, skip_reshape):
        return locate_rows(run.probe.pop("joint"), run.probe.pop("video"), (0, run.text_tokens),
                           "the video stream of CogVideoX's joint attention")


COGVIDEOX = CogVideoXFamily()
