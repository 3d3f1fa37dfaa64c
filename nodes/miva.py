"""MIVA motion adapters: load, stack with weights, apply to a Wan model through the patcher core (the MIVA paper).

Adapters live in ComfyUI's ``models/miva/`` folder (``extra_model_paths.yaml`` may add others under the
key ``miva``). A stack is an ordered tuple of rows (adapter, weight, on/off); the order is the one M-MIVA's
masks will follow. MIVA Apply turns the enabled, non-zero rows into one effect on a clone of the model,
wired into each Wan block as the authors' code does (``models/miva.py``): the cross-frame attention on the
stream after the self-attention, its output joining the stream before the cross-attention; the implicit
prompt in place of the whole cross-attention module. Per block, the keys and values (the block's own k, v and
norm_k on that stream), their frame gathering and the block's query projection are computed once for every
adapter of the stack, as is the implicit prompts' frozen query.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import comfy.utils
import folder_paths
import torch
from comfy.ldm.wan.model import sinusoidal_embedding_1d
from comfy_api.latest import io, ui

from ..models.mask_attention import BACKGROUND, region_groups, region_map, score_groups
from ..models.miva import (
    Adapter,
    AdapterInfo,
    BlockAdapter,
    CrossFrameBias,
    ReferenceFrames,
    convert_authors_layout,
    cross_frame_attention,
    cross_frame_bias,
    describe_ranks,
    implicit_prompt,
    load_adapter,
    read_adapter_info,
    read_training_output,
    save_adapter,
)
from .families import WAN
from .input_checks import MotionDialsNode
from .model_files import file_stamp, is_plain_name, register_model_folder, searched_folders
from .patcher_core import (
    AttentionContext,
    AttentionKind,
    BlockContext,
    MotionEffect,
    TokenLayout,
    apply_effect,
    detect_family,
)

CATEGORY = "Motion Dials/MIVA"
FOLDER = "miva"
ADAPTER_SUFFIX = ".safetensors"
TRAINING_OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth")
NO_ADAPTER = "None"
STACK_ROWS = 8  # per Stack node; chain Stack nodes for more
WEIGHT_RANGE = dict(default=1.0, min=-2.0, max=2.0, step=0.05, round=0.001)
WEIGHT_TOOLTIP = ("How strongly this adapter acts, from -2 to 2; 0 turns it off. The paper used 0.5 each for two "
                  "adapters; a total near 1 is the most stable.")

MivaStackType = io.Custom("MIVA_STACK")


register_model_folder(FOLDER, TRAINING_OUTPUT_SUFFIXES)


def adapter_files() -> list[str]:
    return [name for name in folder_paths.get_filename_list(FOLDER) if name.endswith(ADAPTER_SUFFIX)]


def resolve_model_file(name: str) -> str:
    """The path of a file of ``models/miva`` by its listed name; a clear error for anything else."""
    if not is_plain_name(name):
        raise ValueError(
            f"MIVA file name {name!r} is not a plain name inside models/{FOLDER}/; pick one from the list."
        )
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise FileNotFoundError(
            f"MIVA adapter {name!r} was not found in {searched_folders(FOLDER)}. Put the file there (or add a 'miva' "
            "entry to extra_model_paths.yaml) and refresh the page."
        )
    return path


@functools.lru_cache(maxsize=16)
def _load_cached(stamp: tuple, name: str) -> Adapter:
    return load_adapter(stamp[0], name)


def load_named_adapter(name: str) -> Adapter:
    return _load_cached(file_stamp(resolve_model_file(name)), name)


@dataclass(frozen=True)
class StackRow:
    adapter: Adapter
    weight: float
    enabled: bool
    # The subject's mask in the start image, [H, W] in [0, 1] (M-MIVA), or None for a plain adapter.
    mask: torch.Tensor | None = field(default=None, compare=False)

    @property
    def acts(self) -> bool:
        return self.enabled and self.weight != 0.0


def first_mask(mask: torch.Tensor) -> torch.Tensor:
    """The start image's mask, [H, W] in [0, 1], from a ComfyUI MASK ([B, H, W] or [H, W]; the first is used)."""
    if mask.ndim not in (2, 3) or mask.shape[-1] < 1 or mask.shape[-2] < 1:
        raise ValueError(f"The subject mask must be a MASK of shape [batch, height, width]; got {list(mask.shape)}.")
    mask = mask if mask.ndim == 2 else mask[0]
    return mask.float().clamp(0.0, 1.0).cpu()


def describe(adapter: Adapter) -> str:
    info = adapter.info
    parts = [f"motion: {info.motion}", f"subject: {info.subject}", f"base: {info.base}", describe_ranks(info)]
    if info.mask_stream:
        parts.append("mask stream (M-MIVA)")
    if info.details:
        parts.append("trained: " + ", ".join(f"{key} {value}" for key, value in sorted(info.details.items())))
    return f"{adapter.name}\n" + "\n".join(parts)


def check_fits(name: str, info: AdapterInfo, model) -> None:
    """Raise a clear error unless the adapter ``name`` was made for this model's family and sizes."""
    family = detect_family(model)
    diffusion_model = model.get_model_object("diffusion_model")
    if family is not WAN or not info.family.startswith("wan"):
        raise ValueError(f"MIVA adapter {name} ({info.base}) needs a Wan model; this model is {family.name}. "
                         "MIVA adapters are trained on Wan 2.1 T2V: load one with 'Load Diffusion Model'.")
    found = (diffusion_model.dim, diffusion_model.num_heads, len(diffusion_model.blocks))
    expected = (info.dim, info.heads, info.blocks)
    if found != expected:
        raise ValueError(
            f"MIVA adapter {name} was made for {info.base} (width {info.dim}, {info.heads} heads, "
            f"{info.blocks} blocks), but this model has width {found[0]}, {found[1]} heads, {found[2]} blocks. "
            f"Load the {info.base} model, or an adapter made for this one."
        )


def token_scores(mask: torch.Tensor, height: int, width: int, device) -> torch.Tensor:
    """A subject mask [H, W] as scores on a frame's token grid, [height * width]: centre-cropped to the grid's
    aspect like the start image (MIVA Image To Video Latent), then resized bilinearly (the MIVA paper)."""
    resized = comfy.utils.common_upscale(mask[None, None].float(), width, height, "bilinear", "center")
    return resized.flatten().clamp(0.0, 1.0).to(device)


@dataclass
class MaskPlan:
    """The subject-mask biases of one token grid, as query groups: computed once, used by every step and block."""

    self_attention: list  # over the F * T video tokens, queries and keys
    cross_frame: list[CrossFrameBias]  # per row
    prompt_gates: list[torch.Tensor]  # per row, [F * T]: what its implicit prompt's output is multiplied by


def plan_masks(rows: tuple[StackRow, ...], layout: TokenLayout, device) -> MaskPlan:
    """Every frame takes frame 0's mask. One masked adapter alone biases the self-attention with its own soft
    scores; with several adapters the self-attention follows the region map. Each adapter's mask also biases its
    cross-frame attention and multiplies its implicit prompt's output (the authors' code); an adapter without a
    mask takes the background as its mask in both."""
    scores = [None if row.mask is None else token_scores(row.mask, layout.height, layout.width, device)
              for row in rows]
    if len(rows) == 1:
        (frame,) = scores
        video = frame.repeat(layout.frames)
        return MaskPlan(score_groups(video, video), [cross_frame_bias(frame, layout.frames)], [video])
    labels = region_map(torch.stack([s for s in scores if s is not None]))
    background = (labels == BACKGROUND).float()
    video_labels = labels.repeat(layout.frames)
    frames = [background if frame is None else frame for frame in scores]
    return MaskPlan(region_groups(video_labels, video_labels),
                    [cross_frame_bias(frame, layout.frames) for frame in frames],
                    [frame.repeat(layout.frames) for frame in frames])


class MivaEffect(MotionEffect):
    """The enabled, non-zero rows of a stack: cross-frame attention residuals and implicit-prompt MLPs, and with
    subject masks (M-MIVA) their attention biases."""

    def __init__(self, rows: tuple[StackRow, ...]):
        self.rows = rows
        self.prompt_rows = tuple(i for i, row in enumerate(rows) if row.adapter.info.prompt_rank)
        self.replaces_cross_attention = bool(self.prompt_rows)
        self.masked = any(row.mask is not None for row in rows)
        self._blocks_on: dict = {}
        self._mask_plans: dict = {}

    def _mask_plan(self, layout: TokenLayout, device) -> MaskPlan | None:
        if not self.masked or not layout.video_only:
            return None
        key = (layout.frames, layout.height, layout.width, device)
        plan = self._mask_plans.get(key)
        if plan is None:
            plan = self._mask_plans[key] = plan_masks(self.rows, layout, device)
        return plan

    def logit_bias(self, ctx: AttentionContext):
        if ctx.kind is not AttentionKind.VIDEO_SELF:
            return None
        plan = self._mask_plan(ctx.layout, ctx.forward.device)
        return None if plan is None else plan.self_attention

    def _block_weights(self, block_index: int, like: torch.Tensor) -> list[BlockAdapter]:
        key = (block_index, like.device, like.dtype)
        weights = self._blocks_on.get(key)
        if weights is None:
            weights = [row.adapter.blocks[block_index].to(like.device, like.dtype) for row in self.rows]
            self._blocks_on[key] = weights
        return weights

    def _time_embedding(self, ctx: BlockContext, dtype: torch.dtype) -> torch.Tensor:
        """The base's time embedding t_emb for this model call, [B, d], computed once per call."""
        forward = ctx.forward
        key = (self, dtype)
        if key not in forward.memo:
            diffusion_model = forward.diffusion_model
            timesteps = forward.model_sampling.timestep(forward.sigmas).float()
            sinusoid = sinusoidal_embedding_1d(diffusion_model.freq_dim, timesteps).to(dtype=dtype)
            forward.memo[key] = diffusion_model.time_embedding(sinusoid)
        return forward.memo[key]

    def residual_before_cross_attention(self, ctx: BlockContext, video: torch.Tensor):
        layout = ctx.layout
        attention = ctx.module.self_attn
        weights = self._block_weights(ctx.block_index, video)
        # Shared by every adapter: the block's own keys, values and query projection on this stream.
        frames = ReferenceFrames.gather(attention.norm_k(attention.k(video)), attention.v(video), layout.frames,
                                        attention.num_heads)
        base_query = None if all(w.cfa.replaces_query for w in weights) else attention.q(video)
        time_embedding = self._time_embedding(ctx, video.dtype)
        plan = self._mask_plan(layout, video.device)
        residual = None
        for i, (row, block) in enumerate(zip(self.rows, weights, strict=True)):
            mask_bias = None if plan is None else plan.cross_frame[i]
            part = cross_frame_attention(video, base_query, frames, time_embedding, block.cfa, mask_bias)
            # part is a fresh tensor of this loop, so weighting and summing in place is safe.
            residual = part.mul_(row.weight) if residual is None else residual.add_(part, alpha=row.weight)
        return residual

    def replace_cross_attention(self, ctx: BlockContext, normed_stream: torch.Tensor, module: torch.nn.Module):
        if not self.prompt_rows:
            return None
        weights = self._block_weights(ctx.block_index, normed_stream)
        plan = self._mask_plan(ctx.layout, normed_stream.device) if self.masked else None
        result = None
        for query_bias in sorted({self.rows[i].adapter.info.prompt_query_bias for i in self.prompt_rows}):
            # The frozen query every implicit prompt of the stack shares: the base cross-attention's own.
            projected = module.q(normed_stream)
            if not query_bias:
                projected = projected - module.q.bias.to(projected)
            query = module.norm_q(projected)
            for i in self.prompt_rows:
                if self.rows[i].adapter.info.prompt_query_bias == query_bias:
                    part = implicit_prompt(query, weights[i].prompt) * self.rows[i].weight
                    if plan is not None:
                        part.mul_(plan.prompt_gates[i].to(part.dtype)[:, None])  # part is this loop's own
                    result = part if result is None else result + part
        return result


def apply_stack(model, stack: tuple[StackRow, ...]):
    """A clone of ``model`` with the stack's acting rows; the model itself when none acts."""
    rows = tuple(row for row in stack if row.acts)
    for row in rows:
        check_fits(row.adapter.name, row.adapter.info, model)
    if not rows:
        return model
    return apply_effect(model, MivaEffect(rows))


def _stack_input():
    return MivaStackType.Input(
        "stack", optional=True,
        tooltip="Another MIVA stack: its adapters come first, then this node's. Chain nodes for more adapters.",
    )


class MIVALoader(MotionDialsNode):
    model_file_inputs = {"adapter_name": FOLDER}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MIVALoader",
            display_name="MIVA Loader",
            category=CATEGORY,
            description="Loads one MIVA motion adapter from models/miva, checks it and shows what it animates. "
            "Its output is a stack of one, which MIVA Apply or another stack takes.",
            inputs=[
                io.Combo.Input("adapter_name", options=adapter_files(),
                               tooltip="A Motion Dials MIVA adapter (.safetensors) in ComfyUI/models/miva/. Files "
                               "from the authors' training code need MIVA Convert first."),
                io.Float.Input("weight", **WEIGHT_RANGE, tooltip=WEIGHT_TOOLTIP),
                _stack_input(),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: the model the adapter will meet. When connected, the loader "
                               "checks family, width, heads and block count right here."),
                io.Mask.Input("subject_mask", optional=True,
                              tooltip="Optional (M-MIVA): the moving subject's mask in the start image, e.g. from "
                              "Subject Mask. Attention then keeps the subject and its surroundings apart, so the "
                              "adapter's motion stays on the subject. Frame 0's mask is used for every frame. "
                              "Where masks of a stack overlap, the later adapter's subject wins; an adapter without "
                              "a mask in a masked stack moves the background."),
            ],
            outputs=[MivaStackType.Output(display_name="stack", tooltip="The adapters so far, in order.")],
        )

    @classmethod
    def execute(cls, adapter_name, weight, stack=None, model=None, subject_mask=None) -> io.NodeOutput:
        cls.check_inputs(adapter_name=adapter_name, weight=weight)
        if model is not None:  # before the adapter's tensors are read
            check_fits(adapter_name, read_adapter_info(resolve_model_file(adapter_name), adapter_name), model)
        adapter = load_named_adapter(adapter_name)
        mask = None if subject_mask is None else first_mask(subject_mask)
        rows = tuple(stack or ()) + (StackRow(adapter, weight, True, mask),)
        text = describe(adapter)
        if mask is not None:
            text += f"\nsubject mask {mask.shape[1]} x {mask.shape[0]}, covering {float(mask.mean()):.0%} of the image"
        return io.NodeOutput(rows, ui=ui.PreviewText(text))


class MIVAStack(MotionDialsNode):
    model_file_inputs = {f"adapter_{i}": FOLDER for i in range(1, STACK_ROWS + 1)}

    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = [_stack_input()]
        for i in range(1, STACK_ROWS + 1):
            inputs += [
                io.Combo.Input(f"adapter_{i}", options=[NO_ADAPTER] + adapter_files(), default=NO_ADAPTER,
                               optional=True, tooltip=f"Row {i}: an adapter from models/miva, or None."),
                io.Float.Input(f"weight_{i}", **WEIGHT_RANGE, optional=True, tooltip=f"Row {i}: " + WEIGHT_TOOLTIP),
                io.Boolean.Input(f"enabled_{i}", default=True, optional=True,
                                 tooltip=f"Row {i}: on or off, without losing its adapter and weight."),
            ]
        return io.Schema(
            node_id="MIVAStack",
            display_name="MIVA Stack",
            category=CATEGORY,
            description="Several MIVA motion adapters with their weights, in order (the order decides which "
            "subject wins where masks overlap). In the web UI rows are added, removed, moved and switched on the "
            f"node; through the API, set adapter_<i>, weight_<i> and enabled_<i> for i = 1 to {STACK_ROWS}.",
            inputs=inputs,
            outputs=[MivaStackType.Output(display_name="stack", tooltip="The adapters, in order.")],
        )

    @classmethod
    def execute(cls, stack=None, **rows) -> io.NodeOutput:
        cls.check_inputs(**rows)
        result = list(stack or ())
        for i in range(1, STACK_ROWS + 1):
            name = rows.get(f"adapter_{i}", NO_ADAPTER)
            if name in (None, NO_ADAPTER):
                continue
            result.append(StackRow(load_named_adapter(name), float(rows.get(f"weight_{i}", 1.0)),
                                   bool(rows.get(f"enabled_{i}", True))))
        return io.NodeOutput(tuple(result), ui=ui.PreviewText("\n\n".join(
            ("" if row.enabled else "[off] ") + f"{row.weight:+.2f} " + describe(row.adapter) for row in result)))


class MIVAApply(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MIVAApply",
            display_name="MIVA Apply",
            category=CATEGORY,
            description="Patches a Wan model with a stack of MIVA motion adapters: a cross-frame attention beside "
            "every self-attention and, for adapters that have one, an implicit-prompt MLP in place of the text "
            "cross-attention (the prompt is then not used). Combine with DyMoS and EDG freely.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan model of the size the adapters were made for (Wan 2.1 T2V "
                               "1.3B for the paper's adapters)."),
                MivaStackType.Input("stack", tooltip="From MIVA Loader or MIVA Stack."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the adapters; the input model is left as it was.")],
        )

    @classmethod
    def execute(cls, model, stack) -> io.NodeOutput:
        return io.NodeOutput(apply_stack(model, tuple(stack)))


class MIVAConvert(MotionDialsNode):
    model_file_inputs = {"training_output": FOLDER}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MIVAConvert",
            display_name="MIVA Convert",
            category=CATEGORY,
            description="Converts an adapter saved by the MIVA authors' training code (.pt or .safetensors, in "
            "models/miva) into the Motion Dials format, next to it. A .pt file is read as tensors only; one that "
            "holds code is refused.",
            inputs=[
                io.Combo.Input("training_output", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="The authors' training output, placed in ComfyUI/models/miva/."),
                io.String.Input("motion", default="", tooltip="What the adapter animates, e.g. 'horse running'."),
                io.String.Input("subject", default="", tooltip="The word that finds the moving subject in the "
                                "image (for M-MIVA's GroundingDINO), e.g. 'horse'."),
                io.String.Input("base", default="wan2.1-t2v-1.3b",
                                tooltip="The model the adapter was trained on, <family>-<kind>-<size>."),
                io.Int.Input("heads", default=12, min=1, max=128,
                             tooltip="That model's attention heads: 12 for Wan 2.1 1.3B, 40 for 14B."),
                io.Float.Input("lora_alpha", default=0.0, min=0.0, max=4096.0, step=1.0, optional=True,
                               tooltip="For a LoRA-factored training output: the lora_alpha of its training config "
                               "(the file does not hold it; PEFT scales by alpha / rank). 0: the rank, a scale of 1. "
                               "Ignored for full matrices."),
                io.String.Input("file_name", default="",
                                tooltip="Name of the converted file; empty: the source's name with .safetensors."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Replace an existing adapter of that name. Off: an existing file is kept and "
                                 "the node stops with an error."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, training_output, motion, subject, base, heads, file_name, overwrite=False,
                lora_alpha=0.0) -> io.NodeOutput:
        cls.check_inputs(training_output=training_output, heads=heads, overwrite=overwrite, lora_alpha=lora_alpha)
        if not motion.strip() or not subject.strip():
            raise ValueError("MIVA Convert needs the adapter's motion and subject: the training output does not say.")
        source = Path(resolve_model_file(training_output))
        target_name = file_name.strip() or source.stem + "_motion_dials" + ADAPTER_SUFFIX
        if not target_name.endswith(ADAPTER_SUFFIX):
            target_name += ADAPTER_SUFFIX
        if Path(target_name).name != target_name:
            raise ValueError(f"file_name {target_name!r} must be a plain file name.")
        target = source.parent / target_name
        if target == source:
            raise ValueError("MIVA Convert: file_name would overwrite the training output; choose another name.")
        if target.exists() and not overwrite:
            raise FileExistsError(f"MIVA Convert: {target_name} already exists in {target.parent}; choose another "
                                  "file_name, or switch overwrite on to replace it.")
        state = read_training_output(source)
        info, tensors = convert_authors_layout(state, base=base.strip(), motion=motion.strip(),
                                               subject=subject.strip(), heads=heads, lora_alpha=lora_alpha or None,
                                               source=source.name)
        save_adapter(target, info, tensors)
        return io.NodeOutput(ui=ui.PreviewText(f"wrote {target_name}\n" + describe(load_adapter(target))))


NODES = (MIVALoader, MIVAStack, MIVAApply, MIVAConvert)
