"""Tiny random-weight models in the real file formats, for tests and the demo.

`python -m tests.tiny_models --out DIR` builds each model from ComfyUI's own model classes at a tiny
size (two blocks, 256 wide: 2 heads of 128, the head size ComfyUI's detection assumes) and saves its
weights as safetensors under the standard file name of ComfyUI's workflow templates. The files carry
the real key names, so ComfyUI's real loaders (UNETLoader, VAELoader) detect the family from the keys
and shapes exactly as they do for the released files.

What cannot shrink: layers whose widths are fixed by the encoders feeding them (umt5 4096, CLIP-H
1280, Qwen2.5-VL 3584, SigLIP 1152), so the I2V files are larger than the T2V ones. HunyuanVideo
1.5's ByT5 glyph branch (hard-coded 1472 -> 2048 -> 2048, 15 MB alone) is optional in the model and
left out; the model then ignores ByT5 conditioning, as ComfyUI does for a checkpoint without it.
Only the Wan 2.1 VAE can be tiny: ComfyUI reads its width from the weights, while the Wan 2.2 and
HunyuanVideo 1.5 VAEs have hard-coded widths (hundreds of MB even with random weights), so they are not written.

Weights are stored in the dtype the file name says (fp16 or bf16). The two Wan 2.2 A14B experts keep
their standard `fp8_scaled` names but are stored in fp16, which ComfyUI loads the same way.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

if __package__:
    from . import tiny_segmenters
    from .host import import_host
else:
    import tiny_segmenters
    from host import import_host

WIDTH = 256  # 2 heads: ComfyUI derives the head count as width // 128 for Wan and HunyuanVideo
WAN_FFN = 512
BLOCKS = 2
INIT_STD = 0.02  # small enough that a few sampling steps through random weights stay finite


@dataclass(frozen=True)
class TinyModel:
    folder: str  # ComfyUI model folder: diffusion_models or vae
    file_name: str  # the standard name in ComfyUI's workflow templates
    family: str
    role: str
    template: str  # a template of comfyui_workflow_templates that loads this file ("" for none)
    build: str  # key of BUILDERS
    seed: int


MODELS = (
    TinyModel("diffusion_models", "wan2.1_i2v_480p_14B_fp16.safetensors", "wan2.1", "i2v (CLIP-vision branch)",
              "image_to_video_wan", "wan21_i2v", 1),
    TinyModel("diffusion_models", "wan2.1_t2v_1.3B_fp16.safetensors", "wan2.1", "t2v",
              "text_to_video_wan", "wan21_t2v", 2),
    TinyModel("diffusion_models", "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2",
              "i2v A14B high-noise expert", "video_wan2_2_14B_i2v", "wan22_i2v", 3),
    TinyModel("diffusion_models", "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors", "wan2.2",
              "i2v A14B low-noise expert", "video_wan2_2_14B_i2v", "wan22_i2v", 4),
    TinyModel("diffusion_models", "wan2.2_ti2v_5B_fp16.safetensors", "wan2.2", "ti2v 5B (48-channel latent)",
              "video_wan2_2_5B_ti2v", "wan22_ti2v", 5),
    TinyModel("diffusion_models", "hunyuanvideo1.5_720p_i2v_fp16.safetensors", "hunyuan_video_1.5", "i2v",
              "video_hunyuan_video_1.5_720p_i2v", "hunyuan15_i2v", 6),
    # No template loads a motion fine-tune; this stands in for EDG's theta_sft in workflows/edg_wan21_i2v.
    TinyModel("diffusion_models", "wan2.1_i2v_480p_14B_motion_finetune_fp16.safetensors", "wan2.1",
              "i2v motion fine-tune (EDG's theta_sft)", "", "wan21_i2v", 9),
    # A video family Motion Dials does not support, for the clear-error tests.
    TinyModel("diffusion_models", "hunyuan_video_t2v_720p_bf16.safetensors", "hunyuan_video_1.0",
              "t2v (unsupported by Motion Dials)", "hunyuan_video_text_to_video", "hunyuan10_t2v", 8),
    TinyModel("vae", "wan_2.1_vae.safetensors", "wan2.1", "vae (Wan 2.1 and Wan 2.2 A14B)",
              "image_to_video_wan", "wan21_vae", 7),
)


def _wan(model_type: str, in_dim: int, out_dim: int, *, dim: int = WIDTH, ffn_dim: int = WAN_FFN,
         layers: int = BLOCKS, device=None):
    """Wan 2.1 / 2.2: in_dim 16 (t2v), 36 (16 noise + 16 image latent + 4 mask) or 48 (TI2V 5B latent).

    model_type "i2v" adds img_emb (the CLIP-vision branch of Wan 2.1 I2V); Wan 2.2 has none, the image
    reaches it only through the input channels. The benchmarks build larger ones (dim, ffn_dim, layers).
    """
    import comfy.ldm.wan.model
    import comfy.ops

    return comfy.ldm.wan.model.WanModel(
        model_type=model_type, patch_size=(1, 2, 2), in_dim=in_dim, dim=dim, ffn_dim=ffn_dim, freq_dim=256,
        text_dim=4096, out_dim=out_dim, num_heads=dim // 128, num_layers=layers, qk_norm=True,
        cross_attn_norm=True, eps=1e-6, operations=comfy.ops.disable_weight_init, device=device,
    )


def _hunyuan15_i2v():
    """HunyuanVideo 1.5 I2V: double blocks only, like the real one.

    Input 65 = 32 latent + 32 image latent + 1 mask; Qwen2.5-VL text (3584); SigLIP vision (1152);
    cond_type_embedding as the real model; no ByT5 branch (see the module docstring).
    """
    import comfy.ldm.hunyuan_video.model
    import comfy.ops

    return comfy.ldm.hunyuan_video.model.HunyuanVideo(
        image_model="hunyuan_video", in_channels=65, out_channels=32, vec_in_dim=None, context_in_dim=3584,
        hidden_size=WIDTH, mlp_ratio=4.0, num_heads=WIDTH // 128, depth=BLOCKS, depth_single_blocks=0,
        axes_dim=[16, 56, 56], theta=256, patch_size=[1, 1, 1], qkv_bias=True, guidance_embed=False, byt5=False,
        meanflow=False, use_cond_type_embedding=True, vision_in_dim=1152, operations=comfy.ops.disable_weight_init,
    )


def _hunyuan10_t2v():
    """HunyuanVideo 1.0 T2V: llava text (4096), CLIP-L pooled vector (768), guidance embedding."""
    import comfy.ldm.hunyuan_video.model
    import comfy.ops

    return comfy.ldm.hunyuan_video.model.HunyuanVideo(
        image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
        hidden_size=WIDTH, mlp_ratio=4.0, num_heads=WIDTH // 128, depth=1, depth_single_blocks=1,
        axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False,
        meanflow=False, use_cond_type_embedding=False, vision_in_dim=None, operations=comfy.ops.disable_weight_init,
    )


def _wan21_vae():
    """The Wan 2.1 VAE at width 8 (real: 96); ComfyUI reads the width from decoder.head.0.gamma."""
    import comfy.ldm.wan.vae

    return comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                    temperal_downsample=[False, True, True], dropout=0.0)


BUILDERS = {
    "wan21_i2v": lambda: _wan("i2v", 36, 16),
    "wan21_t2v": lambda: _wan("t2v", 16, 16),
    "wan22_i2v": lambda: _wan("t2v", 36, 16),
    "wan22_ti2v": lambda: _wan("t2v", 48, 48),
    "hunyuan15_i2v": _hunyuan15_i2v,
    "hunyuan10_t2v": _hunyuan10_t2v,
    "wan21_vae": _wan21_vae,
}


def storage_dtype(file_name: str):
    import torch

    return torch.bfloat16 if "_bf16" in file_name else torch.float16


def random_state_dict(module, seed: int, dtype) -> dict:
    """Norm scales at one, biases at zero, every other weight N(0, INIT_STD), drawn in a fixed order."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module_name, submodule in module.named_modules():
        is_norm = "norm" in type(submodule).__name__.lower()  # LayerNorm, RMSNorm, Wan's RMS_norm
        for param_name, param in submodule.named_parameters(recurse=False):
            if is_norm and param_name != "bias":
                value = torch.ones(param.shape)
            elif param_name == "bias":
                value = torch.zeros(param.shape)
            else:
                value = torch.randn(param.shape, generator=generator) * INIT_STD
            state[f"{module_name}.{param_name}" if module_name else param_name] = value.to(dtype).contiguous()
    missing = set(module.state_dict()) - set(state)
    if missing:
        raise RuntimeError(f"state entries that are not parameters, not written: {sorted(missing)}")
    return state


@dataclass(frozen=True)
class TinyAdapter:
    file_name: str
    motion: str
    subject: str
    prompt_rank: int
    seed: int


# MIVA adapters for the tiny Wan 2.1 T2V (no trained adapter is published anywhere): random weights in the
# Motion Dials format, output projections included, so that each one visibly moves the video. Named as the
# shipped MIVA workflows name the adapters a user converts.
ADAPTERS = (
    TinyAdapter("miva_wan2.1_t2v_1.3b_horse_running.safetensors", "horse running", "horse", 16, 31),
    TinyAdapter("miva_wan2.1_t2v_1.3b_waterfall.safetensors", "waterfall", "waterfall", 0, 32),
)
ADAPTER_CFA_RANK = 8


def adapter_info(adapter: TinyAdapter, **changes):
    from motion_dials.models.miva import AdapterInfo

    fields = dict(base="wan2.1-t2v-1.3b", motion=adapter.motion, subject=adapter.subject, dim=WIDTH,
                  heads=WIDTH // 128, blocks=BLOCKS, cfa_rank=ADAPTER_CFA_RANK, prompt_rank=adapter.prompt_rank,
                  mask_stream=False)
    return AdapterInfo(**{**fields, **changes})


def random_adapter_tensors(info, seed: int, zero_outputs: bool = False) -> dict:
    """Every tensor of the format: RMSNorm/LayerNorm gains one, the rest N(0, 0.1) (norm biases too), drawn in
    name order; ``zero_outputs`` zeroes the output projections (cfa.o.up, prompt.up), as training starts."""
    import torch

    from motion_dials.models.miva import expected_shapes

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(expected_shapes(info).items()):
        if name.endswith(("norm_q", "norm.weight")):
            value = torch.ones(shape)
        elif zero_outputs and (name.endswith(".o.up") or ".prompt.up." in name):
            value = torch.zeros(shape)
        else:
            value = torch.randn(shape, generator=generator) * 0.1
        tensors[name] = value.to(torch.float16)
    return tensors


def generate(out: Path) -> dict:
    from safetensors.torch import save_file

    from motion_dials.models.miva import save_adapter

    manifest = {}
    for model in MODELS:
        (out / model.folder).mkdir(parents=True, exist_ok=True)
        dtype = storage_dtype(model.file_name)
        state = random_state_dict(BUILDERS[model.build](), model.seed, dtype)
        save_file(state, str(out / model.folder / model.file_name), metadata={"motion_dials": "tiny random weights"})
        manifest[f"{model.folder}/{model.file_name}"] = {
            "family": model.family, "role": model.role, "template": model.template, "dtype": str(dtype).split(".")[1],
        }
    (out / "miva").mkdir(exist_ok=True)
    for adapter in ADAPTERS:
        info = adapter_info(adapter)
        save_adapter(out / "miva" / adapter.file_name, info, random_adapter_tensors(info, adapter.seed))
        manifest[f"miva/{adapter.file_name}"] = {"family": "wan2.1", "role": f"MIVA adapter: {adapter.motion}",
                                                 "template": "", "dtype": "float16"}
    manifest.update(tiny_segmenters.generate(out))  # GroundingDINO, its BERT folder and SAM 2, for subject masks
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="gets diffusion_models/, vae/, miva/, grounding-dino/, bert-base-uncased/, sam2/ "
                        "and manifest.json")
    args = parser.parse_args()
    import_host()
    for path, entry in generate(args.out).items():
        target = args.out / path
        size = (sum(f.stat().st_size for f in target.rglob("*")) if target.is_dir() else target.stat().st_size) / 2**20
        print(f"{path:<68} {size:6.2f} MiB  {entry['family']} {entry['role']}")


if __name__ == "__main__":
    main()
