"""Which models the core patches: every family on this host, and every variant of them it refuses, by name."""

import comfy.ldm.wan.model
import comfy.model_base
import pytest
import torch
from sampling import CASES, load_tiny

from motion_dials.nodes.families import FAMILIES, UnsupportedModelError, detect_family, supported_families


class Patcher:
    """What detect_family reads of a ModelPatcher: its model."""

    def __init__(self, model):
        self.model = model


def bare(model_class, diffusion_model_class):
    """An instance of the host's own model class around one of its diffusion-model classes, built without weights
    (only their types decide the family)."""
    model = model_class.__new__(model_class)
    torch.nn.Module.__init__(model)
    model.diffusion_model = diffusion_model_class.__new__(diffusion_model_class)
    torch.nn.Module.__init__(model.diffusion_model)
    return model


def subclasses(cls):
    found = []
    for sub in cls.__subclasses__():
        if sub.__module__ == cls.__module__:
            found += [sub, *subclasses(sub)]
    return found


SUPPORTED_WAN = (comfy.model_base.WAN21, comfy.model_base.WAN22)
WAN_VARIANTS = [cls for cls in subclasses(comfy.model_base.WAN21) if cls not in SUPPORTED_WAN]
WAN_MODEL_VARIANTS = [cls for cls in subclasses(comfy.ldm.wan.model.WanModel)]


@pytest.mark.parametrize("case_name", list(CASES))
def test_every_case_of_this_host_is_detected_as_its_family(tiny_models, case_name):
    family = detect_family(load_tiny(case_name))
    assert family.on_this_host() and family.name in supported_families()


@pytest.mark.parametrize("variant", WAN_VARIANTS, ids=lambda cls: cls.__name__)
def test_wan_variants_of_this_host_are_refused_by_name(variant):
    with pytest.raises(UnsupportedModelError, match=rf"cannot patch this Wan 2\.1 / 2\.2 model \({variant.__name__}\)"
                       r".*does not state its token layout.*supports Wan 2\.1 / 2\.2"):
        detect_family(Patcher(bare(variant, comfy.ldm.wan.model.WanModel)))


@pytest.mark.parametrize("variant", WAN_MODEL_VARIANTS, ids=lambda cls: cls.__name__)
def test_wan_diffusion_model_subclasses_are_refused_by_name(variant):
    with pytest.raises(UnsupportedModelError, match=rf"WAN21 with {variant.__name__} is a Wan variant"):
        detect_family(Patcher(bare(comfy.model_base.WAN21, variant)))


def test_hunyuan_video_15_variants_are_refused_by_name():
    variants = [cls for cls in subclasses(comfy.model_base.HunyuanVideo15)]
    assert variants, "HunyuanVideo15_SR_Distilled is in both hosts"
    import comfy.ldm.hunyuan_video.model as hunyuan

    for variant in variants:
        with pytest.raises(UnsupportedModelError, match=rf"HunyuanVideo 1\.5 model \({variant.__name__}\)"):
            detect_family(Patcher(bare(variant, hunyuan.HunyuanVideo)))


def test_the_message_lists_the_families_this_host_has():
    names = [family.name for family in FAMILIES if family.on_this_host()]
    assert names and all(name in supported_families() for name in names)



def cogvideox_refusals():
    """CogVideoX models other than image-to-video, on hosts that have CogVideoX."""
    if not hasattr(comfy.model_base, "CogVideoX"):
        return []
    import comfy.ldm.cogvideo.model as cogvideo

    return [(comfy.model_base.CogVideoX, cogvideo.CogVideoXTransformer3DModel, channels, kind)
            for channels, kind in ((16, "text-to-video"), (48, "inpainting"))]


def test_cogvideox_other_than_image_to_video_is_refused():
    """(No CogVideoX on a host: nothing to refuse, and the supported list says so.)"""
    refusals = cogvideox_refusals()
    assert bool(refusals) == ("CogVideoX" in supported_families())
    for model_class, diffusion_class, channels, _ in refusals:
        model = bare(model_class, diffusion_class)
        model.diffusion_model.in_channels = channels
        with pytest.raises(UnsupportedModelError, match=r"only the image-to-video model \(32 input channels\)"):
            detect_family(Patcher(model))
