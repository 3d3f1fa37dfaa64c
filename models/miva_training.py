"""Training a MIVA adapter (the MIVA paper's training setup, as its authors' Wan trainer runs it), as plain
torch: no ComfyUI in here.

What one step does, with one generator drawing everything in a fixed order (so a run is reproducible and a
resumed run continues exactly where the checkpoint left it):

1. a clip, a window of ``frames`` consecutive frames of it and a horizontal flip (p = 0.5) are drawn; the window's
   latent is encoded once with the VAE and cached by (clip, window start, flip);
2. one of the 1000 training timesteps is drawn uniformly; its sigma is the model's own (``percent_to_sigma`` of
   its ``model_sampling``, so the shift is the model's), the noisy latent is the model's ``noise_scaling``;
3. frame 0 of the noisy latent is replaced by frame 0's clean latent (the condition, as at inference);
4. the loss is the MSE of the model's prediction against the flow-matching velocity target ``noise - latent`` on
   frames 1.. only (frame 0 is out of the loss), weighted per timestep as the authors' DiffSynth trainer does:
   ``w(t) = exp(-2 ((t - 500) / 1000)^2)`` minus its minimum over the 1000 training timesteps, normalised to mean 1,
   with ``t = model_sampling.timestep(sigma)``;
5. AdamW updates the adapter's tensors (the only tensors with gradients).

A training state (``<name>.state.safetensors`` beside the adapter, with a ``.json`` sidecar) holds the adapter's
tensors, AdamW's moments and step counts, the generator's state, the step reached and the losses so far: tensors
and JSON only, nothing that runs code when read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TRAINING_TIMESTEPS = 1000
STATE_FORMAT = "motion-dials/miva-training-state"
STATE_VERSION = 1


def check_frame_count(frames: int) -> None:
    if frames < 5 or (frames - 1) % 4:
        raise ValueError(f"frames is {frames}; the Wan VAE takes 4k + 1 frames (5, 9, 13, 17, ...): 17 frames are "
                         "5 latent frames, the paper's setting.")


def latent_frames(frames: int) -> int:
    return (frames - 1) // 4 + 1


def timestep_weights(timesteps: torch.Tensor) -> torch.Tensor:
    """DiffSynth's per-timestep loss weight over the training timesteps ``timesteps`` (0..1000 scale): a Gaussian
    bump around t = 500, its minimum subtracted, normalised to mean 1 over the given timesteps."""
    t = timesteps.double()
    weights = torch.exp(-2.0 * ((t - TRAINING_TIMESTEPS / 2) / TRAINING_TIMESTEPS) ** 2)
    weights = weights - weights.min()
    return (weights / weights.mean()).float()


@dataclass(frozen=True)
class Schedule:
    """The 1000 training sigmas of a model (from its own model_sampling), their timesteps and loss weights."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def of(cls, model_sampling, count: int = TRAINING_TIMESTEPS) -> Schedule:
        sigmas = torch.tensor([float(model_sampling.percent_to_sigma(j / count)) for j in range(count)])
        timesteps = model_sampling.timestep(sigmas).float()
        return cls(sigmas, timesteps, timestep_weights(timesteps))


@dataclass
class Clip:
    """One training clip: its name and its frames as an IMAGE-like tensor [N, H, W, 3] in [0, 1] (already at the
    training resolution)."""

    name: str
    frames: torch.Tensor


@dataclass
class LatentCache:
    """The latent of each (clip, window start, flip), encoded once by ``encode`` ([F, H, W, 3] -> [1, C, f, h, w])."""

    clips: list[Clip]
    frames: int
    encode: Callable[[torch.Tensor], torch.Tensor]
    cached: dict = field(default_factory=dict)

    def windows(self, clip: int) -> int:
        return self.clips[clip].frames.shape[0] - self.frames + 1

    def latent(self, clip: int, start: int, flip: bool) -> torch.Tensor:
        key = (clip, start, flip)
        if key not in self.cached:
            pixels = self.clips[clip].frames[start:start + self.frames]
            if flip:
                pixels = pixels.flip(-2)  # [F, H, W, 3]: the width axis
            with torch.no_grad():
                self.cached[key] = self.encode(pixels).detach().float().cpu()
        return self.cached[key]


def draw(generator: torch.Generator, cache: LatentCache, schedule: Schedule) -> tuple[tuple[int, int, bool], int]:
    """(clip, window start, flip) and a timestep index, drawn in this order."""
    clip = int(torch.randint(len(cache.clips), (1,), generator=generator))
    start = int(torch.randint(cache.windows(clip), (1,), generator=generator))
    flip = bool(torch.rand((), generator=generator) < 0.5)
    index = int(torch.randint(len(schedule.sigmas), (1,), generator=generator))
    return (clip, start, flip), index


def noisy_input(model_sampling, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """The model's own noising of ``latent`` at ``sigma``, with frame 0 clean (the condition)."""
    x = model_sampling.noise_scaling(sigma, noise, latent, False)
    x = x.clone()
    x[:, :, :1] = latent[:, :, :1]
    return x


def velocity_loss(prediction: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
                  weight: torch.Tensor | float) -> torch.Tensor:
    """Weighted MSE against the flow-matching target ``noise - latent`` over frames 1.. (frame 0 left out)."""
    target = noise - latent
    return ((prediction.float()[:, :, 1:] - target.float()[:, :, 1:]) ** 2).mean() * weight


@dataclass
class Run:
    """A training run's mutable state: parameters, optimizer, generator, step, losses."""

    params: dict[str, torch.Tensor]  # float32 leaves, requires_grad
    optimizer: torch.optim.AdamW
    generator: torch.Generator
    step: int = 0
    losses: list[float] = field(default_factory=list)

    @classmethod
    def start(cls, tensors: dict[str, torch.Tensor], learning_rate: float, seed: int, device) -> Run:
        params = {name: tensor.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
                  for name, tensor in sorted(tensors.items())}
        optimizer = torch.optim.AdamW(list(params.values()), lr=learning_rate)
        generator = torch.Generator().manual_seed(seed)
        return cls(params, optimizer, generator)

    def train_step(self, cache: LatentCache, schedule: Schedule, model_sampling,
                   forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device) -> float:
        """One step: draw, noise, forward, loss, backward, AdamW."""
        (clip, start, flip), index = draw(self.generator, cache, schedule)
        latent = cache.latent(clip, start, flip)
        noise = torch.randn(latent.shape, generator=self.generator)
        latent, noise = latent.to(device), noise.to(device)
        sigma = schedule.sigmas[index:index + 1].to(device)
        x = noisy_input(model_sampling, sigma, noise, latent)
        self.optimizer.zero_grad(set_to_none=True)
        loss = velocity_loss(forward(x, sigma), noise, latent, float(schedule.weights[index]))
        loss.backward()
        self.optimizer.step()
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().float().cpu().contiguous() for name, param in self.params.items()}

    # The training state: one safetensors file of tensors and a JSON sidecar.

    def save_state(self, path: str | Path, facts: dict) -> None:
        path = Path(path)
        tensors = {f"param.{name}": t for name, t in self.tensors().items()}
        state = self.optimizer.state_dict()["state"]
        names = list(self.params)
        for i, moments in state.items():
            for key, value in moments.items():
                tensors[f"adamw.{names[i]}.{key}"] = torch.as_tensor(value).detach().float().cpu().contiguous()
        tensors["rng.generator"] = self.generator.get_state()
        sidecar = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": self.step, "losses": self.losses,
                   "facts": facts}
        temporary = path.with_name(path.name + ".partial")
        save_file(tensors, str(temporary), metadata={"format": STATE_FORMAT})
        sidecar_path = state_sidecar(path)
        sidecar_path.with_name(sidecar_path.name + ".partial").write_text(json.dumps(sidecar))
        temporary.replace(path)
        sidecar_path.with_name(sidecar_path.name + ".partial").replace(sidecar_path)

    @classmethod
    def resume(cls, path: str | Path, learning_rate: float, device, facts: dict) -> Run:
        """The run saved at ``path``; a clear error where it was made with other settings (``facts``)."""
        path = Path(path)
        sidecar = json.loads(state_sidecar(path).read_text())
        if sidecar.get("format") != STATE_FORMAT or sidecar.get("version") != STATE_VERSION:
            raise ValueError(f"{path.name} is not a MIVA training state of this Motion Dials.")
        changed = {key: (sidecar["facts"].get(key), value) for key, value in facts.items()
                   if sidecar["facts"].get(key) != value}
        if changed:
            described = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))
            raise ValueError(f"MIVA Train: the training state {path.name} was made with other settings ({described}). "
                             "Set them back, switch resume off to start again, or choose another file_name.")
        tensors = load_file(str(path))
        params = {key[len("param."):]: value for key, value in tensors.items() if key.startswith("param.")}
        run = cls.start(params, learning_rate, 0, device)
        names = list(run.params)
        state = {}
        for i, name in enumerate(names):
            moments = {key: tensors[f"adamw.{name}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq")
                       if f"adamw.{name}.{key}" in tensors}
            if moments:
                state[i] = {key: value.to(device) if key != "step" else value for key, value in moments.items()}
        optimizer_state = run.optimizer.state_dict()
        optimizer_state["state"] = state
        run.optimizer.load_state_dict(optimizer_state)
        run.generator.set_state(tensors["rng.generator"])
        run.step = int(sidecar["step"])
        run.losses = [float(v) for v in sidecar["losses"]]
        return run


def state_sidecar(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".json")


def state_path(adapter_path: str | Path) -> Path:
    adapter_path = Path(adapter_path)
    return adapter_path.with_name(adapter_path.name.removesuffix(".safetensors") + ".state.safetensors")


def smoothed(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve_image(losses: list[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """The loss per step (grey) and its running mean (orange) on a log scale, as an IMAGE [1, H, W, 3]."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw_ = ImageDraw.Draw(image)
    left, right, top, bottom = 48, width - 8, 8, height - 20
    draw_.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    finite = [v for v in losses if math.isfinite(v) and v > 0]
    if finite:
        low, high = math.log10(min(finite)), math.log10(max(finite))
        if high - low < 1e-6:
            low, high = low - 0.5, high + 0.5

        def point(i: int, value: float) -> tuple[float, float]:
            x = left + (right - left) * (i / max(len(losses) - 1, 1))
            y = bottom - (bottom - top) * (math.log10(max(value, 10 ** low)) - low) / (high - low)
            return x, y

        for values, colour in ((losses, (170, 170, 170)), (smoothed(losses, max(len(losses) // 20, 1)),
                                                            (230, 120, 0))):
            points = [point(i, v) for i, v in enumerate(values) if math.isfinite(v) and v > 0]
            if len(points) > 1:
                draw_.line(points, fill=colour, width=1 if colour[0] == 170 else 2)
        draw_.text((2, top), f"{10 ** high:.3g}", fill=(0, 0, 0))
        draw_.text((2, bottom - 10), f"{10 ** low:.3g}", fill=(0, 0, 0))
    draw_.text((left, bottom + 4), f"loss (log scale), {len(losses)} steps", fill=(0, 0, 0))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return (pixels.float() / 255.0)[None]
