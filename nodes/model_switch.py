"""Two models inside one sampler run: the early model above a timestep boundary, the late model below.

The switched model is a clone of the early model with one APPLY_MODEL wrapper,
placed outermost. For each model call the wrapper reads the timestep and
either lets the early model's own chain run, or calls the late model's
``apply_model`` with the late model's transformer options (its attention
overrides, block patches and wrappers), or, inside the blend window, both.
Samplers see one model, so a multistep solver keeps its history across the
switch.

Loading: the sampler loads the early model as usual; the late model is loaded
through ``comfy.model_management.load_models_gpu`` when it is first needed,
which offloads the early model if the two do not fit together. Two clones of
one base model (the two outputs of EDG Merge, or one model with different
LoRAs) share their weight tensors, and ComfyUI patches those in place: the
hard switch lets ComfyUI re-patch them once, at the switch; the blend needs
both at every step of its window, so a late model that shares the early
model's weights but patches them differently is first copied into a model of
its own (one model's memory more, computed once per node run).
"""

from __future__ import annotations

import copy

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import torch

from .weight_merge import DIFFUSION_PREFIX

SWITCH_KEY = "motion_dials_timestep_switch"
MODES = ("hard switch", "blend")
# What the sampler puts into transformer_options for each call; the rest comes from the model being run.
SAMPLER_KEYS = ("cond_or_uncond", "uuids", "sigmas", "sample_sigmas")


class SwitchError(ValueError):
    pass


def early_weight(fraction: float, boundary: float, mode: str, window: float) -> float:
    """How much of the prediction comes from the early model at ``timestep / 1000 = fraction``.

    Hard switch: 1 while ``fraction > boundary`` (EDG's ``t > T``, Wan 2.2's expert split), else 0.
    Blend: linear from 0 to 1 across ``boundary -/+ window / 2``; window 1 around 0.5 is EDG's
    unused blended variant, weight ``t / 1000``.
    """
    if mode == "hard switch" or window <= 0.0:
        return 1.0 if fraction > boundary else 0.0
    return min(1.0, max(0.0, (fraction - boundary) / window + 0.5))


def check_compatible(early, late) -> None:
    """Raise a SwitchError unless both models are of one family, with one latent format and input layout."""
    early_model, late_model = early.model, late.model
    if type(early_model) is not type(late_model):
        raise SwitchError(
            f"The early model is a {type(early_model).__name__} model and the late model a "
            f"{type(late_model).__name__} model; both must be of one family (for Wan 2.2, the high-noise and "
            "the low-noise expert).")
    if type(early_model.latent_format) is not type(late_model.latent_format):
        raise SwitchError(
            f"The two models use different latent formats ({type(early_model.latent_format).__name__} and "
            f"{type(late_model.latent_format).__name__}); one latent cannot go through both.")
    early_config, late_config = early_model.model_config.unet_config, late_model.model_config.unet_config
    for name in sorted(early_config.keys() | late_config.keys()):
        if early_config.get(name) != late_config.get(name):
            raise SwitchError(
                f"The two models differ in their architecture setting {name!r} ({early_config.get(name)!r} vs "
                f"{late_config.get(name)!r}); for example an I2V and a T2V model cannot share one sampler run.")


def shares_weights_differently(early, late) -> bool:
    """True when the two patchers patch one set of weight tensors in place with different patches."""
    return early.is_clone(late) and early.patches_uuid != late.patches_uuid


def independent_copy(patcher):
    """A clone of ``patcher`` on a diffusion model of its own, with the patched weights baked in.

    Its options (attention overrides, wrappers, object patches such as a sampling shift) stay; only the
    weight tensors are new. Built one tensor at a time: the peak is the new model plus one tensor.
    """
    base = patcher.model
    model = base.model_config.get_model(base.state_dict(), DIFFUSION_PREFIX, device=patcher.offload_device)
    entries = patcher.get_key_patches(DIFFUSION_PREFIX)
    progress = comfy.utils.ProgressBar(len(entries))
    for key, ((weight, convert), *patches) in entries.items():
        value = convert(comfy.model_management.cast_to_device(weight, patcher.offload_device, torch.float32,
                                                              copy=True), inplace=True)
        if patches:
            value = comfy.lora.calculate_weight(patches, value, key)
        comfy.utils.copy_to_param(model, key, value)
        progress.update(1)
    own = patcher.clone()
    fresh = comfy.model_patcher.ModelPatcher(model, patcher.load_device, patcher.offload_device)
    own.model, own.size = model, 0
    own.patches, own.patches_uuid = {}, fresh.patches_uuid
    own.backup, own.object_patches_backup, own.hook_backup = {}, {}, {}
    own.pinned, own.parent = set(), None
    return own


class TimestepSwitch:
    """The APPLY_MODEL wrapper of a switched model."""

    def __init__(self, late, boundary: float, mode: str, window: float):
        self.late = late
        self.boundary = boundary
        self.mode = mode
        self.window = window
        self._early = None  # the early model's patcher as the sampler loaded it, to load it back if evicted
        self._late_options_base = None

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        transformer_options = {} if transformer_options is None else transformer_options
        fraction = float(executor.class_obj.model_sampling.timestep(t.flatten()[:1])) / 1000.0
        weight = early_weight(fraction, self.boundary, self.mode, self.window)
        early_patcher = self._early_patcher(executor.class_obj)
        self._ensure_loaded(([early_patcher] if weight > 0.0 else []) + ([self.late] if weight < 1.0 else []))
        if weight == 1.0:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        late = self.late.model.apply_model(x, t, c_concat=c_concat, c_crossattn=c_crossattn, control=control,
                                           transformer_options=self._late_options(transformer_options), **kwargs)
        if weight == 0.0:
            return late
        early = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        return early * weight + late * (1.0 - weight)

    def _early_patcher(self, early_model):
        for patcher in comfy.model_management.loaded_models():
            # None: ComfyUI keeps weak references, and a collected patcher's entry stays until it cleans up.
            if patcher is not None and patcher.model is early_model and patcher is not self.late:
                self._early = patcher
        return self._early

    @staticmethod
    def _ensure_loaded(models: list) -> None:
        loaded = comfy.model_management.loaded_models()
        models = [model for model in models if model is not None]
        if any(all(other is not model for other in loaded) for model in models):
            comfy.model_management.load_models_gpu(models)

    def _late_options(self, transformer_options: dict) -> dict:
        """The late model's own transformer options (as a sampler would give them) plus this call's sampler keys."""
        if self._late_options_base is None:
            base = copy.copy(self.late.model_options.get("transformer_options", {}))
            base["wrappers"] = comfy.patcher_extension.copy_nested_dicts(self.late.wrappers)
            base["callbacks"] = comfy.patcher_extension.copy_nested_dicts(self.late.callbacks)
            self._late_options_base = base
        options = dict(self._late_options_base)
        options.update({key: transformer_options[key] for key in SAMPLER_KEYS if key in transformer_options})
        return options


def switch_models(early, late, boundary: float, mode: str, window: float):
    """One model that runs ``early`` while ``timestep / 1000 > boundary`` and ``late`` after (or blends)."""
    if mode not in MODES:
        raise SwitchError(f"Unknown switch mode {mode!r}; choose one of {', '.join(MODES)}.")
    check_compatible(early, late)
    if mode == "blend" and shares_weights_differently(early, late):
        late = independent_copy(late)
    switched = early.clone()
    apply_model_wrappers = switched.wrappers.setdefault(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {})
    # Outermost, so that for the late model's steps none of the early model's wrappers run.
    switched.wrappers[comfy.patcher_extension.WrappersMP.APPLY_MODEL] = {
        SWITCH_KEY: [TimestepSwitch(late, boundary, mode, window)], **apply_model_wrappers}
    return switched
