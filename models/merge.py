"""EDG's weight merges as plain torch, one tensor at a time, in place (the EDG paper, "Extrapolating and
Decoupling Image-to-Video Generation Models", CVPR 2025, and its code).

Each merge writes its result into the buffer of its first model's tensor (the
fp32 copy ComfyUI makes when it patches a weight) and only reads the others,
in flat chunks of ``CHUNK`` elements: beyond the inputs and that one tensor, a
merge holds a few chunk-sized temporaries, whatever the model size.

DARE masks are drawn per chunk from a generator seeded by ``(seed, key,
chunk)``: a merge is the same for a seed whatever order or device the keys are
computed in. EDG's two DARE draws are independent (the official code's two
calls are unseeded): the dynamic model uses ``seed``, the consistency model
``consistency_seed(seed)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

SEED_LIMIT = 2**64  # ComfyUI's seed widgets go up to 2**64 - 1
CHUNK = 1 << 16  # elements per step (256 KiB in fp32); also the unit of the DARE mask stream


class NonFiniteMergeError(ValueError):
    pass


@dataclass(frozen=True)
class Dare:
    """Drop And REscale: keep each element with probability ``1 - rate``, divide the kept ones by ``1 - rate``.

    1-D tensors (biases, norms) are never dropped, as in EDG. ``rate`` is in [0, 1).
    """

    rate: float
    seed: int

    def keep(self, key: str, chunk: int, length: int, tensor_ndim: int) -> torch.Tensor | None:
        """The keep mask of one chunk of a key's tensor, or None when nothing is dropped."""
        if tensor_ndim <= 1 or self.rate == 0.0:
            return None
        return torch.rand(length, generator=dare_generator(self.seed, key, chunk)) >= self.rate

    def scale(self, tensor_ndim: int) -> float:
        return 1.0 if tensor_ndim <= 1 else 1.0 / (1.0 - self.rate)


def dare_generator(seed: int, key: str, chunk: int) -> torch.Generator:
    """The CPU generator of one chunk of a key's DARE mask: a stable hash of seed, key name and chunk."""
    digest = hashlib.blake2b(f"{seed}:{key}:{chunk}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def consistency_seed(seed: int) -> int:
    """The DARE seed of EDG's consistency model, given the dynamic model's."""
    return (seed + 1) % SEED_LIMIT


def _masked(delta: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return delta if keep is None else delta.mul_(keep.to(delta.device))


# The merges, on matching flat chunks. ``out`` holds the first model's values on entry and the result on exit.

def extrapolate(out: torch.Tensor, model2: torch.Tensor, *, ratio: float) -> None:
    """``ratio * model1 + (1 - ratio) * model2`` (ComfyUI's ModelMergeSimple), for any ratio.

    A ratio above 1 moves away from model2: EDG's ``dyn = pre + a (pre - sft)`` is ratio ``1 + a``.
    """
    out.mul_(ratio).add_(model2, alpha=1.0 - ratio)


def dare_add_difference(out: torch.Tensor, base: torch.Tensor, tuned: torch.Tensor, *, strength: float,
                        keep: torch.Tensor | None, scale: float) -> None:
    """Task arithmetic with DARE: ``target + strength * DARE(tuned - base)``, ``out`` holding the target."""
    out.add_(_masked(tuned - base, keep), alpha=strength * scale)


def edg_dynamic(out: torch.Tensor, sft: torch.Tensor, *, alpha: float, beta: float,
                keep: torch.Tensor | None, scale: float) -> None:
    """theta_dyn* = pre + beta * DARE(dyn - pre), dyn = pre + alpha (pre - sft), ``out`` holding pre."""
    dyn = out.clone()
    extrapolate(dyn, sft, ratio=1.0 + alpha)
    dare_add_difference(out, out, dyn, strength=beta, keep=keep, scale=scale)


def edg_consistency(out: torch.Tensor, sft: torch.Tensor, *, alpha: float, beta: float,
                    keep: torch.Tensor | None, scale: float) -> None:
    """theta_con* = alpha * sft + beta * DARE(sft - pre), ``out`` holding pre."""
    delta = _masked(sft - out, keep)
    torch.mul(sft, alpha, out=out)
    out.add_(delta, alpha=beta * scale)


@torch.no_grad()
def merge_in_place(key: str, out: torch.Tensor, others: tuple[torch.Tensor, ...], merge: Callable[..., None],
                   params: dict, dare: Dare | None = None) -> torch.Tensor:
    """Apply ``merge`` to the key's tensors chunk by chunk; ``out`` (contiguous, owned) gets the result.

    Raises NonFiniteMergeError if any result is NaN or Inf.
    """
    flat_out = out.view(-1)
    flat_others = [other.reshape(-1) for other in others]
    for chunk, start in enumerate(range(0, flat_out.numel(), CHUNK)):
        stop = min(start + CHUNK, flat_out.numel())
        extra = {}
        if dare is not None:
            extra = {"keep": dare.keep(key, chunk, stop - start, out.ndim), "scale": dare.scale(out.ndim)}
        part = flat_out[start:stop]
        merge(part, *(other[start:stop] for other in flat_others), **params, **extra)
        if not torch.isfinite(part).all():
            raise NonFiniteMergeError(key)
    return out
