"""HunyuanVideo 1.5: ComfyUI's ``HunyuanVideo`` diffusion model under a ``HunyuanVideo15`` model.

Its blocks are MM-DiT double blocks: an image stream ``[reference latent tokens ; the latent's frames]`` and a
text stream, each with its own projections, meeting in one joint attention. The order in which the host
concatenates the two streams there changed between ComfyUI releases (0.3.75: image first; 0.33.0: text first),
so it is never assumed: on the first block of a model call the core finds the image stream's values inside the
joint attention's values (a forward hook keeps the output of the block's image ``qkv`` projection).
"""

from __future__ import annotations

import math

import comfy.model_base

from .base import BlockRun, JointFamily, as_rows, locate_rows, patch_tokens


class HunyuanVideo15Family(JointFamily):
    name = "HunyuanVideo 1.5"

    def claims(self, base_model) -> bool:
        return isinstance(base_model, comfy.model_base.HunyuanVideo15)

    def refusal(self, base_model) -> str | None:
        if type(base_model) is not comfy.model_base.HunyuanVideo15:
            return f"{type(base_model).__name__} is a variant whose token layout Motion Dials does not state yet."
        if len(base_model.diffusion_model.single_blocks):
            return "it has single-stream blocks, which HunyuanVideo 1.5 has not, and Motion Dials does not lay out."
        return None

    def blocks(self, diffusion_model):
        return [("double_block", index, block) for index, block in enumerate(diffusion_model.double_blocks)]

    def patch_size(self, diffusion_model):
        return tuple(diffusion_model.patch_size)

    def enter_block(self, forward, block_type, index, module, args, kwargs) -> BlockRun:
        image, text = kwargs["img"], kwargs["txt"]
        video = math.prod(forward.token_grid)
        reference = forward.call_kwargs.get("ref_latent")
        reference = 0 if reference is None else patch_tokens(reference.shape, self.patch_size(forward.diffusion_model))
        if reference + video != image.shape[1]:
            raise self.mismatch(forward, f"the image stream has {image.shape[1]} tokens, not the {reference} "
                                f"reference and {video} video tokens of the latent")
        run = BlockRun(block_type, index, module, kwargs, image, reference, text_tokens=text.shape[1])
        if not self.stream_offset_known(forward):
            def keep(_module, _inputs, output):
                run.probe["image qkv"] = output
            run.probe_hooks.append(module.img_attn.qkv.register_forward_hook(keep))
        return run

    def locate_stream(self, forward, run, v, skip_reshape):
        # The joint values hold the image stream's values as the third of its qkv projection, per head.
        values = as_rows(v, skip_reshape).flatten(2)
        image_values = run.probe.pop("image qkv").unflatten(-1, (3, -1))[:, :, 2]
        return locate_rows(values, image_values, (0, run.text_tokens),
                           "the image stream of HunyuanVideo's joint attention")


HUNYUAN_VIDEO_15 = HunyuanVideo15Family()
