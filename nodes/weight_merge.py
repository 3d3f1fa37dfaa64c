"""Merges as ComfyUI weight patches: a clone whose weights are a formula of its own and other models' weights.

Like ComfyUI's own merge nodes, nothing is computed when the node runs: each
key gets a patch that ComfyUI evaluates when it loads (or saves) the model,
one tensor at a time, through the same ``comfy.lora.calculate_weight`` path as
a LoRA. The other models' weights are referenced with their own patches (a
LoRA on the fine-tune counts), never copied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.lora
import comfy.model_management
import comfy.utils
import torch
from comfy.weight_adapter.base import WeightAdapterBase

from ..models.merge import Dare, NonFiniteMergeError, merge_in_place

DIFFUSION_PREFIX = "diffusion_model."


@dataclass(frozen=True)
class Formula:
    """One of the in-place merges of ``models.merge`` with its parameters, and its DARE draw if it has one."""

    merge: Callable[..., None]
    params: dict = field(default_factory=dict)
    dare: Dare | None = None

    def __call__(self, key: str, out: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        return merge_in_place(key, out, others, self.merge, self.params, self.dare)


class MergeError(ValueError):
    pass


def check_same_architecture(model, other, names: tuple[str, str]) -> None:
    """Raise a MergeError naming the first key the two diffusion models disagree on."""
    first, second = names
    if type(model.model) is not type(other.model):
        raise MergeError(
            f"{first} is a {type(model.model).__name__} model but {second} is a {type(other.model).__name__} "
            "model; a merge needs two checkpoints of one architecture (for example Wan 2.1 I2V 14B and its "
            "fine-tune).")
    own = model.model.diffusion_model.state_dict()
    theirs = other.model.diffusion_model.state_dict()
    for key, tensor in own.items():
        if key in theirs and theirs[key].shape != tensor.shape:
            raise MergeError(
                f"{first} and {second} differ in architecture: {DIFFUSION_PREFIX}{key} has shape "
                f"{tuple(tensor.shape)} in {first} but {tuple(theirs[key].shape)} in {second}. Load two "
                "checkpoints of the same model size and variant.")
    if not own.keys() & theirs.keys():
        raise MergeError(f"{first} and {second} share no weights; they are not two checkpoints of one model.")


def _evaluate(entry: list, device: torch.device, dtype: torch.dtype, key: str) -> torch.Tensor:
    """A weight from ``ModelPatcher.get_key_patches`` with its own patches applied, as ComfyUI does for merges.

    Read only: without patches to apply, the stored tensor itself when it already has the dtype and device.
    """
    (weight, convert), *patches = entry
    value = convert(comfy.model_management.cast_to_device(weight, device, dtype, copy=bool(patches)),
                    inplace=bool(patches))
    return comfy.lora.calculate_weight(patches, value, key, intermediate_dtype=dtype) if patches else value


class MergePatch(WeightAdapterBase):
    """The weight patch of one key: ``formula(this model's weight, *the other models' weights)``.

    Computed in the fp32 buffer ComfyUI hands over, so the merge adds only chunk-sized temporaries. A
    strength other than 1 blends the change in; ``function`` does not apply (ComfyUI sets it only on patches
    added with one, which these never are).
    """

    name = "motion_dials_merge"

    def __init__(self, formula: Formula, sources: tuple[list, ...], description: str):
        self.formula = formula
        self.sources = sources
        self.description = description

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        others = [_evaluate(entry, weight.device, intermediate_dtype, key) for entry in self.sources]
        in_place = weight.is_contiguous() and weight.dtype == intermediate_dtype and strength == 1.0
        out = weight if in_place else weight.to(intermediate_dtype, copy=True).contiguous()
        try:
            self.formula(key, out, *others)
        except NonFiniteMergeError:
            raise MergeError(
                f"{self.description} gave NaN or Inf in {key}. Check that both input models are intact "
                "(a NaN in a checkpoint spreads into the merge) and that the merge factors are not extreme."
            ) from None
        if not in_place:
            weight.copy_(torch.lerp(weight.to(intermediate_dtype), out, strength))
        return weight


def _unchanged(weight, inplace=False):
    return weight


def _patched_on_load(model, key: str) -> bool:
    """Whether ComfyUI applies weight patches to this key when it loads the model.

    ComfyUI (0.3.75) patches the parameters of modules without parameterised children only: a parameter
    held by a parent module, like Wan's per-block ``modulation``, keeps its stored value whatever its patches.
    """
    owner = comfy.utils.get_attr(model.model, key.rsplit(".", 1)[0])
    return not any(True for child in owner.children() for _ in child.parameters())


def merged_clone(model, others: tuple, formula: Formula, description: str):
    """A clone of ``model`` whose every shared key is ``formula(model's weight, *others' weights)``.

    Keys missing from any of ``others`` are left as they are (zero difference, as in EDG). The few keys
    ComfyUI would not patch on load (see ``_patched_on_load``) are merged now, small as they are, and set
    as object patches, which ComfyUI applies on load and undoes on unload like weight patches.
    """
    merged = model.clone()
    own_patches = model.get_key_patches(DIFFUSION_PREFIX)
    other_patches = [other.get_key_patches(DIFFUSION_PREFIX) for other in others]
    patches = {}
    for key in own_patches:
        if not all(key in patches_of_other for patches_of_other in other_patches):
            continue
        sources = tuple(_source_entry(other, patches_of_other, key)
                        for other, patches_of_other in zip(others, other_patches, strict=True))
        patch = MergePatch(formula, sources, description)
        if _patched_on_load(model, key):
            patches[key] = patch
            continue
        # Small (a few per block): merged now, as an object patch ComfyUI applies on load.
        own = _source_entry(model, own_patches, key)
        weight = _evaluate(own, torch.device("cpu"), torch.float32, key).clone()
        value = patch.calculate_weight(weight, key, 1.0, 1.0, None, _unchanged)
        merged.add_object_patch(key, torch.nn.Parameter(value.to(own[0][0].dtype), requires_grad=False))
    merged.add_patches(patches, 1.0, 1.0)
    return merged


def _source_entry(model, key_patches: dict, key: str) -> list:
    """A key's entry as ``get_key_patches`` gives it: the weight with the patches ComfyUI applies on load.

    For a key ComfyUI does not patch on load, the value the model has when loaded: its object patch if it has
    one, else the stored value (``get_model_object`` looks past another clone's object patch applied now).
    """
    if _patched_on_load(model, key):
        return key_patches[key]
    return [(model.get_model_object(key), _unchanged)]
