"""The model families the patcher core knows: what each one's blocks are and where its video tokens sit.

A family is one module of this package with one ``ModelFamily`` subclass; ``detect_family`` asks each in turn.
The core never computes a token position itself: for every block that runs it asks the family for a
``BlockRun`` (the block's video stream and where the latent's tokens sit in it), and for every attention call
inside the block for its ``AttentionKind`` and ``TokenLayout``. A family derives these from what the host
reports for the call (``transformer_options``, the block's arguments, the tensors themselves) and checks them
against the call's sequence lengths; what does not fit is a ``LayoutError`` naming the family and the host,
never a guess.
"""

from __future__ import annotations

from .base import (
    AttentionKind,
    BlockRun,
    LayoutError,
    ModelFamily,
    TokenLayout,
    UnsupportedModelError,
)
from .cogvideox import COGVIDEOX
from .hunyuan_video import HUNYUAN_VIDEO_15
from .wan import WAN

FAMILIES: tuple[ModelFamily, ...] = (WAN, HUNYUAN_VIDEO_15, COGVIDEOX)


def supported_families() -> str:
    """The supported families of this host, for messages and tooltips."""
    names = [family.name for family in FAMILIES if family.on_this_host()]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def detect_family(model) -> ModelFamily:
    """The family of a ComfyUI ``ModelPatcher``, or an ``UnsupportedModelError`` naming what is supported."""
    base = getattr(model, "model", None)
    for family in FAMILIES:
        if family.on_this_host() and family.claims(base):
            reason = family.refusal(base)
            if reason is not None:
                raise UnsupportedModelError(
                    f"Motion Dials cannot patch this {family.name} model ({type(base).__name__}): {reason} "
                    f"Motion Dials supports {supported_families()} image-to-video models."
                )
            return family
    found = type(base).__name__ if base is not None else type(model).__name__
    raise UnsupportedModelError(
        f"Motion Dials cannot patch this model ({found}): it supports {supported_families()} video models. "
        "Connect the MODEL output of a loader for one of those (for example 'Load Diffusion Model' with a Wan "
        "2.2 I2V file); image models and other video families are not supported."
    )


__all__ = ["AttentionKind", "BlockRun", "FAMILIES", "LayoutError", "ModelFamily",
           "TokenLayout", "UnsupportedModelError", "detect_family", "supported_families"]
