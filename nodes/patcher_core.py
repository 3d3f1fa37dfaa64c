"""The one patcher core every Motion Dials feature stands on.

A feature is a ``MotionEffect``; ``apply_effect(model, effect)`` returns a clone
of the ComfyUI model with the effect added. The clone carries one
``MotionDialsPatch`` (its effects, in order) in ``transformer_options``, one
``APPLY_MODEL`` wrapper and one ``optimized_attention_override``:

* the wrapper opens a ``ForwardState`` for each model call (the sigma, the model
  sampling, so ``percent_to_sigma`` follows whatever sampling the graph set, the
  cond/uncond order of the batch, the latent grid) and asks each effect whether
  it acts in this call. Only when one does, it puts forward hooks on the model's
  blocks, for this call only: they tell the state which block runs, ask the
  model's family (``nodes/families``) where the video tokens sit in it, and add
  the effects' block residuals to the block's output. The hooks need no block
  replacement from the host, so every family is tracked the same way, and other
  packs' block replacements stay as they are;
* the override classifies each attention call through the family, lets the
  effects replace or bias it, and calls any override that was set before
  (for example a Sage-attention node) instead of replacing it. An override that
  a node placed *after* ours (ComfyUI's ``ModelAttentionBackend`` sets the slot
  outright) is found at the start of each model call and chained in the same way.

Effects compose in a defined order: (1) cross-attention replacements, each
seeing the previous one's result; (2) attention-logit biases, all summed into
one block-structured bias; (3) block residuals, added to the block output in
effect order. Nothing here changes the model's weights or the input patcher.

An effect that acts between a block's self-attention and its cross-attention (MIVA's cross-frame attention)
gives ``residual_before_cross_attention``: for the calls it acts in, a forward pre-hook on the module the family
names (Wan: ``norm3``, whose input is that stream) adds it to the stream the cross-attention and the feed-forward
see, and a forward hook adds it to the cross-attention's output, so that it stays in the residual stream: exact
by construction on the host's own block. An effect that replaces the whole cross-attention module (MIVA's
implicit prompt) sets ``replaces_cross_attention``: the clone then carries an object patch of that module in each
block (ComfyUI restores the original when another clone runs), which asks the effects for its output and runs
the original where none replaces it.

``held_calls()`` keeps a model call's hooks until the context ends, for training with gradient checkpointing:
the blocks recomputed during ``backward()`` then run the same patched forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.patcher_extension
import torch

from ..models.attention import QueryGroup, combine_groups, grouped_bias_attention
from .families import (
    AttentionKind,
    BlockRun,
    LayoutError,
    ModelFamily,
    TokenLayout,
    UnsupportedModelError,
    detect_family,
)

PATCH_KEY = "motion_dials"
FORWARD_KEY = "motion_dials_forward"
ATTENTION_SLOT = "optimized_attention_override"

__all__ = ["AttentionContext", "AttentionKind", "BlockContext", "ForwardState", "LayoutError", "MotionDialsPatch",
           "MotionEffect", "TokenLayout", "UnsupportedModelError", "apply_effect", "detect_family", "effects_of",
           "held_calls", "sigma_before"]


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

    def residual_before_cross_attention(self, ctx: BlockContext, video: torch.Tensor) -> torch.Tensor | None:
        """A tensor added to the block's video tokens ``video`` [B, N, C] of the residual stream after the
        self-attention, before the cross-attention (which, with the feed-forward, sees it), or None."""
        return None

    # True for an effect whose replace_cross_attention may replace the whole cross-attention module.
    replaces_cross_attention = False

    def replace_cross_attention(self, ctx: BlockContext, normed_stream: torch.Tensor, module: torch.nn.Module
                                ) -> torch.Tensor | None:
        """The cross-attention module's whole output [B, L, C] for its input ``normed_stream`` (the host's
        ``module`` at hand for its frozen weights), or None to leave it. Replacements of several effects add up."""
        return None

    def observe_attention(self, ctx: AttentionContext, q, k, heads, groups: list[QueryGroup], attention_kwargs):
        """See an attention call with the bias all effects gave it (groups; [one unbiased group] if none)."""


@dataclass
class BlockContext:
    family: ModelFamily
    block_index: int
    block_type: str
    forward: ForwardState
    inputs: dict  # the block's arguments by name (Wan: x, e, freqs, context, context_img_len, transformer_options)
    layout: TokenLayout  # where the video tokens sit in the block's stream
    module: torch.nn.Module


def sigma_before(sigma, threshold: float):
    """Whether ``sigma`` (a number or a tensor of them) comes before ``threshold`` in denoising. A relative
    tolerance: the step that lands on the threshold belongs to the later part."""
    return sigma > threshold * (1.0 + 1e-5) + 1e-7


@dataclass
class ForwardState:
    """Per model call: what the attention calls cannot see for themselves."""

    family: ModelFamily
    sigma: float
    device: torch.device
    model_sampling: object
    cond_or_uncond: list[int]
    latent_grid: tuple[int, int, int]  # latent frames, height, width before patching
    token_grid: tuple[int, int, int] = (0, 0, 0)  # token frames, height, width after padding and patching
    sigmas: torch.Tensor | None = None  # one per batch entry
    diffusion_model: torch.nn.Module | None = None
    call_kwargs: dict = field(default_factory=dict)  # the model call's extra conditioning, as the model gets it
    block: BlockRun | None = None  # the block running now
    effects: tuple[MotionEffect, ...] = ()  # those active in this call, in order
    observers: tuple[MotionEffect, ...] = ()
    stream_effects: tuple[MotionEffect, ...] = ()  # those with a residual before the cross-attention
    # The attention function the effects' attention goes through: an override set before or after ours, or None
    # for ComfyUI's own.
    previous_override: Callable | None = None
    inside_override: bool = False
    memo: dict = field(default_factory=dict)  # what the family or an effect works out once per model call
    _percent_sigmas: dict = field(default_factory=dict)

    def activate(self, patch: MotionDialsPatch) -> bool:
        """Keep the patch's effects that act in this call; False if none does."""
        self.effects = tuple(effect for effect in patch.effects if effect.active_in(self))
        self.observers = tuple(effect for effect in self.effects if effect in patch.observers)
        self.stream_effects = tuple(effect for effect in self.effects if type(effect).residual_before_cross_attention
                                    is not MotionEffect.residual_before_cross_attention)
        return bool(self.effects)

    def before_percent(self, percent: float) -> bool:
        """True while denoising is in its first ``percent`` (sigma above ``percent_to_sigma(percent)``)."""
        threshold = self._percent_sigmas.get(percent)
        if threshold is None:
            threshold = self._percent_sigmas[percent] = float(self.model_sampling.percent_to_sigma(percent))
        return sigma_before(self.sigma, threshold)

    def classify(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, skip_reshape: bool
                 ) -> AttentionContext | None:
        """Name the attention call inside the running block (the family says what it is), or None."""
        run = self.block
        if run is None:
            return None
        call_index = run.attention_calls
        run.attention_calls += 1
        found = self.family.attention_layout(self, run, call_index, q, k, v, skip_reshape)
        if found is None:
            return None
        kind, layout = found
        return AttentionContext(self.family, run.index, run.block_type, kind, layout, self)


def _through(override: Callable | None, func: Callable) -> Callable:
    """The attention function ``func`` as another node's override would run it (``func`` itself if none)."""
    return func if override is None else functools.partial(override, func)


class MotionDialsPatch:
    """The effects on one patched model. Its effects never change: adding one makes a new patch (only the set of
    overrides already logged grows)."""

    def __init__(self, family: ModelFamily, effects: tuple[MotionEffect, ...], previous_override: Callable | None):
        self.family = family
        self.effects = effects
        self.previous_override = previous_override
        # Only effects that override observe_attention are called for it: the hot path stays short.
        self.observers = tuple(e for e in effects if type(e).observe_attention is not MotionEffect.observe_attention)
        self.announced_overrides: set = set()

    def __deepcopy__(self, memo):
        # ModelPatcher.clone deep-copies model_options; the patch is immutable, so share it.
        return self


def _apply_model_wrapper(executor, *args, **kwargs):
    """Open a ForwardState for one model call (APPLY_MODEL wrapper)."""
    x, sigma = args[0], args[1]
    transformer_options = args[5] if len(args) > 5 else kwargs["transformer_options"]
    patch: MotionDialsPatch | None = transformer_options.get(PATCH_KEY)
    if patch is None:
        return executor(*args, **kwargs)
    base_model = executor.class_obj
    state = ForwardState(
        family=patch.family,
        sigma=float(sigma.flatten()[0]),
        sigmas=sigma.flatten(),
        device=x.device,
        model_sampling=base_model.model_sampling,
        diffusion_model=base_model.diffusion_model,
        cond_or_uncond=list(transformer_options.get("cond_or_uncond", [])),
        latent_grid=tuple(x.shape[-3:]),
        token_grid=patch.family.token_grid(base_model.diffusion_model, x.shape),
        call_kwargs=kwargs,
    )
    if not state.activate(patch):  # e.g. every step past tau: the hooks then pass straight through
        return executor(*args, **kwargs)
    state.previous_override = _take_attention_slot(patch, transformer_options)
    transformer_options[FORWARD_KEY] = state
    hooks = _watch_blocks(state) + patch.family.call_hooks(state)

    def end_call():
        transformer_options.pop(FORWARD_KEY, None)
        if state.block is not None:  # a block that raised: its probes are still in place
            hooks.extend(state.block.probe_hooks)
            state.block = None
        for hook in hooks:
            hook.remove()

    held = _HELD_CALLS.get()
    if held is None:
        try:
            return executor(*args, **kwargs)
        finally:
            end_call()
    if held:
        end_call()
        raise RuntimeError("Motion Dials: held_calls() holds one model call at a time; open one per training step.")
    held.append(end_call)
    return executor(*args, **kwargs)


_HELD_CALLS: contextvars.ContextVar[list | None] = contextvars.ContextVar("motion_dials_held_calls", default=None)


@contextlib.contextmanager
def held_calls():
    """Keep the hooks and state of the model call made inside until the context ends (see the module's text)."""
    held: list = []
    token = _HELD_CALLS.set(held)
    try:
        yield
    finally:
        _HELD_CALLS.reset(token)
        for end_call in held:
            end_call()


def _take_attention_slot(patch: MotionDialsPatch, transformer_options: dict) -> Callable | None:
    """Make sure this call's attention reaches the effects; the override they must go through.

    A node placed after ours may have put its own override in the one slot (ComfyUI's ModelAttentionBackend
    does). Left there, it would silently drop every effect; instead ours goes back in for this call and calls it.
    An override that itself calls the one it found (ours) reaches ours again, which then passes the call on.
    """
    slot = transformer_options.get(ATTENTION_SLOT)
    if slot is _attention_override:
        return patch.previous_override
    if slot not in patch.announced_overrides:
        patch.announced_overrides.add(slot)
        logging.info("Motion Dials: a node after the Motion Dials nodes set the attention function (%s); the "
                     "Motion Dials effects run through it.", getattr(slot, "__qualname__", slot))
    transformer_options[ATTENTION_SLOT] = _attention_override
    return slot


def _watch_blocks(state: ForwardState) -> list:
    """Forward hooks on every block of the model, for this model call only (the modules are shared by every clone
    of the model): before a block, its family lays out the block's tokens; inside it, the effects' residuals
    before the cross-attention."""
    family = state.family

    def hooks_for(block_type: str, index: int, module: torch.nn.Module) -> list:
        def enter(_module, args, kwargs):
            state.block = family.enter_block(state, block_type, index, module, args, kwargs)

        def leave(_module, args, kwargs, output):
            run, state.block = state.block, None
            for hook in run.probe_hooks:
                hook.remove()
            return output

        hooks = [module.register_forward_pre_hook(enter, with_kwargs=True),
                 module.register_forward_hook(leave, with_kwargs=True, prepend=True)]
        if state.stream_effects:
            hooks += _watch_stream(state, module)
        return hooks

    return [hook for block in family.blocks(state.diffusion_model) for hook in hooks_for(*block)]


def block_context(state: ForwardState) -> BlockContext:
    """What an effect may ask about the block running now."""
    run = state.block
    tokens = run.stream.shape[1]
    layout = state.family.layout(state, run, tokens, tokens, run.video_start)
    return BlockContext(state.family, run.index, run.block_type, state, run.inputs, layout, run.module)


def _watch_stream(state: ForwardState, block: torch.nn.Module) -> list:
    """The effects' residuals joining the stream between the block's self-attention and cross-attention."""
    family = state.family

    def before_cross_attention(_module, args):
        run = state.block
        stream = args[0]
        ctx = block_context(state)
        start, end = ctx.layout.video_start, ctx.layout.video_end
        residual = None
        for effect in state.stream_effects:
            part = effect.residual_before_cross_attention(ctx, stream[:, start:end])
            if part is not None:
                residual = part if residual is None else residual + part
        if residual is None:
            return None
        if (start, end) != (0, stream.shape[1]):
            padded = torch.zeros_like(stream)
            padded[:, start:end] = residual
            residual = padded
        run.stream_residual = residual
        return (stream + residual, *args[1:])

    def after_cross_attention(_module, args, output):
        run = state.block
        if run is None or run.stream_residual is None:
            return output
        residual, run.stream_residual = run.stream_residual, None
        return output + residual

    return [block.get_submodule(family.stream_before_cross_attention).register_forward_pre_hook(
                before_cross_attention),
            block.get_submodule(family.cross_attention).register_forward_hook(after_cross_attention)]


class CrossAttentionReplacement(torch.nn.Module):
    """The object patch of one block's cross-attention module on a clone whose effects may replace it. It holds
    the original's own parameters and submodules (so weight patches, casting and state dicts see the same names)
    and runs the original wherever no effect replaces it."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "original", original)  # not a child: its children are this module's already
        self._parameters, self._buffers, self._modules = original._parameters, original._buffers, original._modules

    def forward(self, x, *args, **kwargs):
        transformer_options = kwargs.get("transformer_options") or {}
        state: ForwardState | None = transformer_options.get(FORWARD_KEY)
        if state is not None and state.block is not None:
            ctx = block_context(state)
            replaced = None
            for effect in state.effects:
                if effect.replaces_cross_attention:
                    part = effect.replace_cross_attention(ctx, x, self.original)
                    if part is not None:
                        replaced = part if replaced is None else replaced + part
            if replaced is not None:
                return replaced
        return self.original(x, *args, **kwargs)


def _attention_override(func, *args, **kwargs):
    transformer_options = kwargs.get("transformer_options") or {}
    patch: MotionDialsPatch | None = transformer_options.get(PATCH_KEY)
    state: ForwardState | None = transformer_options.get(FORWARD_KEY)
    if patch is None:
        return func(*args, **kwargs)
    # No effect acts in this call, or an override placed after ours called back into it: pass the call on.
    if state is None or state.inside_override:
        return _through(patch.previous_override, func)(*args, **kwargs)
    state.inside_override = True
    try:
        return _effects_attention(state, _through(state.previous_override, func), *args, **kwargs)
    finally:
        state.inside_override = False


def _effects_attention(state: ForwardState, attend: Callable, *args, **kwargs):
    q, k, v = args[:3]
    heads = args[3] if len(args) > 3 else kwargs.pop("heads")
    ctx = state.classify(q, k, v, kwargs.get("skip_reshape", False))
    if ctx is None:
        return attend(q, k, v, heads, *args[4:], **kwargs)

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
    slot = transformer_options.get(ATTENTION_SLOT)
    if existing is None:
        patch = MotionDialsPatch(family, (effect,), slot)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PATCH_KEY, _apply_model_wrapper)
    else:  # an override set between two Motion Dials nodes comes after the earlier ones' previous override
        previous = existing.previous_override if slot is _attention_override else slot
        patch = MotionDialsPatch(family, existing.effects + (effect,), previous)
    transformer_options[PATCH_KEY] = patch
    transformer_options[ATTENTION_SLOT] = _attention_override
    if effect.replaces_cross_attention:
        _patch_cross_attention(patched, family)
    return patched


def _patch_cross_attention(patched, family: ModelFamily) -> None:
    """Object patches of every block's cross-attention module (once per clone lineage), never of a replacement."""
    if not family.cross_attention:
        raise UnsupportedModelError(f"Motion Dials cannot replace the cross-attention of {family.name} models.")
    diffusion_model = patched.get_model_object("diffusion_model")
    for block_type, index, _ in family.blocks(diffusion_model):
        key = f"diffusion_model.{family.block_path(block_type, index)}.{family.cross_attention}"
        current = patched.get_model_object(key)
        if isinstance(current, CrossAttentionReplacement) and key in patched.object_patches:
            continue
        # Another clone's replacement may sit in the shared module while that clone is loaded: wrap the original.
        while isinstance(current, CrossAttentionReplacement):
            current = current.original
        patched.add_object_patch(key, CrossAttentionReplacement(current))


def effects_of(model) -> tuple[MotionEffect, ...]:
    """The Motion Dials effects a model carries, in order (empty for an unpatched model)."""
    patch = model.model_options.get("transformer_options", {}).get(PATCH_KEY)
    return patch.effects if patch is not None else ()
