"""Tiny random-weight models in the real file formats, for tests and the demo.

`python -m tests.tiny_models --out DIR` builds each model from ComfyUI's own model classes at a tiny
width (two blocks, 256 wide: 2 heads of 128, the head size ComfyUI's detection assumes) and saves
its state dict as safetensors under the standard file name of ComfyUI's templates. So the files
carry the real key names and load through ComfyUI's real loaders (UNETLoader, VAELoader), which
detect the family from those keys and shapes. Only the Wan 2.1 VAE can be tiny: ComfyUI reads its
width from the weights, while the Wan 2.2 and HunyuanVideo 1.5 VAEs have hard-coded widths.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

if __package__:
    from .host import import_host
else:
    from host import import_host

WIDTH, FFN, BLOCKS, HEADS = 256, 512, 2, 2

# file name -> (family, role, builder name, seed)
DIFFUSION_MODELS = {
    "wan2.1_i2v_480p_14B_fp16.safetensors": ("wan2.1_i2v", "Wan 2.1 I2V 14B 480p", "wan21_i2v", 1),
    "wan2.1_t2v_1.3B_fp16.safetensors": ("wan2.1_t2v", "Wan 2.1 T2V 1.3B", "wan21_t2v", 2),
    "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors": ("wan2.2_i2v", "Wan 2.2 I2V A14B high-noise expert",
                                                         "wan22_i2v", 3),
    "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors": ("wan2.2_i2v", "Wan 2.2 I2V A14B low-noise expert",
                                                        "wan22_i2v", 4),
    "wan2.2_ti2v_5B_fp16.safetensors": ("wan2.2_ti2v_5b", "Wan 2.2 TI2V 5B", "wan22_ti2v", 5),
    "hunyuanvideo1.5_720p_i2v_fp16.safetensors": ("hunyuan_video_1.5_i2v", "HunyuanVideo 1.5 I2V 720p",
                                                  "hunyuan15_i2v", 6),
    # A video family Motion Dials does not support, for the clear-error tests.
    "hunyuan_video_t2v_720p_bf16.safetensors": ("hunyuan_video_1.0", "HunyuanVideo (1.0) T2V, unsupported",
                                                "hunyuan10_t2v", 8),
}
VAES = {"wan_2.1_vae.safetensors": ("wan2.1_vae", "Wan 2.1 VAE (also used by Wan 2.2 A14B)", "wan21_vae", 7)}


def _wan(model_type: str, in_dim: int, out_dim: int):
    import comfy.ldm.wan.model
    import comfy.ops

    return comfy.ldm.wan.model.WanModel(
        model_type=model_type, patch_size=(1, 2, 2), in_dim=in_dim, dim=WIDTH, ffn_dim=FFN, freq_dim=256,
        text_dim=4096, out_dim=out_dim, num_heads=HEADS, num_layers=BLOCKS, qk_norm=True, cross_attn_norm=True,
        eps=1e-6, operations=comfy.ops.disable_weight_init,
    )


def _hunyuan15_i2v():
    import comfy.ldm.hunyuan_video.model
    import comfy.ops

    # 32 latent channels + 32 of the image latent + 1 mask; Qwen2.5-VL text (3584); SigLIP vision (1152).
    # The real model also has a ByT5 glyph branch; it is optional in the model and left out to stay small.
    return comfy.ldm.hunyuan_video.model.HunyuanVideo(
        image_model="hunyuan_video", in_channels=65, out_channels=32, vec_in_dim=None, context_in_dim=3584,
        hidden_size=WIDTH, mlp_ratio=4.0, num_heads=HEADS, depth=BLOCKS, depth_single_blocks=0,
        axes_dim=[16, 56, 56], theta=256, patch_size=[1, 1, 1], qkv_bias=True, guidance_embed=False, byt5=False,
        meanflow=False, use_cond_type_embedding=True, vision_in_dim=1152, operations=comfy.ops.disable_weight_init,
    )


def _hunyuan10_t2v():
    import comfy.ldm.hunyuan_video.model
    import comfy.ops

    return comfy.ldm.hunyuan_video.model.HunyuanVideo(
        image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
        hidden_size=WIDTH, mlp_ratio=4.0, num_heads=HEADS, depth=1, depth_single_blocks=1,
        axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False,
        meanflow=False, use_cond_type_embedding=False, vision_in_dim=None, operations=comfy.ops.disable_weight_init,
    )


def _wan21_vae():
    import comfy.ldm.wan.vae

    return comfy.ldm.wan.vae.WanVAE(dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                    temperal_downsample=[False, True, True], dropout=0.0)


BUILDERS = {
    "wan21_i2v": lambda: _wan("i2v", 36, 16),
    "wan21_t2v": lambda: _wan("t2v", 16, 16),
    "wan22_i2v": lambda: _wan("t2v", 36, 16),  # Wan 2.2 A14B I2V: image latent in the channels, no CLIP branch
    "wan22_ti2v": lambda: _wan("t2v", 48, 48),
    "hunyuan15_i2v": _hunyuan15_i2v,
    "hunyuan10_t2v": _hunyuan10_t2v,
    "wan21_vae": _wan21_vae,
}


def random_state_dict(module, seed: int):
    """Small random weights: norms at one, biases at zero, the rest N(0, 0.02), stored in fp16."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in module.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("bias", "beta"):
            value = torch.zeros(tensor.shape)
        elif tensor.ndim == 1 and ("norm" in name or leaf in ("gamma", "scale")) or leaf == "gamma":
            value = torch.ones(tensor.shape)
        else:
            value = torch.randn(tensor.shape, generator=generator) * 0.02
        state[name] = value.to(torch.float16).contiguous()
    return state


def generate(out: Path) -> dict:
    from safetensors.torch import save_file

    manifest = {}
    for folder, table in (("diffusion_models", DIFFUSION_MODELS), ("vae", VAES)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for file_name, (family, role, builder, seed) in table.items():
            state = random_state_dict(BUILDERS[builder](), seed)
            save_file(state, str(out / folder / file_name), metadata={"motion_dials": "tiny random test model"})
            manifest[f"{folder}/{file_name}"] = {"family": family, "role": role}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import_host()
    for path, entry in generate(args.out).items():
        size = (args.out / path).stat().st_size / 2**20
        print(f"{path:<70} {size:6.2f} MiB  {entry['role']}")


if __name__ == "__main__":
    main()
