"""Tensors from a model file without ever running code from it: safetensors, or a torch file read through
``torch.load(weights_only=True)`` (a pickle that holds more than tensors is refused)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


def read_tensors(path: str | Path, error: type[Exception], advice: str,
                 wrappers: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The state dict in ``path``; a dict found under one of ``wrappers`` (e.g. ``"model"``) is unwrapped.

    Anything unreadable raises ``error`` naming the file; a pickle holding code says so and adds ``advice`` (what
    to get instead).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as reason:
            raise error(f"{path.name} cannot be read as safetensors ({reason}).") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as reason:
            raise error(
                f"{path.name} was refused: it is a pickle that holds more than tensors "
                f"({str(reason).splitlines()[0]}). Motion Dials never runs code from a model file; {advice}"
            ) from None
        except (RuntimeError, EOFError, OSError) as reason:
            raise error(f"{path.name} cannot be read as a torch file ({reason}).") from None
        wrapped = [key for key in wrappers if isinstance(state, dict) and isinstance(state.get(key), dict)]
        if wrapped:
            state = state[wrapped[0]]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error(f"{path.name} does not hold a state dict of tensors.")
    return state
