"""MIVA Train: a MIVA motion adapter trained from about ten clips on a Wan 2.1 T2V model, inside ComfyUI.

The math of a step is ``models/miva_training.py``; here is what ties it to ComfyUI: the clips (video files in a
folder of ComfyUI's input directory, decoded with PyAV), the checks made before anything trains, the model call,
the progress bar, interruption and the files.

The model call is MIVA Apply's: ``apply_stack`` on a training copy of the model (its own tensors, as the loaded
model's are inference tensors that autograd cannot save; the loaded model is never touched), called through
ComfyUI's ``apply_model`` with the patch's wrappers, so the cross-frame attention and the implicit prompt run
through the same hooks as when sampling. The adapter always has an implicit prompt, which replaces the whole text
cross-attention, so the text is not used: a constant context of one zero token is passed. With gradient
checkpointing each block runs inside a non-reentrant ``torch.utils.checkpoint`` through ComfyUI's block
replacement, and the call is made inside ``held_calls()`` so that the recomputation during ``backward()`` runs
the same patched block.
"""

# ruff: noqa: E402 (ComfyUI's and the pack's imports come after the by-path start, which must run before them)

from __future__ import annotations

import argparse
import contextlib
import copy
import re
import signal
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path


def _run_by_path() -> None:
    """``python <pack>/nodes/miva_train.py ...``, outside ComfyUI: ComfyUI first on sys.path (``--comfyui`` or
    COMFYUI_PATH), the CPU where there is no GPU (what ``main.py --cpu`` sets), the pack imported as the package
    ``motion_dials`` (as ComfyUI imports it from custom_nodes), then the command, ``main()`` at the end."""
    import importlib
    import importlib.util
    import os
    import sys

    pack = Path(__file__).resolve().parents[1]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (pack, pack / "nodes")]
    argv = sys.argv[1:]
    comfyui = os.environ.get("COMFYUI_PATH")
    for i, arg in enumerate(argv):
        if arg == "--comfyui" and i + 1 < len(argv):
            comfyui = argv[i + 1]
        elif arg.startswith("--comfyui="):
            comfyui = arg.split("=", 1)[1]
    if comfyui:
        sys.path.insert(0, str(Path(comfyui).expanduser().resolve()))
    try:
        import comfy.cli_args
    except ImportError:
        print("MIVA Train: ComfyUI is not importable: give its folder with --comfyui PATH or COMFYUI_PATH.",
              file=sys.stderr)
        sys.exit(2)
    import torch

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    name = "motion_dials"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, pack / "__init__.py",
                                                      submodule_search_locations=[str(pack)])
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    sys.exit(importlib.import_module(f"{name}.nodes.miva_train").main())


if __name__ == "__main__" and not __package__:
    _run_by_path()

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import folder_paths
import torch
import torch.utils.checkpoint
from comfy_api.latest import InputImpl, io, ui

from ..models.miva import Adapter, AdapterInfo, initial_tensors, save_adapter
from ..models.miva_training import (
    Clip,
    LatentCache,
    Run,
    Schedule,
    check_frame_count,
    loss_curve_image,
    state_path,
)
from .families import WAN
from .input_checks import MotionDialsNode, _prompt_server
from .miva import FOLDER, MivaStackType, StackRow, apply_stack, describe
from .patcher_core import UnsupportedModelError, detect_family, held_calls

NODE = "MIVA Train"
CLIPS_NODE = "MIVA Clips"
CATEGORY = "Motion Dials/MIVA"
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".flv", ".gif", ".m4v")
PRECISIONS = ("fp32", "bf16")
CAPTURE_KEY = "motion_dials_train"
TEXT_EVERY_S = 1.0
# MIVA Clips' output. MIVA Train takes VIDEO values only through it: the Nodes 2.0 web UI treats a node with a VIDEO
# input as a video node and hides its image previews, which would hide MIVA Train's loss curve.
ClipVideosType = io.Custom("MIVA_CLIPS")


@dataclass(frozen=True)
class ClipVideos:
    """Training clips as ComfyUI VIDEO values, decoded by MIVA Train at its training size."""
    videos: tuple


# --- checks made before training starts ----------------------------------------------------------------------------

def check_model(model) -> None:
    """A Wan 2.1 text-to-video model, or a ValueError naming the node and input."""
    try:
        family = detect_family(model)
    except UnsupportedModelError as error:
        raise ValueError(f"{NODE}: model must be a Wan 2.1 T2V model (MIVA adapts a text-to-video Wan); {error}") \
            from None
    diffusion_model = model.get_model_object("diffusion_model")
    if family is not WAN:
        raise ValueError(f"{NODE}: model must be a Wan 2.1 T2V model; this one is {family.name}.")
    in_dim = getattr(diffusion_model, "in_dim", None) or diffusion_model.patch_embedding.in_channels
    out_dim = getattr(diffusion_model, "out_dim", in_dim)
    if getattr(diffusion_model, "img_emb", None) is not None or in_dim != out_dim or in_dim != 16:
        raise ValueError(f"{NODE}: model is a Wan image-to-video variant (input {in_dim} channels, output {out_dim}"
                         f"{', a CLIP-vision branch' if getattr(diffusion_model, 'img_emb', None) is not None else ''})"
                         ". MIVA trains on the text-to-video model, whose frame 0 becomes the image: load "
                         "wan2.1_t2v_1.3B with 'Load Diffusion Model'.")


def check_vae(vae, width: int, height: int) -> None:
    channels = getattr(vae, "latent_channels", None)
    if channels != 16:
        raise ValueError(f"{NODE}: vae must be the Wan 2.1 VAE (16 latent channels); this one has {channels}.")
    if width % 16 or height % 16:
        raise ValueError(f"{NODE}: the resolution {width} x {height} does not fit the Wan VAE and patches: width and "
                         "height must be multiples of 16 (e.g. 832 x 480).")


def base_name(diffusion_model) -> str:
    sizes = {1536: "1.3b", 5120: "14b"}
    size = sizes.get(diffusion_model.dim)
    if size is None:
        size = f"{sum(p.numel() for p in diffusion_model.parameters()) / 1e9:.3g}b"
    return f"wan2.1-t2v-{size}"


def clip_files(folder: str | Path) -> list[Path]:
    """The video files of ``folder``, sorted: a name (the node's input) is a folder under ComfyUI's input
    directory, a ``Path`` (the command's ``--clips``) any folder."""
    if isinstance(folder, Path):
        path = folder.resolve()
        if not path.is_dir():
            raise ValueError(f"{NODE}: clips {str(folder)!r} is not a folder. Give the folder that holds the "
                             "training clips.")
    else:
        root = Path(folder_paths.get_input_directory()).resolve()
        path = (root / folder).resolve()
        if not folder or not path.is_relative_to(root) or not path.is_dir():
            raise ValueError(f"{NODE}: clips {folder!r} is not a folder in ComfyUI's input directory ({root}). Put "
                             "the training clips in input/<name>/ and pick <name>.")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise ValueError(f"{NODE}: the folder {str(folder)!r} holds no video files ({', '.join(VIDEO_SUFFIXES)}).")
    return files


def decode_video(source, name: str, width: int, height: int) -> torch.Tensor:
    """Every frame of a video (a file's path, or a file object), by PyAV, scaled and centre-cropped to width x height
    as it is decoded (so a long or large clip never sits in memory at full size), as [N, H, W, 3] floats in [0, 1];
    a clear error if unreadable."""
    import av

    try:
        with av.open(str(source) if isinstance(source, Path) else source) as container:
            frames = [fit(torch.from_numpy(frame.to_ndarray(format="rgb24"))[None].float() / 255.0, width, height)
                      for frame in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as error:
        raise ValueError(f"{NODE}: the clip {name} cannot be read as a video ({error}).") from None
    if not frames:
        raise ValueError(f"{NODE}: the clip {name} has no video frames.")
    return torch.cat(frames)


def fit(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Frames [N, H, W, 3] scaled and centre-cropped to width x height."""
    resized = comfy.utils.common_upscale(frames.movedim(-1, 1), width, height, "bilinear", "center")
    return resized.movedim(1, -1).clamp(0.0, 1.0)


def long_enough(name: str, video: torch.Tensor, frames: int) -> Clip:
    if video.shape[0] < frames:
        raise ValueError(f"{NODE}: the clip {name} has {video.shape[0]} frames, fewer than frames ({frames}). Use "
                         "longer clips or fewer frames (4k + 1).")
    return Clip(name, video)


def read_clips(folder: str | Path, frames: int, width: int, height: int) -> list[Clip]:
    return [long_enough(path.name, decode_video(path, path.name, width, height), frames)
            for path in clip_files(folder)]


def file_source(video):
    """The file (a path or a file object) a VIDEO was opened from, or None for one made of frames. Only a file's own
    stream is decoded: the default stream of other videos is a lossy re-encoding of their frames."""
    return video.get_stream_source() if isinstance(video, InputImpl.VideoFromFile) else None


def video_name(source, index: int) -> str:
    """A VIDEO's name in messages and metadata: its file's name, else its place in the list."""
    return Path(source).name if isinstance(source, str) else f"video {index + 1}"


def video_clips(videos, frames: int, width: int, height: int) -> list[Clip]:
    """Clips from ComfyUI VIDEO values. A whole video file is decoded as the folder's clips are, frame by frame at
    the training size; a trimmed one or one made of frames (Create Video) as the host gives its frames."""
    clips = []
    for index, video in enumerate(videos):
        source = file_source(video)
        name = video_name(source, index)
        trimmed = hasattr(video, "get_active_trim_window") and video.get_active_trim_window() != (0.0, 0.0)
        if source is not None and not trimmed:
            images = decode_video(source, name, width, height)
        else:
            images = fit(video.get_components().images.float().cpu(), width, height)
        clips.append(long_enough(name, images, frames))
    return clips


def output_path(file_name: str) -> Path:
    if Path(file_name).name != file_name or not file_name.endswith(".safetensors") or file_name == ".safetensors":
        raise ValueError(f"{NODE}: file_name {file_name!r} must be a plain file name ending in .safetensors.")
    folder = Path(folder_paths.get_folder_paths(FOLDER)[0])
    folder.mkdir(parents=True, exist_ok=True)
    return folder / file_name


def default_file_name(motion: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", motion.lower()).strip("_") or "motion"
    return f"miva_wan2.1_t2v_{slug}.safetensors"


# --- the training model and its call -------------------------------------------------------------------------------

def training_model(model, dtype: torch.dtype | None):
    """A patcher over a copy of ``model``'s diffusion model with ordinary (not inference) tensors, frozen; the
    model's object patches, weight patches, options and wrappers carried over. ``model`` itself is untouched."""
    comfy.model_management.unload_all_models()  # so the copy is of the unpatched modules
    base = copy.copy(model.model)
    base._modules, base._parameters, base._buffers = dict(base._modules), dict(base._parameters), dict(base._buffers)
    base.diffusion_model = copy.deepcopy(model.model.diffusion_model)
    base.diffusion_model.requires_grad_(False)
    trainer = comfy.model_patcher.ModelPatcher(base, load_device=model.load_device,
                                               offload_device=model.offload_device)
    trainer.patches = {key: list(value) for key, value in model.patches.items()}
    trainer.object_patches = dict(model.object_patches)
    trainer.model_options = comfy.model_patcher.create_model_options_clone(model.model_options) \
        if hasattr(comfy.model_patcher, "create_model_options_clone") else copy.deepcopy(model.model_options)
    trainer.wrappers = comfy.patcher_extension.copy_nested_dicts(getattr(model, "wrappers", {}))
    if dtype is not None:
        trainer.set_model_compute_dtype(dtype)
    return trainer


def frozen(function):
    """``function`` with its free variables bound to their values now. ComfyUI's Wan block replacement hands over a
    ``block_wrap`` that reads the loop's ``block`` variable when called: recomputed during backward (after the loop
    ended) it would run the last block; the frozen copy runs the block it was made for."""
    if not function.__closure__:
        return function
    cells = tuple(types.CellType(cell.cell_contents) for cell in function.__closure__)
    return types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__,
                              cells)


def checkpointed_block(args, extra):
    return torch.utils.checkpoint.checkpoint(frozen(extra["original_block"]), args, use_reentrant=False)


def model_forward(patched, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, checkpointing: bool):
    """The velocity the patched model predicts for ``x`` at ``sigma``: ComfyUI's apply_model with the patch's
    wrappers (what a sampler's call does), the diffusion model's raw output captured."""
    options = patched.model_options.get("transformer_options", {})
    transformer_options = dict(options)
    transformer_options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patched.wrappers)
    transformer_options["cond_or_uncond"] = [0]
    transformer_options["sigmas"] = sigma
    captured = []

    def capture(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        captured.append(out)
        return out

    diffusion_wrappers = transformer_options["wrappers"].setdefault(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
    diffusion_wrappers.setdefault(CAPTURE_KEY, []).append(capture)
    if checkpointing:
        replace = {key: dict(value) for key, value in options.get("patches_replace", {}).items()}
        dit = replace.setdefault("dit", {})
        for i in range(len(patched.model.diffusion_model.blocks)):
            dit.setdefault(("double_block", i), checkpointed_block)
        transformer_options["patches_replace"] = replace
    patched.model.apply_model(x, sigma, c_crossattn=context, transformer_options=transformer_options)
    return captured[-1]


@contextlib.contextmanager
def training_mode():
    """Autograd on (outside ComfyUI's inference mode) and, on hosts that have it, ComfyUI's training flag (0.33
    then takes RoPE through its differentiable path)."""
    previous = getattr(comfy.model_management, "in_training", None)
    with torch.inference_mode(False), torch.enable_grad():
        if previous is not None:
            comfy.model_management.in_training = True
        try:
            yield
        finally:
            if previous is not None:
                comfy.model_management.in_training = previous


class Trainer:
    """What a step needs from ComfyUI: the training model, the adapter's info, the context."""

    def __init__(self, model, info: AdapterInfo, compute_dtype: torch.dtype, checkpointing: bool):
        self.model = model
        self.info = info
        self.dtype = compute_dtype
        self.checkpointing = checkpointing
        self.device = model.load_device
        self.model_sampling = model.get_model_object("model_sampling")
        text_dim = model.model.diffusion_model.text_embedding[0].in_features
        self.context = torch.zeros(1, 1, text_dim, device=self.device, dtype=compute_dtype)

    def patched(self, params: dict[str, torch.Tensor]):
        """MIVA Apply's model for the adapter over ``params`` (cast to the compute dtype, gradients kept)."""
        tensors = {name: p if p.dtype == self.dtype else p.to(self.dtype) for name, p in params.items()}
        patched = apply_stack(self.model, (StackRow(Adapter.from_tensors("training", self.info, tensors), 1.0, True),))
        comfy.model_management.load_models_gpu([patched])
        return patched

    def step(self, run: Run, cache: LatentCache, schedule: Schedule) -> float:
        patched = self.patched(run.params)

        def forward(x, sigma):
            return model_forward(patched, x.to(self.dtype), sigma, self.context, self.checkpointing).float()

        with held_calls():  # open through backward: the recomputed blocks run the same patched forward
            return run.train_step(cache, schedule, self.model_sampling, forward, self.device)


# --- the node ------------------------------------------------------------------------------------------------------

def train(model, vae, clips: list[Clip], *, motion: str, subject: str, frames: int, width: int, height: int,
          steps: int, learning_rate: float, cfa_rank: int, prompt_rank: int, seed: int, gradient_checkpointing: bool,
          precision: str, checkpoint_interval: int, resume: bool, target: Path, overwrite: bool,
          progress=None) -> tuple[Adapter, list[float]]:
    """Train (or resume) and save; returns the adapter and the losses. Every check comes before the first step."""
    check_model(model)
    check_vae(vae, width, height)
    check_frame_count(frames)
    if not motion.strip() or not subject.strip():
        raise ValueError(f"{NODE}: motion and subject must be given (what the adapter animates, and the word that "
                         "finds the subject, e.g. 'horse running' and 'horse').")
    device = model.load_device
    if precision == "bf16" and device.type == "cpu":
        raise ValueError(f"{NODE}: precision bf16 needs a GPU; this run is on the CPU: use fp32.")
    state_file = state_path(target)
    resuming = resume and state_file.exists()
    if target.exists() and not overwrite and not resuming:
        raise FileExistsError(f"{NODE}: {target.name} already exists in {target.parent}; choose another file_name, "
                              "or switch overwrite on to replace it.")
    diffusion_model = model.get_model_object("diffusion_model")
    info = AdapterInfo(base=base_name(diffusion_model), motion=motion.strip(), subject=subject.strip(),
                       dim=diffusion_model.dim, heads=diffusion_model.num_heads, blocks=len(diffusion_model.blocks),
                       query_rank=cfa_rank, output_rank=cfa_rank, output_bias=False, prompt_rank=prompt_rank,
                       prompt_bias=True, prompt_query_bias=True, mask_stream=False)
    facts = {"clips": str(len(clips)), "resolution": f"{width}x{height}", "frames": str(frames), "seed": str(seed),
             "cfa_rank": str(cfa_rank), "prompt_rank": str(prompt_rank), "base": info.base, "precision": precision,
             "clip_names": ",".join(clip.name for clip in clips)}
    compute_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    in_training = getattr(comfy.model_management, "in_training", None)
    with torch.inference_mode(False), torch.enable_grad():
        try:
            if in_training is not None:
                comfy.model_management.in_training = True  # 0.33: RoPE through its differentiable path
            if resuming:
                run = Run.resume(state_file, learning_rate, device, facts)
            else:
                fresh = initial_tensors(info, diffusion_model, torch.Generator().manual_seed(seed))
                run = Run.start(fresh, learning_rate, seed, device)
            trainer = Trainer(training_model(model, compute_dtype if precision != "fp32" or
                                             model.model.get_dtype() != torch.float32 else None),
                              info, compute_dtype, gradient_checkpointing)
            cache = LatentCache(clips, frames, lambda pixels: vae.encode(pixels[..., :3]))
            schedule = Schedule.of(trainer.model_sampling)
            started = time.monotonic()
            first_step = run.step

            def save(final: bool):
                details = {**facts, "steps": str(run.step), "learning_rate": f"{learning_rate:g}"}
                done = AdapterInfo(**{**vars(info), "details": details})
                save_adapter(target, done, run.tensors())
                run.save_state(state_file, facts)

            try:
                while run.step < steps:
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    loss = trainer.step(run, cache, schedule)
                    if progress is not None:
                        elapsed = time.monotonic() - started
                        left = elapsed / max(run.step - first_step, 1) * (steps - run.step)
                        progress(run.step, steps, loss, left)
                    if checkpoint_interval and run.step % checkpoint_interval == 0 and run.step < steps:
                        save(False)
            except comfy.model_management.InterruptProcessingException:
                save(False)  # resumable from here
                raise
            save(True)
        finally:
            if in_training is not None:
                comfy.model_management.in_training = in_training
    from ..models.miva import load_adapter

    return load_adapter(target), run.losses


def _format_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MIVATrain(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MIVATrain",
            display_name="MIVA Train",
            category=CATEGORY,
            description="Trains a MIVA motion adapter from about ten clips of one motion on Wan 2.1 T2V, as the "
            "paper: frame 0's clean latent is the condition at every step and out of the loss, the model's own "
            "flow-matching loss with the authors' timestep weighting, horizontal flips, only the adapter trains "
            "(AdamW). Saves the adapter to models/miva and a training state beside it to resume from.",
            inputs=[
                io.Model.Input("model", tooltip="Wan 2.1 T2V (1.3B in the paper), from Load Diffusion Model. I2V "
                               "models and other families are refused. Its own sampling (shift) sets the training "
                               "timesteps."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE; each clip window is encoded once and cached."),
                io.Combo.Input("clips", options=folder_paths.get_input_subfolders(),
                               tooltip="A folder in ComfyUI's input directory with the training clips (video files: "
                               "mp4, webm, mov, mkv, ...), about ten of one motion. Each must have at least "
                               "'frames' frames. Not read when clip_videos is connected."),
                io.String.Input("motion", default="", tooltip="What the adapter animates, e.g. 'horse running' "
                                "(saved in the file; MIVA Loader shows it)."),
                io.String.Input("subject", default="", tooltip="The word that finds the moving subject in an image "
                                "(M-MIVA's GroundingDINO prompt), e.g. 'horse'."),
                io.Int.Input("frames", default=17, min=5, max=257, step=4,
                             tooltip="Frames per training window, 4k + 1: 17 frames are 5 latent frames (the "
                             "paper). A random window of each clip is taken at each step."),
                io.Int.Input("width", default=832, min=16, max=4096, step=16,
                             tooltip="Training width in pixels, a multiple of 16; clips are scaled, centre-cropped."),
                io.Int.Input("height", default=480, min=16, max=4096, step=16,
                             tooltip="Training height in pixels, a multiple of 16."),
                io.Int.Input("steps", default=8000, min=1, max=1000000,
                             tooltip="Training steps, batch 1 (the paper: 8000 for Wan)."),
                io.Float.Input("learning_rate", default=1e-5, min=1e-8, max=1e-2, step=1e-6, round=1e-8,
                               tooltip="AdamW's learning rate (the paper: 1e-5)."),
                io.Int.Input("cfa_rank", default=128, min=1, max=4096,
                             tooltip="Rank of the cross-frame attention's query change and output (the paper: 128)."),
                io.Int.Input("prompt_rank", default=128, min=1, max=4096,
                             tooltip="Rank of the implicit prompt, which replaces the text cross-attention: the "
                             "prompt is not used in training (a constant zero context is passed) nor when the "
                             "adapter is applied (the paper: 128)."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=True,
                             tooltip="Seed of the initialisation and of every draw (window, flip, timestep, noise)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute each block in the backward pass: far less memory, about a third "
                                 "more time; the same result."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="fp32",
                               tooltip="fp32, or bf16 for the model's computation (GPU only); the adapter's "
                               "parameters and AdamW stay fp32."),
                io.Int.Input("checkpoint_interval", default=500, min=0, max=1000000,
                             tooltip="Save the adapter and the training state every this many steps (0: only at "
                             "the end and when interrupted)."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from the training state beside file_name, if there is one (made "
                                 "with the same settings); off: start again."),
                io.String.Input("file_name", default="",
                                tooltip="The adapter's file in models/miva; empty: miva_wan2.1_t2v_<motion>."
                                "safetensors. The training state is <name>.state.safetensors beside it."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing adapter of that name. Off: an existing file (without a "
                                 "training state to resume) stops the node before training."),
                ClipVideosType.Input("clip_videos", optional=True,
                                     tooltip="The training clips as videos, from MIVA Clips (e.g. core Load Video "
                                     "(from Folder) or Load Video into it), in place of the clips folder."),
            ],
            outputs=[MivaStackType.Output(display_name="stack", tooltip="The trained adapter as a stack of one, "
                                          "weight 1, for MIVA Apply."),
                     io.Image.Output(display_name="loss_curve", tooltip="The loss per step and its running mean.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, vae, clips, motion, subject, frames, width, height, steps, learning_rate, cfa_rank,
                prompt_rank, seed, gradient_checkpointing, precision, checkpoint_interval, resume, file_name,
                overwrite, clip_videos=None) -> io.NodeOutput:
        cls.check_inputs(frames=frames, width=width, height=height, steps=steps, learning_rate=learning_rate,
                         cfa_rank=cfa_rank, prompt_rank=prompt_rank, seed=seed, precision=precision,
                         gradient_checkpointing=gradient_checkpointing, checkpoint_interval=checkpoint_interval,
                         resume=resume, overwrite=overwrite)
        check_model(model)
        check_vae(vae, width, height)
        check_frame_count(frames)
        target = output_path(file_name.strip() or default_file_name(motion))
        if clip_videos is not None and not isinstance(clip_videos, ClipVideos):
            raise ValueError(f"{NODE}: clip_videos must come from MIVA Clips; it got {type(clip_videos).__name__}.")
        loaded = video_clips(clip_videos.videos, frames, width, height) if clip_videos is not None \
            else read_clips(clips, frames, width, height)
        node_id = getattr(cls.hidden, "unique_id", None) if getattr(cls, "hidden", None) is not None else None
        bar = comfy.utils.ProgressBar(steps)
        server = _prompt_server()
        last_text = [0.0]

        def progress(step, total, loss, left):
            bar.update_absolute(step, total)
            now = time.monotonic()
            if server is not None and node_id is not None and (now - last_text[0] > TEXT_EVERY_S or step == total):
                last_text[0] = now
                server.send_progress_text(f"step {step}/{total}, loss {loss:.4f}, {_format_time(left)} left", node_id)

        adapter, losses = train(model, vae, loaded, motion=motion, subject=subject, frames=frames, width=width,
                                height=height, steps=steps, learning_rate=learning_rate, cfa_rank=cfa_rank,
                                prompt_rank=prompt_rank, seed=seed, gradient_checkpointing=gradient_checkpointing,
                                precision=precision, checkpoint_interval=checkpoint_interval, resume=resume,
                                target=target, overwrite=overwrite, progress=progress)
        curve = loss_curve_image(losses)
        text = f"wrote {target.name}\n" + describe(adapter)
        if losses:
            text += f"\nloss: first {losses[0]:.4f}, last {losses[-1]:.4f}"
        preview = ui.PreviewImage(curve, cls=cls)
        return io.NodeOutput((StackRow(adapter, 1.0, True),), curve,
                             ui={"images": preview.as_dict()["images"], "text": (text,)})


    @classmethod
    def input_problems(cls, values: dict) -> list[str]:
        if "clip_videos" in values:  # connected (a link's value is None here): the folder is not read
            values = {name: value for name, value in values.items() if name != "clips"}
        return super().input_problems(values)


class MIVAClips(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MIVAClips",
            display_name=CLIPS_NODE,
            category=CATEGORY,
            description="Training clips for MIVA Train from videos: the list of core Load Video (from Folder), or one "
            "Load Video. MIVA Train decodes them at its training size, scaled and centre-cropped like its folder's "
            "clips.",
            inputs=[io.Video.Input("videos", tooltip="About ten clips of one motion, each at least MIVA Train's "
                                   "'frames' long: a list of videos (Load Video (from Folder)) or one video.")],
            # a list of VIDEO reaches a node whole only through a list input
            is_input_list=True,
            outputs=[ClipVideosType.Output(display_name="clip_videos", tooltip="For MIVA Train's clip_videos.")],
        )

    @classmethod
    def execute(cls, videos) -> io.NodeOutput:
        for index, video in enumerate(videos):
            if not callable(getattr(video, "get_components", None)):
                raise ValueError(f"{CLIPS_NODE}: videos item {index + 1} is a "
                                 f"{type(video).__name__}, not a VIDEO. Connect a video output such as Load Video's.")
        names = [video_name(file_source(video), index) for index, video in enumerate(videos)]
        text = f"{len(names)} clip{'s' * (len(names) != 1)}: " + ", ".join(names)
        return io.NodeOutput(ClipVideos(tuple(videos)), ui={"text": (text,)})


NODES = (MIVATrain, MIVAClips)


# --- the command ---------------------------------------------------------------------------------------------------

EXAMPLE = """example:
  python -m motion_dials.nodes.miva_train --model wan2.1_t2v_1.3B_fp16.safetensors --vae wan_2.1_vae.safetensors \\
      --clips ~/clips/horse --motion "horse running" --subject horse
  (or python <ComfyUI>/custom_nodes/motion_dials/nodes/miva_train.py --comfyui <ComfyUI> ...)
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m motion_dials.nodes.miva_train", epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="MIVA Train without the graph: loads the base through ComfyUI's loaders (Load Diffusion Model, "
        "Load VAE), trains as the node does and saves the adapter to models/miva.")
    add = parser.add_argument
    add("--comfyui", metavar="PATH", help="ComfyUI's folder (default: COMFYUI_PATH, or ComfyUI already importable)")
    add("--extra-model-paths-config", action="append", default=[], metavar="YAML",
        help="an extra_model_paths.yaml, as ComfyUI's option of that name (repeatable)")
    add("--model", required=True, help="a Wan 2.1 T2V file in models/diffusion_models")
    add("--vae", required=True, help="the Wan 2.1 VAE file in models/vae")
    add("--weight-dtype", default="default", choices=("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"),
        help="Load Diffusion Model's weight_dtype (default: %(default)s)")
    add("--clips", required=True, type=Path, metavar="FOLDER", help="a folder of training clips (video files)")
    add("--motion", required=True, help="what the adapter animates, e.g. 'horse running'")
    add("--subject", required=True, help="the word that finds the moving subject, e.g. 'horse'")
    add("--frames", type=int, default=17, help="frames per training window, 4k + 1 (default: %(default)s)")
    add("--width", type=int, default=832, help="training width, a multiple of 16 (default: %(default)s)")
    add("--height", type=int, default=480, help="training height, a multiple of 16 (default: %(default)s)")
    add("--steps", type=int, default=8000, help="training steps, batch 1 (default: %(default)s)")
    add("--learning-rate", type=float, default=1e-5, help="AdamW's learning rate (default: %(default)g)")
    add("--cfa-rank", type=int, default=128, help="rank of the cross-frame attention (default: %(default)s)")
    add("--prompt-rank", type=int, default=128, help="rank of the implicit prompt (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the initialisation and every draw (default: %(default)s)")
    add("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
        help="keep the activations instead of recomputing them (more memory, faster)")
    add("--precision", choices=PRECISIONS, default="fp32", help="the model's computation (default: %(default)s)")
    add("--checkpoint-interval", type=int, default=500,
        help="save the adapter and training state every this many steps, 0: only at the end (default: %(default)s)")
    add("--no-resume", dest="resume", action="store_false", help="start again even if a training state exists")
    add("--file-name", default="", help="the adapter's file in models/miva (default: miva_wan2.1_t2v_<motion>"
        ".safetensors)")
    add("--overwrite", action="store_true", help="replace an existing adapter of that name")
    return parser.parse_args(argv)


def _model_file(kind: str, name: str, option: str) -> str:
    if name not in folder_paths.get_filename_list(kind):
        folders = ", ".join(folder_paths.get_folder_paths(kind))
        raise ValueError(f"{NODE}: {option} {name!r} is not a file in models/{kind} ({folders}).")
    return name


def _command(args: argparse.Namespace) -> int:
    import importlib.util

    import nodes  # ComfyUI's, with its loaders

    comfyui = Path(folder_paths.__file__).resolve().parent
    # ComfyUI's utils/extra_config.py by path: on some hosts the name 'utils' is comfy.utils by now
    spec = importlib.util.spec_from_file_location("motion_dials_extra_config", comfyui / "utils" / "extra_config.py")
    extra_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extra_config)
    load_extra_path_config = extra_config.load_extra_path_config
    comfyui_config = comfyui / "extra_model_paths.yaml"
    for config in ([comfyui_config] if comfyui_config.is_file() else []) + args.extra_model_paths_config:
        load_extra_path_config(str(config))
    MIVATrain.check_inputs(frames=args.frames, width=args.width, height=args.height, steps=args.steps,
                           learning_rate=args.learning_rate, cfa_rank=args.cfa_rank, prompt_rank=args.prompt_rank,
                           seed=args.seed, precision=args.precision, checkpoint_interval=args.checkpoint_interval)
    check_frame_count(args.frames)
    clip_files(args.clips)  # before loading anything
    target = output_path(args.file_name.strip() or default_file_name(args.motion))
    model = nodes.UNETLoader().load_unet(_model_file("diffusion_models", args.model, "--model"),
                                         args.weight_dtype)[0]
    vae = nodes.VAELoader().load_vae(_model_file("vae", args.vae, "--vae"))[0]
    check_model(model)
    check_vae(vae, args.width, args.height)
    clips = read_clips(args.clips, args.frames, args.width, args.height)
    print(f"{NODE}: {len(clips)} clips from {args.clips}, {args.steps} steps, to {target}", flush=True)

    def progress(step, total, loss, left):
        print(f"step {step}/{total}, loss {loss:.4f}, {_format_time(left)} left", flush=True)

    def interrupt(*_):  # the first Ctrl-C stops after the step and saves the state to resume from
        signal.signal(signal.SIGINT, signal.default_int_handler)
        comfy.model_management.interrupt_current_processing(True)

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        adapter, losses = train(model, vae, clips, motion=args.motion, subject=args.subject, frames=args.frames,
                                width=args.width, height=args.height, steps=args.steps,
                                learning_rate=args.learning_rate, cfa_rank=args.cfa_rank,
                                prompt_rank=args.prompt_rank, seed=args.seed,
                                gradient_checkpointing=args.gradient_checkpointing, precision=args.precision,
                                checkpoint_interval=args.checkpoint_interval, resume=args.resume, target=target,
                                overwrite=args.overwrite, progress=progress)
    except comfy.model_management.InterruptProcessingException:
        print(f"{NODE}: interrupted; the state is saved beside {target}: run the same command again to resume.",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
        comfy.model_management.interrupt_current_processing(False)
    print(describe(adapter))
    if losses:
        print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    print(target)
    return 0


def main(argv=None) -> int:
    """The command: 0 when the adapter is saved; 2, with the node's message, on bad input."""
    args = parse_args(argv)
    try:
        return _command(args)
    except (ValueError, FileExistsError) as error:
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
