"""EDG's weight merges (REFERENCE section 2) as plain torch, one tensor at a time.

Every function takes the tensors of one key and returns that key's merged
tensor, so a whole-model merge never holds more than the inputs and the
tensor being built. DARE masks are drawn from a generator seeded by
``(seed, key)``: a merge is the same for a seed whatever order or device the
keys are computed in. EDG's two DARE draws are independent (the official
code's two calls are unseeded): the dynamic model uses ``seed``, the
consistency model ``consistency_seed(seed)``.
"""

from __future__ import annotations

import hashlib

import torch

SEED_LIMIT = 2**64  # ComfyUI's seed widgets go up to 2**64 - 1


def dare_generator(seed: int, key: str) -> torch.Generator:
    """The CPU generator of one key's DARE mask: a stable hash of the seed and the key name."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def dare(delta: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Drop And REscale: keep each element with probability ``1 - rate``, divide the kept ones by ``1 - rate``.

    1-D tensors (biases, norms) pass unchanged, as in EDG. ``rate`` is in [0, 1).
    """
    if delta.ndim <= 1 or rate == 0.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) >= rate
    return delta * keep.to(device=delta.device, dtype=delta.dtype) / (1.0 - rate)


def extrapolate(model1: torch.Tensor, model2: torch.Tensor, ratio: float) -> torch.Tensor:
    """``ratio * model1 + (1 - ratio) * model2`` (ComfyUI's ModelMergeSimple), for any ratio.

    A ratio above 1 moves away from model2: EDG's ``dyn = pre + a (pre - sft)`` is ratio ``1 + a``.
    """
    return model1 * ratio + model2 * (1.0 - ratio)


def dare_add_difference(target: torch.Tensor, base: torch.Tensor, tuned: torch.Tensor, strength: float,
                        rate: float, generator: torch.Generator) -> torch.Tensor:
    """Task arithmetic with DARE: ``target + strength * DARE(tuned - base)``."""
    return target + strength * dare(tuned - base, rate, generator)


def consistency_seed(seed: int) -> int:
    """The DARE seed of EDG's consistency model, given the dynamic model's."""
    return (seed + 1) % SEED_LIMIT


def edg_dynamic(pre: torch.Tensor, sft: torch.Tensor, alpha: float, beta: float, rate: float,
                generator: torch.Generator) -> torch.Tensor:
    """theta_dyn* = pre + beta * DARE(dyn - pre), dyn = pre + alpha (pre - sft) = extrapolate(pre, sft, 1 + alpha)."""
    dyn = extrapolate(pre, sft, 1.0 + alpha)
    return dare_add_difference(pre, pre, dyn, beta, rate, generator)


def edg_consistency(pre: torch.Tensor, sft: torch.Tensor, alpha: float, beta: float, rate: float,
                    generator: torch.Generator) -> torch.Tensor:
    """theta_con* = alpha * sft + beta * DARE(sft - pre)."""
    return dare_add_difference(alpha * sft, pre, sft, beta, rate, generator)
