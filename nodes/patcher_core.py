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

An effect that builds its residual from the base's own self-attention (MIVA's
cross-frame attention) sets ``uses_self_attention``: for the calls it acts in,
the core keeps each block's self-attention input, query projection (through
forward hooks on the query Linear that live only as long as the call), keys and
values, so no effect computes them a second time.
"""

from __future__ import annotations

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
    SelfAttentionTensors,
    TokenLayout,
    UnsupportedModelError,
    detect_family,
)

PATCH_KEY = "motion_dials"
FORWARD_KEY = "motion_dials_forward"
ATTENTION_SLOT = "optimized_attention_override"

__all__ = ["AttentionContext", "AttentionKind", "BlockContext", "ForwardState", "LayoutError", "MotionDialsPatch",
           "MotionEffect", "SelfAttentionTensors", "TokenLayout", "UnsupportedModelError", "apply_effect",
           "detect_family", "effects_of", "sigma_before"]


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
    inputs: dict  # the block's arguments by name (Wan: x, e, freqs, context, context_img_len, transformer_options)
    self_attention: SelfAttentionTensors | None


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
    keep_self_attention: bool = False
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
        self.keep_self_attention = any(effect.uses_self_attention for effect in self.effects)
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
    if state.keep_self_attention:
        hooks += _watch_self_attention_queries(state)
    try:
        return executor(*args, **kwargs)
    finally:
        transformer_options.pop(FORWARD_KEY, None)
        if state.block is not None:  # a block that raised: its probes are still in place
            hooks += state.block.probe_hooks
            state.block = None
        for hook in hooks:
            hook.remove()


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
    of the model): before a block, its family lays out the block's tokens; after it, the effects' residuals."""
    family = state.family

    def hooks_for(block_type: str, index: int, module: torch.nn.Module) -> list:
        def enter(_module, args, kwargs):
            run = family.enter_block(state, block_type, index, module, args, kwargs)
            if state.keep_self_attention:
                run.self_attention = SelfAttentionTensors()
            state.block = run

        def leave(_module, args, kwargs, output):
            run, state.block = state.block, None
            for hook in run.probe_hooks:
                hook.remove()
            context = BlockContext(family, index, block_type, state, run.inputs, run.self_attention)
            for effect in state.effects:
                residual = effect.block_residual(context, run.stream)
                if residual is not None:
                    output = family.add_to_stream(output, residual)
            return output

        # The residuals belong to the block's output, as any other hook on the block sees it: ours runs first.
        return [module.register_forward_pre_hook(enter, with_kwargs=True),
                module.register_forward_hook(leave, with_kwargs=True, prepend=True)]

    return [hook for block in family.blocks(state.diffusion_model) for hook in hooks_for(*block)]


def _watch_self_attention_queries(state: ForwardState) -> list:
    """Forward hooks, for this model call only, that keep each block's self-attention input and query projection."""
    path = state.family.self_attention_query
    if not path:
        return []

    def keep(module, inputs, output):
        kept = state.block.self_attention if state.block is not None else None
        if kept is not None:
            kept.input, kept.query_projection = inputs[0], output

    return [module.get_submodule(path).register_forward_hook(keep)
            for _, _, module in state.family.blocks(state.diffusion_model)]


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
    kept = state.block.self_attention
    if ctx.kind is AttentionKind.VIDEO_SELF and kept is not None:
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
    slot = transformer_options.get(ATTENTION_SLOT)
    if existing is None:
        patch = MotionDialsPatch(family, (effect,), slot)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PATCH_KEY, _apply_model_wrapper)
    else:  # an override set between two Motion Dials nodes comes after the earlier ones' previous override
        previous = existing.previous_override if slot is _attention_override else slot
        patch = MotionDialsPatch(family, existing.effects + (effect,), previous)
    transformer_options[PATCH_KEY] = patch
    transformer_options[ATTENTION_SLOT] = _attention_override
    return patched


def effects_of(model) -> tuple[MotionEffect, ...]:
    """The Motion Dials effects a model carries, in order (empty for an unpatched model)."""
    patch = model.model_options.get("transformer_options", {}).get(PATCH_KEY)
    return patch.effects if patch is not None else ()
