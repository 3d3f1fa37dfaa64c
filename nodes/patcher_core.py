"""The one patcher core every Motion Dials feature stands on.

A feature is a ``MotionEffect``; ``apply_effect(model, effect)`` returns a clone
of the ComfyUI model with the effect added. The clone carries one
``MotionDialsPatch`` (its effects, in order) in ``transformer_options`` and, the
first time only, three hooks:

* an ``APPLY_MODEL`` wrapper that opens a ``ForwardState`` for each model call:
  the sigma, the model sampling (so ``percent_to_sigma`` follows whatever
  sampling the graph set), the cond/uncond order of the batch and the latent
  grid;
* a ``dit`` block replacement on every transformer block, which tells the state
  which block runs, hands the block input to the effects that add an output of
  their own, and chains any replacement that was there before;
* one ``optimized_attention_override`` that classifies each attention call,
  lets the effects replace or bias it, and calls any override that was already
  set (for example a Sage-attention node) instead of replacing it.

Effects compose in a defined order: (1) cross-attention replacements, each
seeing the previous one's result; (2) attention-logit biases, all summed into
one block-structured bias; (3) block residuals, added to the block output in
effect order. Nothing here changes the model's weights or the input patcher.

An effect that builds its residual from the base's own self-attention (MIVA's
cross-frame attention) sets ``uses_self_attention``: for the calls it acts in,
the core keeps each block's self-attention input, query projection (through
forward hooks on the query Linear that live only as long as the call), keys and
values, so no effect computes them a second time.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.ldm.hunyuan_video.model
import comfy.ldm.wan.model
import comfy.model_base
import comfy.patcher_extension
import torch

from ..models.attention import QueryGroup, combine_groups, grouped_bias_attention

PATCH_KEY = "motion_dials"
FORWARD_KEY = "motion_dials_forward"


class AttentionKind(enum.Enum):
    VIDEO_SELF = "video self-attention"
    TEXT_CROSS = "text cross-attention"
    IMAGE_CROSS = "image cross-attention"
    JOINT = "joint text+video attention"


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelFamily:
    """How one family of video DiTs lays out its blocks and attention."""

    name: str
    block_lists: tuple[tuple[str, str], ...]  # (attribute of the diffusion model, dit replace key)
    joint_attention: bool  # video and text tokens in one attention, video first
    # The video self-attention's query projection inside a block (a Linear), where the core can see the
    # self-attention input and ``W_q x + b`` without computing them again; None where there is none.
    self_attention_query: str | None = None


WAN = ModelFamily("Wan 2.1/2.2", (("blocks", "double_block"),), joint_attention=False,
                  self_attention_query="self_attn.q")
HUNYUAN_VIDEO_15 = ModelFamily(
    "HunyuanVideo 1.5", (("double_blocks", "double_block"), ("single_blocks", "single_block")), joint_attention=True
)
SUPPORTED_FAMILIES = "Wan 2.1 / 2.2 (T2V, I2V, TI2V 5B) and HunyuanVideo 1.5"


def detect_family(model) -> ModelFamily:
    """The family of a ComfyUI ``ModelPatcher``, or a clear error naming what is supported."""
    base = getattr(model, "model", None)
    diffusion_model = getattr(base, "diffusion_model", None)
    if type(diffusion_model) is comfy.ldm.wan.model.WanModel and isinstance(base, comfy.model_base.WAN21):
        return WAN
    if (type(base) is comfy.model_base.HunyuanVideo15
            and type(diffusion_model) is comfy.ldm.hunyuan_video.model.HunyuanVideo):
        return HUNYUAN_VIDEO_15
    found = type(base).__name__ if base is not None else type(model).__name__
    raise UnsupportedModelError(
        f"Motion Dials cannot patch this model ({found}): it supports {SUPPORTED_FAMILIES} video models. "
        "Connect the MODEL output of a loader for one of those (for example 'Load Diffusion Model' with a Wan "
        "2.2 I2V file); image models and other video families are not supported."
    )


@dataclass(frozen=True)
class TokenLayout:
    """Where the video tokens sit in one attention sequence (frame-major, then height, width)."""

    frames: int
    height: int
    width: int
    video_start: int
    sequence_length: int  # keys
    query_length: int

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_end(self) -> int:
        return self.video_start + self.frames * self.tokens_per_frame


@dataclass
class AttentionContext:
    """All an effect may ask about one attention call."""

    family: ModelFamily
    block_index: int
    block_type: str
    kind: AttentionKind
    layout: TokenLayout
    forward: ForwardState

    @property
    def sigma(self) -> float:
        return self.forward.sigma

    @property
    def cond_or_uncond(self) -> list[int]:
        return self.forward.cond_or_uncond


class MotionEffect:
    """One feature's contribution. Override what applies; the defaults do nothing."""

    def active_in(self, forward: ForwardState) -> bool:
        """Whether the effect acts in this model call (asked once per call, e.g. from its sigma)."""
        return True

    def logit_bias(self, ctx: AttentionContext) -> list[QueryGroup] | None:
        """Query groups with key-bias rows added to this call's logits, or None."""
        return None

    def replace_cross_attention(self, ctx: AttentionContext, q, k, v, heads, previous) -> torch.Tensor | None:
        """For text cross-attention: a replacement for ``previous`` (the output so far), or None."""
        return None

    # True for an effect whose block_residual reads the block's video self-attention tensors
    # (BlockContext.self_attention); the core then keeps them until the block ends.
    uses_self_attention = False

    def block_residual(self, ctx: BlockContext, block_input: torch.Tensor) -> torch.Tensor | None:
        """A tensor added to the block's output (all its tokens), computed from its input, or None."""
        return None

    def observe_attention(self, ctx: AttentionContext, q, k, heads, groups: list[QueryGroup], attention_kwargs):
        """See an attention call with the bias all effects gave it (groups; [one unbiased group] if none)."""


@dataclass
class BlockContext:
    family: ModelFamily
    block_index: int
    block_type: str
    forward: ForwardState
    block_args: dict  # what the block was called with (Wan: img, txt, vec, pe, transformer_options)
    self_attention: SelfAttentionTensors | None


@dataclass
class SelfAttentionTensors:
    """What the base computed in one block's video self-attention, [B, N, d] each, for effects that reuse it."""

    input: torch.Tensor | None = None  # the self-attention's input (Wan: the modulated norm1 of the block input)
    query_projection: torch.Tensor | None = None  # W_q input + b_q, before the query norm and RoPE
    keys: torch.Tensor | None = None  # as attention sees them (normalised, rotated)
    values: torch.Tensor | None = None
    layout: TokenLayout | None = None


def sigma_before(sigma, threshold: float):
    """Whether ``sigma`` (a number or a tensor of them) comes before ``threshold`` in denoising. A relative
    tolerance: the step that lands on the threshold belongs to the later part."""
    return sigma > threshold * (1.0 + 1e-5) + 1e-7


@dataclass
class ForwardState:
    """Per model call: what the attention calls cannot see for themselves."""

    family: ModelFamily
    patch_size: tuple[int, int, int]
    sigma: float
    device: torch.device
    model_sampling: object
    cond_or_uncond: list[int]
    latent_grid: tuple[int, int, int]  # latent frames, height, width before patching
    image_context_tokens: int | None = None  # CLIP-vision tokens of a Wan 2.1 I2V call
    sigmas: torch.Tensor | None = None  # one per batch entry
    diffusion_model: torch.nn.Module | None = None
    block_index: int | None = None
    block_type: str = ""
    attention_calls_in_block: int = 0
    block_tokens: int = 0
    joint_video_start: int = 0
    effects: tuple[MotionEffect, ...] = ()  # those active in this call, in order
    observers: tuple[MotionEffect, ...] = ()
    keep_self_attention: bool = False
    self_attention: SelfAttentionTensors | None = None  # of the running block, when kept
    memo: dict = field(default_factory=dict)  # what an effect computes once per model call (keyed by the effect)
    _percent_sigmas: dict = field(default_factory=dict)

    def activate(self, patch: MotionDialsPatch) -> bool:
        """Keep the patch's effects that act in this call; False if none does."""
        self.effects = tuple(effect for effect in patch.effects if effect.active_in(self))
        self.observers = tuple(effect for effect in self.effects if effect in patch.observers)
        self.keep_self_attention = any(effect.uses_self_attention for effect in self.effects)
        return bool(self.effects)

    def before_percent(self, percent: float) -> bool:
        """True while denoising is in its first ``percent`` (sigma above ``percent_to_sigma(percent)``)."""
        threshold = self._percent_sigmas.get(percent)
        if threshold is None:
            threshold = self._percent_sigmas[percent] = float(self.model_sampling.percent_to_sigma(percent))
        return sigma_before(self.sigma, threshold)

    def token_grid(self) -> tuple[int, int, int]:
        pt, ph, pw = self.patch_size
        frames, height, width = self.latent_grid
        return -(-frames // pt), -(-height // ph), -(-width // pw)

    def classify(self, q: torch.Tensor, k: torch.Tensor, skip_reshape: bool) -> AttentionContext | None:
        """Name the attention call inside the current block, or None for calls we leave alone."""
        if self.block_index is None:
            return None
        seq_axis = 2 if skip_reshape else 1
        q_len, k_len = q.shape[seq_axis], k.shape[seq_axis]
        call_index = self.attention_calls_in_block
        self.attention_calls_in_block += 1
        frames, height, width = self.token_grid()
        video_tokens = frames * height * width

        if self.family.joint_attention:
            if q_len != k_len or q_len < video_tokens:
                return None
            if self.block_type == "double_block":
                # [prefix (e.g. a reference latent) ; video] from the block's image stream, then text.
                self.joint_video_start = self.block_tokens - video_tokens
            kind, video_start = AttentionKind.JOINT, self.joint_video_start
        else:
            # A Wan block attends in a fixed order: video self-attention, image (if any), then text.
            video_start = self.block_tokens - video_tokens
            if call_index == 0 and q_len == k_len == self.block_tokens:
                kind = AttentionKind.VIDEO_SELF
            elif call_index == 1 and self.image_context_tokens is not None and k_len == self.image_context_tokens:
                kind = AttentionKind.IMAGE_CROSS
            else:
                kind = AttentionKind.TEXT_CROSS
        if video_start < 0:
            return None
        layout = TokenLayout(frames, height, width, video_start, k_len, q_len)
        return AttentionContext(self.family, self.block_index, self.block_type, kind, layout, self)



class MotionDialsPatch:
    """The effects on one patched model. Immutable: adding an effect makes a new patch."""

    def __init__(self, family: ModelFamily, patch_size: tuple[int, int, int], effects: tuple[MotionEffect, ...],
                 previous_override: Callable | None):
        self.family = family
        self.patch_size = patch_size
        self.effects = effects
        self.previous_override = previous_override
        # Only effects that override observe_attention are called for it: the hot path stays short.
        self.observers = tuple(e for e in effects if type(e).observe_attention is not MotionEffect.observe_attention)

    def with_effect(self, effect: MotionEffect) -> MotionDialsPatch:
        return MotionDialsPatch(self.family, self.patch_size, self.effects + (effect,), self.previous_override)

    def __deepcopy__(self, memo):
        # ModelPatcher.clone deep-copies model_options; the patch is immutable, so share it.
        return self

    def attend(self, func: Callable) -> Callable:
        """The attention function the effects call: the earlier override if any, else ComfyUI's own."""
        if self.previous_override is None:
            return func
        return functools.partial(self.previous_override, func)


def _apply_model_wrapper(executor, *args, **kwargs):
    """Open a ForwardState for one model call (APPLY_MODEL wrapper)."""
    x, sigma = args[0], args[1]
    transformer_options = args[5] if len(args) > 5 else kwargs["transformer_options"]
    patch: MotionDialsPatch | None = transformer_options.get(PATCH_KEY)
    if patch is None:
        return executor(*args, **kwargs)
    base_model = executor.class_obj
    clip_fea = kwargs.get("clip_fea")
    state = ForwardState(
        family=patch.family,
        patch_size=patch.patch_size,
        sigma=float(sigma.flatten()[0]),
        sigmas=sigma.flatten(),
        device=x.device,
        model_sampling=base_model.model_sampling,
        diffusion_model=base_model.diffusion_model,
        cond_or_uncond=list(transformer_options.get("cond_or_uncond", [])),
        latent_grid=tuple(x.shape[-3:]),
        image_context_tokens=clip_fea.shape[-2] if clip_fea is not None else None,
    )
    if not state.activate(patch):  # e.g. every step past tau: the hooks then pass straight through
        return executor(*args, **kwargs)
    transformer_options[FORWARD_KEY] = state
    hooks = _watch_self_attention_queries(state) if state.keep_self_attention else ()
    try:
        return executor(*args, **kwargs)
    finally:
        transformer_options.pop(FORWARD_KEY, None)
        for hook in hooks:
            hook.remove()


def _watch_self_attention_queries(state: ForwardState) -> list:
    """Forward hooks, for this model call only, that keep each block's self-attention input and query projection.

    The modules are shared by every clone of the model, so the hooks live exactly as long as the call.
    """
    path = state.family.self_attention_query
    if path is None:
        return []

    def keep(module, inputs, output):
        if state.self_attention is not None:
            state.self_attention.input, state.self_attention.query_projection = inputs[0], output

    hooks = []
    for attribute, _ in state.family.block_lists:
        for block in getattr(state.diffusion_model, attribute):
            hooks.append(block.get_submodule(path).register_forward_hook(keep))
    return hooks


def _make_block_replace(block_index: int, block_type: str, previous: Callable | None) -> Callable:
    def block_replace(args, extra):
        transformer_options = args["transformer_options"]
        state: ForwardState | None = transformer_options.get(FORWARD_KEY)
        run_block = extra["original_block"]
        if previous is not None:
            original = run_block
            run_block = lambda block_args: previous(block_args, {"original_block": original})  # noqa: E731
        if state is None:
            return run_block(args)

        state.block_index, state.block_type = block_index, block_type
        state.attention_calls_in_block, state.block_tokens = 0, args["img"].shape[1]
        if state.keep_self_attention:
            state.self_attention = SelfAttentionTensors()
        try:
            out = run_block(args)
            block_ctx = BlockContext(state.family, block_index, block_type, state, args, state.self_attention)
            for effect in state.effects:
                residual = effect.block_residual(block_ctx, args["img"])
                if residual is not None:
                    out["img"] = out["img"] + residual
            return out
        finally:
            state.block_index = None
            state.self_attention = None

    return block_replace


def _attention_override(func, *args, **kwargs):
    transformer_options = kwargs.get("transformer_options") or {}
    patch: MotionDialsPatch | None = transformer_options.get(PATCH_KEY)
    if patch is None:
        return func(*args, **kwargs)
    attend = patch.attend(func)
    state: ForwardState | None = transformer_options.get(FORWARD_KEY)
    if state is None:
        return attend(*args, **kwargs)

    q, k, v = args[:3]
    heads = args[3] if len(args) > 3 else kwargs.pop("heads")
    ctx = state.classify(q, k, kwargs.get("skip_reshape", False))
    if ctx is None:
        return attend(q, k, v, heads, *args[4:], **kwargs)
    if ctx.kind is AttentionKind.VIDEO_SELF and state.self_attention is not None:
        kept = state.self_attention
        kept.keys, kept.values, kept.layout = k, v, ctx.layout

    if ctx.kind is AttentionKind.TEXT_CROSS:
        replaced = None
        for effect in state.effects:
            result = effect.replace_cross_attention(ctx, q, k, v, heads, replaced)
            replaced = result if result is not None else replaced
        if replaced is not None:
            return replaced

    groups = None
    for effect in state.effects:
        effect_groups = effect.logit_bias(ctx)
        if effect_groups is not None:
            groups = effect_groups if groups is None else combine_groups(groups, effect_groups)
    for effect in state.observers:
        effect.observe_attention(ctx, q, k, heads, groups or [QueryGroup(0, ctx.layout.query_length)], kwargs)
    if groups is None:
        return attend(q, k, v, heads, *args[4:], **kwargs)
    return grouped_bias_attention(attend, q, k, v, heads, groups, **kwargs)


def apply_effect(model, effect: MotionEffect):
    """A clone of ``model`` with ``effect`` added; the input model is never changed.

    Raises ``UnsupportedModelError`` (nothing patched) for a model outside the supported families.
    """
    family = detect_family(model)
    patched = model.clone()
    transformer_options = patched.model_options.setdefault("transformer_options", {})
    existing: MotionDialsPatch | None = transformer_options.get(PATCH_KEY)
    if existing is not None:
        transformer_options[PATCH_KEY] = existing.with_effect(effect)
        return patched

    diffusion_model = patched.get_model_object("diffusion_model")
    patch_size = tuple(diffusion_model.patch_size)
    transformer_options[PATCH_KEY] = MotionDialsPatch(
        family, patch_size, (effect,), transformer_options.get("optimized_attention_override")
    )
    transformer_options["optimized_attention_override"] = _attention_override
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PATCH_KEY, _apply_model_wrapper)
    existing_replaces = transformer_options.get("patches_replace", {}).get("dit", {})
    for attribute, block_type in family.block_lists:
        for index in range(len(getattr(diffusion_model, attribute, ()))):
            previous = existing_replaces.get((block_type, index))
            patched.set_model_patch_replace(_make_block_replace(index, block_type, previous), "dit", block_type, index)
    return patched


def effects_of(model) -> tuple[MotionEffect, ...]:
    """The Motion Dials effects a model carries, in order (empty for an unpatched model)."""
    patch = model.model_options.get("transformer_options", {}).get(PATCH_KEY)
    return patch.effects if patch is not None else ()
