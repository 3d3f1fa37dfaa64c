"""Wan 2.1 / 2.2 (T2V, I2V, FLF2V, TI2V 5B): ComfyUI's ``WanModel`` under a ``WAN21`` or ``WAN22`` model.

A block's stream is ``[reference tokens ; the latent's frames ; extra frames ; in-context latents]``: the
reference tokens of a ``ref_conv`` model first, then the latent, then what the host appends after it
(``time_dim_concat`` frames, and the ``context_latents`` of newer hosts). Inside a block the attention calls come
in a fixed order: the video self-attention over the whole stream, the image cross-attention of an I2V block (its
keys the CLIP-vision tokens), then the text cross-attention.
"""

from __future__ import annotations

import math

import comfy.ldm.wan.model
import comfy.model_base

from .base import AttentionKind, BlockRun, ModelFamily, TokenLayout, patch_tokens, sequence_length

REFERENCE_TOKENS = "wan reference tokens"


class WanFamily(ModelFamily):
    name = "Wan 2.1 / 2.2"
    # The block runs x = x + gate * self_attn(...); x = x + cross_attn(norm3(x), ...): norm3 sees the stream.
    stream_before_cross_attention = "norm3"
    cross_attention = "cross_attn"

    def claims(self, base_model) -> bool:
        return isinstance(base_model, comfy.model_base.WAN21)

    def refusal(self, base_model) -> str | None:
        diffusion_model = base_model.diffusion_model
        if type(base_model) in (comfy.model_base.WAN21, comfy.model_base.WAN22) and \
                type(diffusion_model) is comfy.ldm.wan.model.WanModel:
            return None
        return (f"{type(base_model).__name__} with {type(diffusion_model).__name__} is a Wan variant whose blocks "
                "add tokens or attention calls of their own, and Motion Dials does not state its token layout yet.")

    def blocks(self, diffusion_model):
        return [("double_block", index, block) for index, block in enumerate(diffusion_model.blocks)]

    def block_path(self, block_type, index):
        return f"blocks.{index}"

    def patch_size(self, diffusion_model):
        return tuple(diffusion_model.patch_size)

    def call_hooks(self, forward):
        ref_conv = getattr(forward.diffusion_model, "ref_conv", None)
        if ref_conv is None:
            return []

        def count(module, inputs, output):
            forward.memo[REFERENCE_TOKENS] = math.prod(output.shape[2:])

        return [ref_conv.register_forward_hook(count)]

    def enter_block(self, forward, block_type, index, module, args, kwargs) -> BlockRun:
        x = args[0] if args else kwargs["x"]
        key = ("wan video start", x.shape[1])
        if key not in forward.memo:
            forward.memo[key] = self._video_start(forward, kwargs, x.shape[1])
        image_tokens = kwargs.get("context_img_len") if hasattr(module.cross_attn, "k_img") else None
        return BlockRun(block_type, index, module, {"x": x, **kwargs}, x, forward.memo[key], image_tokens=image_tokens)

    def _video_start(self, forward, block_kwargs: dict, stream_tokens: int) -> int:
        grid = forward.token_grid
        reported = block_kwargs.get("transformer_options", {}).get("grid_sizes")
        if reported is not None:
            reported = tuple(int(size) for size in reported)
            if reported[1:] != grid[1:] or reported[0] < grid[0]:
                raise self.mismatch(forward, f"the host reports a token grid of {reported}, but the latent gives "
                                    f"{grid}")
        patch = self.patch_size(forward.diffusion_model)
        reference = forward.memo.get(REFERENCE_TOKENS, 0)
        appended = 0
        if forward.call_kwargs.get("time_dim_concat") is not None:
            appended += patch_tokens(forward.call_kwargs["time_dim_concat"].shape, patch)
        for latent in forward.call_kwargs.get("context_latents") or ():
            appended += patch_tokens(latent.shape, patch)
        video = math.prod(grid)
        if reference + video + appended != stream_tokens:
            raise self.mismatch(forward, f"the blocks see {stream_tokens} tokens, while {reference} reference, "
                                f"{video} video and {appended} appended tokens add up to "
                                f"{reference + video + appended}")
        return reference

    def attention_layout(self, forward, run, call_index, q, k, v, skip_reshape):
        q_len, k_len = sequence_length(q, skip_reshape), sequence_length(k, skip_reshape)
        stream_tokens = run.stream.shape[1]
        if call_index == 0:
            if q_len != stream_tokens or k_len != stream_tokens:
                raise self.mismatch(forward, f"the first attention of block {run.index} has {q_len} queries and "
                                    f"{k_len} keys, not the block's {stream_tokens} tokens")
            kind = AttentionKind.VIDEO_SELF
        elif q_len != stream_tokens:
            return None
        elif call_index == 1 and run.image_tokens is not None and k_len == run.image_tokens:
            kind = AttentionKind.IMAGE_CROSS
        else:
            kind = AttentionKind.TEXT_CROSS
        layout: TokenLayout = self.layout(forward, run, q_len, k_len, run.video_start)
        return kind, layout


WAN = WanFamily()
