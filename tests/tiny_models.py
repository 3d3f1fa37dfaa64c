"""Tiny random-weight models in the real file formats, for tests and the demo.

`python -m tests.tiny_models --out DIR` builds each diffusion model the way the host itself does when it
loads a file: ComfyUI's model detection reads a few keys and shapes of the real format (two blocks, 256
wide: 2 heads of 128, the head size ComfyUI's detection assumes), and the model configuration it picks
builds the model with whatever parameters that host's classes take. The weights are then drawn at random
and saved as safetensors under the standard file name of ComfyUI's workflow templates, and the full file
is checked to detect as the same model again. So ComfyUI's real loaders (UNETLoader, VAELoader) read them
exactly as they read the released files, and each host gets files of its own model classes. Families a
host does not have (CogVideoX on ComfyUI 0.3.75) are left out on that host.

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
    build: str  # key of DIFFUSION_KEYS or VAES
    seed: int
    needs: str = ""  # a module of the host the family lives in, for families that not every host has

    def on_this_host(self) -> bool:
        import importlib.util

        return not self.needs or importlib.util.find_spec(self.needs) is not None


MODELS = (
    TinyModel("diffusion_models", "wan2.1_i2v_480p_14B_fp16.safetensors", "wan2.1", "i2v (CLIP-vision branch)",
              "image_to_video_wan", "wan21_i2v", 1),
    TinyModel("diffusion_models", "wan2.1_t2v_1.3B_fp16.safetensors", "wan2.1", "t2v",
              "text_to_video_wan", "wan21_t2v", 2),
    TinyModel("diffusion_models", "wan2.1_flf2v_720p_14B_fp16.safetensors", "wan2.1",
              "first-last-frame to video (two CLIP-vision images)", "wan2.1_flf2v_720_f16", "wan21_flf2v", 11),
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
    # The fourth model of the DyMoS paper; in ComfyUI 0.33.0, not in 0.3.75. No template loads it.
    TinyModel("diffusion_models", "cogvideox_5b_i2v_bf16.safetensors", "cogvideox", "i2v (1.0, 5B layout)", "",
              "cogvideox_i2v", 10, needs="comfy.ldm.cogvideo"),
    # A video family Motion Dials does not support, for the clear-error tests.
    TinyModel("diffusion_models", "hunyuan_video_t2v_720p_bf16.safetensors", "hunyuan_video_1.0",
              "t2v (unsupported by Motion Dials)", "hunyuan_video_text_to_video", "hunyuan10_t2v", 8),
    TinyModel("vae", "wan_2.1_vae.safetensors", "wan2.1", "vae (Wan 2.1 and Wan 2.2 A14B)",
              "image_to_video_wan", "wan21_vae", 7),
)


def wan_keys(in_dim: int, out_dim: int, *, image_branch: bool = False, image_positions: int = 0, dim: int = WIDTH,
             ffn_dim: int = WAN_FFN, layers: int = BLOCKS) -> dict:
    """Wan 2.1 / 2.2: in_dim 16 (t2v), 36 (16 noise + 16 image latent + 4 mask) or 48 (TI2V 5B latent);
    ``image_branch``: the CLIP-vision projection of Wan 2.1 I2V (Wan 2.2 sees the image only through its input
    channels); ``image_positions``: FLF2V's position table over the CLIP tokens of its first and last frame.
    The benchmarks ask for larger ones (dim, ffn_dim, layers)."""
    keys = {"head.modulation": (1, 2, dim), "head.head.weight": (out_dim * 4, dim),
            "patch_embedding.weight": (dim, in_dim, 1, 2, 2)}
    keys.update({f"blocks.{i}.ffn.0.weight": (ffn_dim, dim) for i in range(layers)})
    if image_branch:
        keys["img_emb.proj.0.bias"] = (1280,)
    if image_positions:
        keys["img_emb.emb_pos"] = (1, image_positions, 1280)
    return keys


def hunyuan15_i2v_keys() -> dict:
    """HunyuanVideo 1.5 I2V: double blocks only, like the real one. Input 65 = 32 latent + 32 image latent +
    1 mask; Qwen2.5-VL text (3584); SigLIP vision (1152); cond_type_embedding; no ByT5 branch (see above)."""
    keys = {"txt_in.individual_token_refiner.blocks.0.norm1.weight": (WIDTH,),
            "img_in.proj.weight": (WIDTH, 65, 1, 1, 1), "final_layer.linear.weight": (32, WIDTH),
            "txt_in.input_embedder.weight": (WIDTH, 3584), "cond_type_embedding.weight": (3, WIDTH),
            "vision_in.proj.0.weight": (1152,)}
    keys.update({f"double_blocks.{i}.img_mod.lin.weight": (6 * WIDTH, WIDTH) for i in range(BLOCKS)})
    return keys


def hunyuan10_t2v_keys() -> dict:
    """HunyuanVideo 1.0 T2V: llava text (4096), CLIP-L pooled vector (768), guidance embedding; one double and
    one single block."""
    return {"txt_in.individual_token_refiner.blocks.0.norm1.weight": (WIDTH,),
            "img_in.proj.weight": (WIDTH, 16, 1, 2, 2), "final_layer.linear.weight": (16 * 4, WIDTH),
            "txt_in.input_embedder.weight": (WIDTH, 4096), "vector_in.in_layer.weight": (WIDTH, 768),
            "guidance_in.in_layer.weight": (WIDTH, 256), "double_blocks.0.img_mod.lin.weight": (6 * WIDTH, WIDTH),
            "single_blocks.0.modulation.lin.weight": (3 * WIDTH, WIDTH)}


COGVIDEOX_WIDTH = 128  # ComfyUI derives CogVideoX's head count as width // 64
COGVIDEOX_TIME = 128


def cogvideox_i2v_keys() -> dict:
    """CogVideoX 1.0 I2V (the 5B I2V layout): 2-D patch embedding of 32 channels (16 noise + 16 image latent),
    T5-XXL text (4096), rotary positions (no learned position table)."""
    keys = {"patch_embed.proj.weight": (COGVIDEOX_WIDTH, 32, 2, 2),
            "patch_embed.text_proj.weight": (COGVIDEOX_WIDTH, 4096)}
    keys.update({f"blocks.{i}.norm1.linear.weight": (6 * COGVIDEOX_WIDTH, COGVIDEOX_TIME) for i in range(BLOCKS)})
    return keys


def detected_diffusion_model(keys: dict):
    """The diffusion model the host builds for a file with these keys (shapes only, on the meta device).

    ComfyUI's own model detection reads the keys and shapes, and its model configuration builds the model with
    every parameter the host's classes take: nothing here depends on a host's constructor signatures."""
    import comfy.model_detection
    import torch

    state = {key: torch.empty(shape, device="meta") for key, shape in keys.items()}
    config = comfy.model_detection.model_config_from_unet(state, "")
    if config is None:
        raise RuntimeError(f"this ComfyUI detects no model from the keys {sorted(keys)}")
    return config, config.get_model(state, "", device=torch.device("meta")).diffusion_model


def diffusion_state_dict(keys: dict, seed: int, dtype, unit_biases: tuple[str, ...] = ()) -> dict:
    """A full random state dict of the model the host detects from ``keys``, checked to detect the same again."""
    import comfy.model_detection

    config, module = detected_diffusion_model(keys)
    state = random_state_dict(module, seed, dtype, unit_biases)
    again = comfy.model_detection.model_config_from_unet({k: v.to("meta") for k, v in state.items()}, "")
    if type(again) is not type(config) or again.unet_config != config.unet_config:
        raise RuntimeError(f"the generated file detects as {type(again).__name__}, not {type(config).__name__}")
    return state


def _wan21_vae():
    """The Wan 2.1 VAE at width 8 (real: 96); ComfyUI reads the width from decoder.head.0.gamma."""
    import comfy.ldm.wan.vae

    return comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                    temperal_downsample=[False, True, True], dropout=0.0)


# Diffusion models: the keys ComfyUI detects them by. The VAE: ComfyUI's VAE class of that name.
DIFFUSION_KEYS = {
    "wan21_i2v": lambda: wan_keys(36, 16, image_branch=True),
    "wan21_t2v": lambda: wan_keys(16, 16),
    "wan21_flf2v": lambda: wan_keys(36, 16, image_branch=True, image_positions=2 * 257),
    "wan22_i2v": lambda: wan_keys(36, 16),
    "wan22_ti2v": lambda: wan_keys(48, 48),
    "hunyuan15_i2v": hunyuan15_i2v_keys,
    "hunyuan10_t2v": hunyuan10_t2v_keys,
    "cogvideox_i2v": cogvideox_i2v_keys,
}
VAES = {"wan21_vae": _wan21_vae}


# CogVideoX gates its attention and feed-forward outputs by a linear map of the time embedding with no other term,
# so with small random weights the blocks would add almost nothing to the stream.
UNIT_BIASES = {"cogvideox_i2v": ("norm1.linear", "norm2.linear")}


def model_state_dict(build: str, seed: int, dtype) -> dict:
    if build in VAES:
        return random_state_dict(VAES[build](), seed, dtype)
    return diffusion_state_dict(DIFFUSION_KEYS[build](), seed, dtype, UNIT_BIASES.get(build, ()))


def storage_dtype(file_name: str):
    import torch

    return torch.bfloat16 if "_bf16" in file_name else torch.float16


def random_state_dict(module, seed: int, dtype, unit_biases: tuple[str, ...] = ()) -> dict:
    """Norm scales at one, biases at zero, every other weight N(0, INIT_STD), drawn in a fixed order.

    Biases of modules whose name ends with one of ``unit_biases`` are N(0, 1) instead (from a generator of their
    own, so the other weights stay as they are): a modulation whose gates would otherwise be near zero and hide
    every attention behind them."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    bias_generator = torch.Generator().manual_seed(seed + 1000)
    state = {}
    for module_name, submodule in module.named_modules():
        is_norm = "norm" in type(submodule).__name__.lower()  # LayerNorm, RMSNorm, Wan's RMS_norm
        for param_name, param in submodule.named_parameters(recurse=False):
            if is_norm and param_name != "bias":
                value = torch.ones(param.shape)
            elif param_name == "bias" and module_name.endswith(unit_biases):
                value = torch.randn(param.shape, generator=bias_generator)
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
ADAPTER_RANK = 8  # the cross-frame attention's query change and output projection


def adapter_info(adapter: TinyAdapter, **changes):
    from motion_dials.models.miva import AdapterInfo

    fields = dict(base="wan2.1-t2v-1.3b", motion=adapter.motion, subject=adapter.subject, dim=WIDTH,
                  heads=WIDTH // 128, blocks=BLOCKS, query_rank=ADAPTER_RANK, output_rank=ADAPTER_RANK,
                  output_bias=False, prompt_rank=adapter.prompt_rank, prompt_bias=bool(adapter.prompt_rank),
                  prompt_query_bias=bool(adapter.prompt_rank),
                  mask_stream=False)
    return AdapterInfo(**{**fields, **changes})


def random_adapter_tensors(info, seed: int, zero_outputs: bool = False) -> dict:
    """Every tensor of the format: RMSNorm/LayerNorm gains one, the rest N(0, 0.1) (norm biases too), drawn in
    name order; ``zero_outputs`` zeroes the output projections (cfa.o, prompt.up), as training starts."""
    import torch

    from motion_dials.models.miva import expected_shapes

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(expected_shapes(info).items()):
        if name.endswith(("norm_q", "norm.weight")):
            value = torch.ones(shape)
        elif zero_outputs and (".cfa.o." in name or ".prompt.up." in name):
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
        if not model.on_this_host():
            continue
        (out / model.folder).mkdir(parents=True, exist_ok=True)
        dtype = storage_dtype(model.file_name)
        state = model_state_dict(model.build, model.seed, dtype)
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
