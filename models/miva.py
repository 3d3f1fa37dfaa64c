"""MIVA motion adapters (the MIVA paper) as plain torch: the file format, the authors' layout, the math.

The file format (`motion-dials/miva`, version 1) is safetensors with string metadata:

    format          "motion-dials/miva"
    format_version  "1"
    base            the model trained on, "<family>-<kind>-<size>", e.g. "wan2.1-t2v-1.3b"
    motion          what the adapter animates, e.g. "horse running"
    subject         the word that finds the subject in the image (GroundingDINO prompt), e.g. "horse"
    dim, heads, blocks   the base model's width, attention heads and transformer blocks
    cfa_rank        rank r of the cross-frame attention's query and output projections
    prompt_rank     rank p of the implicit-prompt MLP, 0 when the adapter keeps the text cross-attention
    mask_stream     "true" when the adapter carries M-MIVA's mask stream

and, for every block i (d = dim):

    blocks.{i}.cfa.q.down [r, d], blocks.{i}.cfa.q.up [d, r]   low-rank change of the base query projection
    blocks.{i}.cfa.norm_q [d]                                  the adapter's RMSNorm gain on its query
    blocks.{i}.cfa.o.down [r, d], blocks.{i}.cfa.o.up [d, r]   output projection (zero-initialised)
    blocks.{i}.cfa.weighting.weight [2, d], .bias [2]          (lambda_0, lambda_1) from the time embedding
    blocks.{i}.prompt.down.weight [p, d], .bias [p]            implicit prompt, when prompt_rank > 0
    blocks.{i}.prompt.norm.weight [p], .bias [p]
    blocks.{i}.prompt.up.weight [d, p], .bias [d]              (zero-initialised)
    blocks.{i}.mask_cfa.*                                      as cfa.*, when mask_stream is true

What the tensors compute, per block, for the video tokens of F latent frames of T tokens each:

    x      the block's self-attention input (Wan: the modulated norm1 of the block input)
    query  = rope(rms_norm(W_q x + b_q + q.up(q.down(x))) * norm_q)   (W_q, b_q: the base's query)
    keys, values: the base self-attention's own (normalised, rotated keys; values), frozen
    frame f's queries attend jointly to [keys of frame 0 ; keys of frame max(f - 1, 0)], whose values
    are scaled by lambda_0 and lambda_1, (lambda_0, lambda_1) = softmax(weighting(silu(t_emb)) / 0.2)
    residual = o.up(o.down(attention)), added to the block output, times the adapter's weight.

The implicit prompt takes the place of the text cross-attention's attention result (before the base's
output projection): up(gelu(layer_norm(down(query)))), where query is the base cross-attention's own
normalised query, the frozen first projection every adapter of a stack shares.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .attention import QueryGroup, grouped_bias_attention, sdpa
from .checkpoint import read_tensors
from .mask_attention import score_groups

FORMAT = "motion-dials/miva"
FORMAT_VERSION = 1
WEIGHTING_TEMPERATURE = 0.2
NORM_EPS = 1e-6  # Wan's RMSNorm epsilon, used for the adapter's query and the prompt MLP's LayerNorm
BASE_PATTERN = re.compile(r"^(?P<family>[a-z]+[0-9.]*)-(?P<kind>[a-z0-9]+)-(?P<size>[0-9.]+b)$")


class AdapterFormatError(ValueError):
    pass


@dataclass(frozen=True)
class AdapterInfo:
    base: str
    motion: str
    subject: str
    dim: int
    heads: int
    blocks: int
    cfa_rank: int
    prompt_rank: int
    mask_stream: bool

    @property
    def family(self) -> str:
        """"wan2.1" for "wan2.1-t2v-1.3b"."""
        return self.base.split("-")[0]

    def to_metadata(self) -> dict[str, str]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["mask_stream"] = "true" if self.mask_stream else "false"
        return {"format": FORMAT, "format_version": str(FORMAT_VERSION), **{k: str(v) for k, v in values.items()}}

    @classmethod
    def from_metadata(cls, metadata: dict | None, source: str) -> AdapterInfo:
        metadata = metadata or {}
        if metadata.get("format") != FORMAT:
            raise AdapterFormatError(
                f"{source} is not a Motion Dials MIVA adapter (its metadata has no format '{FORMAT}'). An adapter "
                "from the MIVA authors' training code must be converted first: use the 'MIVA Convert' node or "
                "`python models/miva.py convert`."
            )
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise AdapterFormatError(
                f"{source} has format version {metadata.get('format_version')!r}; this Motion Dials reads version "
                f"{FORMAT_VERSION}. Update Motion Dials, or convert the adapter again."
            )
        missing = [f.name for f in fields(cls) if f.name not in metadata]
        if missing:
            raise AdapterFormatError(f"{source} lacks the metadata {', '.join(missing)}; convert it again.")
        try:
            info = cls(
                base=metadata["base"], motion=metadata["motion"], subject=metadata["subject"],
                **{name: int(metadata[name]) for name in ("dim", "heads", "blocks", "cfa_rank", "prompt_rank")},
                mask_stream={"true": True, "false": False}[metadata["mask_stream"]],
            )
        except (ValueError, KeyError) as error:
            raise AdapterFormatError(f"{source} has malformed metadata ({error}); convert it again.") from None
        info.check(source)
        return info

    def check(self, source: str) -> None:
        if not BASE_PATTERN.match(self.base):
            raise AdapterFormatError(
                f"{source}: base {self.base!r} is not of the form <family>-<kind>-<size>, e.g. 'wan2.1-t2v-1.3b'."
            )
        if min(self.dim, self.heads, self.blocks, self.cfa_rank) < 1 or self.prompt_rank < 0 or self.dim % self.heads:
            raise AdapterFormatError(
                f"{source}: impossible sizes (dim {self.dim}, heads {self.heads}, blocks {self.blocks}, cfa_rank "
                f"{self.cfa_rank}, prompt_rank {self.prompt_rank})."
            )


def expected_shapes(info: AdapterInfo) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the format, with its shape."""
    d, r, p = info.dim, info.cfa_rank, info.prompt_rank
    streams = ("cfa", "mask_cfa") if info.mask_stream else ("cfa",)
    shapes = {}
    for i in range(info.blocks):
        for stream in streams:
            shapes.update({
                f"blocks.{i}.{stream}.q.down": (r, d), f"blocks.{i}.{stream}.q.up": (d, r),
                f"blocks.{i}.{stream}.norm_q": (d,),
                f"blocks.{i}.{stream}.o.down": (r, d), f"blocks.{i}.{stream}.o.up": (d, r),
                f"blocks.{i}.{stream}.weighting.weight": (2, d), f"blocks.{i}.{stream}.weighting.bias": (2,),
            })
        if p:
            shapes.update({
                f"blocks.{i}.prompt.down.weight": (p, d), f"blocks.{i}.prompt.down.bias": (p,),
                f"blocks.{i}.prompt.norm.weight": (p,), f"blocks.{i}.prompt.norm.bias": (p,),
                f"blocks.{i}.prompt.up.weight": (d, p), f"blocks.{i}.prompt.up.bias": (d,),
            })
    return shapes


def tensors_per_block(info: AdapterInfo) -> int:
    return 7 * (2 if info.mask_stream else 1) + (6 if info.prompt_rank else 0)


def check_shapes(info: AdapterInfo, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise AdapterFormatError unless ``shapes`` (tensor name -> shape) are exactly the format's for ``info``.
    The counts are compared first, so metadata that declares a billion blocks costs nothing."""
    expected_count = info.blocks * tensors_per_block(info)
    if expected_count != len(shapes):
        raise AdapterFormatError(
            f"{source}: its metadata declares {info.blocks} blocks ({expected_count} tensors), but the file holds "
            f"{len(shapes)} tensors; the file is damaged or its metadata is wrong: convert it again."
        )
    expected = expected_shapes(info)
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise AdapterFormatError(f"{source} lacks {len(missing)} tensors its metadata calls for, first {missing[0]}.")
    unexpected = [name for name in shapes if name not in expected]
    if unexpected:
        raise AdapterFormatError(f"{source} has tensors its metadata does not describe, first {unexpected[0]}.")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise AdapterFormatError(f"{source}: {name} has shape {tuple(shapes[name])}, expected {shape}.")


def check_tensors(info: AdapterInfo, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise AdapterFormatError unless ``tensors`` holds exactly the format's names and shapes, as finite
    floating-point numbers."""
    check_shapes(info, {name: tuple(tensor.shape) for name, tensor in tensors.items()}, source)
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterFormatError(f"{source}: {name} is {tensor.dtype}, expected a floating-point type.")
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterFormatError(f"{source}: {name} holds NaN or infinite values; the file is damaged or came "
                                     "from a training run that diverged. Use another adapter, or train it again.")


@dataclass(frozen=True)
class CrossFrameWeights:
    q_down: torch.Tensor
    q_up: torch.Tensor
    norm_q: torch.Tensor
    o_down: torch.Tensor
    o_up: torch.Tensor
    weighting_weight: torch.Tensor
    weighting_bias: torch.Tensor

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str) -> CrossFrameWeights:
        return cls(tensors[f"{prefix}.q.down"], tensors[f"{prefix}.q.up"], tensors[f"{prefix}.norm_q"],
                   tensors[f"{prefix}.o.down"], tensors[f"{prefix}.o.up"],
                   tensors[f"{prefix}.weighting.weight"], tensors[f"{prefix}.weighting.bias"])


@dataclass(frozen=True)
class ImplicitPromptWeights:
    down_weight: torch.Tensor
    down_bias: torch.Tensor
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    up_weight: torch.Tensor
    up_bias: torch.Tensor

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str) -> ImplicitPromptWeights:
        return cls(*(tensors[f"{prefix}.{name}"] for name in (
            "down.weight", "down.bias", "norm.weight", "norm.bias", "up.weight", "up.bias")))


@dataclass(frozen=True)
class BlockAdapter:
    cfa: CrossFrameWeights
    prompt: ImplicitPromptWeights | None
    mask_cfa: CrossFrameWeights | None

    def to(self, device, dtype) -> BlockAdapter:
        def move(weights):
            if weights is None:
                return None
            return type(weights)(*(t.to(device=device, dtype=dtype) for t in vars(weights).values()))

        return BlockAdapter(move(self.cfa), move(self.prompt), move(self.mask_cfa))


@dataclass(frozen=True)
class Adapter:
    name: str
    info: AdapterInfo
    blocks: tuple[BlockAdapter, ...]

    @classmethod
    def from_tensors(cls, name: str, info: AdapterInfo, tensors: dict[str, torch.Tensor]) -> Adapter:
        check_tensors(info, tensors, name)
        return cls(name, info, tuple(
            BlockAdapter(
                CrossFrameWeights.from_tensors(tensors, f"blocks.{i}.cfa"),
                ImplicitPromptWeights.from_tensors(tensors, f"blocks.{i}.prompt") if info.prompt_rank else None,
                CrossFrameWeights.from_tensors(tensors, f"blocks.{i}.mask_cfa") if info.mask_stream else None,
            )
            for i in range(info.blocks)
        ))


def _read_header(handle, source: str) -> AdapterInfo:
    """The adapter's info, its tensors' sizes checked against it from the file's header (nothing read yet)."""
    info = AdapterInfo.from_metadata(handle.metadata(), source)
    check_shapes(info, {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}, source)
    return info


def _damaged(source: str, error: Exception) -> AdapterFormatError:
    return AdapterFormatError(f"{source} cannot be read as safetensors ({error}); the file is damaged or incomplete: "
                              "download or convert it again.")


def read_adapter_info(path: str | Path, name: str | None = None) -> AdapterInfo:
    """What an adapter file declares, checked against its header, without reading a tensor."""
    source = name or Path(path).name
    try:
        with safe_open(str(path), framework="pt") as handle:
            return _read_header(handle, source)
    except (SafetensorError, OSError) as error:
        raise _damaged(source, error) from None


def load_adapter(path: str | Path, name: str | None = None) -> Adapter:
    """Read and check an adapter file of our format; AdapterFormatError names what is wrong."""
    source = name or Path(path).name
    try:
        with safe_open(str(path), framework="pt") as handle:
            info = _read_header(handle, source)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise _damaged(source, error) from None
    return Adapter.from_tensors(source, info, tensors)


def save_adapter(path: str | Path, info: AdapterInfo, tensors: dict[str, torch.Tensor]) -> None:
    check_tensors(info, tensors, str(path))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=info.to_metadata())


# The authors' training outputs: plain state dicts of the trainable modules, named as this pack read the MIVA paper.
# Per block i, our name <- theirs (after any "model." / "diffusion_model." / "module." prefix):
AUTHORS_NAMES = {
    "cfa.q.down": "blocks.{i}.self_attn.i2v_adapter.q.down.weight",
    "cfa.q.up": "blocks.{i}.self_attn.i2v_adapter.q.up.weight",
    "cfa.norm_q": "blocks.{i}.self_attn.i2v_adapter.norm_q.weight",
    "cfa.o.down": "blocks.{i}.self_attn.i2v_adapter.o.down.weight",
    "cfa.o.up": "blocks.{i}.self_attn.i2v_adapter.o.up.weight",
    "cfa.weighting.weight": "blocks.{i}.self_attn.weight_module.linear.weight",
    "cfa.weighting.bias": "blocks.{i}.self_attn.weight_module.linear.bias",
    "prompt.down.weight": "blocks.{i}.cross_attn.sCA.CA2.weight",
    "prompt.down.bias": "blocks.{i}.cross_attn.sCA.CA2.bias",
    "prompt.norm.weight": "blocks.{i}.cross_attn.sCA.CA_norm.weight",
    "prompt.norm.bias": "blocks.{i}.cross_attn.sCA.CA_norm.bias",
    "prompt.up.weight": "blocks.{i}.cross_attn.sCA.CA3.weight",
    "prompt.up.bias": "blocks.{i}.cross_attn.sCA.CA3.bias",
}
# Frozen copies of the base (the CFA's keys and values are the base's own): accepted and dropped.
AUTHORS_FROZEN = re.compile(r"i2v_adapter\.(k|v|norm_k)\.")
AUTHORS_MASK_STREAM = "mask_"  # their mask stream: the same modules under "mask_i2v_adapter" / "mask_weight_module"
AUTHORS_PREFIXES = ("module.", "model.", "diffusion_model.")


def read_training_output(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from the authors' code: `.safetensors`, or `.pt` / `.pth` read without running any code."""
    return read_tensors(path, AdapterFormatError, "ask for the adapter as safetensors.", wrappers=("state_dict",))


def convert_authors_layout(state: dict[str, torch.Tensor], *, base: str, motion: str, subject: str,
                           heads: int, source: str = "the training output") -> tuple[AdapterInfo, dict]:
    """Our format from the authors' state dict; the sizes come from the tensors themselves."""
    state = {_strip_prefix(key): value for key, value in state.items()}
    block_numbers = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
    if not block_numbers:
        raise AdapterFormatError(f"{source} has no 'blocks.<i>.' tensors: it is not a MIVA training output for a DiT.")
    blocks = len(block_numbers)
    if block_numbers != set(range(blocks)):
        raise AdapterFormatError(f"{source} numbers its blocks {min(block_numbers)} to {max(block_numbers)} with "
                                 f"gaps ({blocks} blocks): it is not a complete MIVA training output.")
    first_q_down = state.get(AUTHORS_NAMES["cfa.q.down"].format(i=0))
    first_prompt = state.get(AUTHORS_NAMES["prompt.down.weight"].format(i=0))
    if first_q_down is None:
        raise AdapterFormatError(f"{source} lacks {AUTHORS_NAMES['cfa.q.down'].format(i=0)}.")
    mask_stream = any(AUTHORS_MASK_STREAM + "i2v_adapter" in key for key in state)
    info = AdapterInfo(base=base, motion=motion, subject=subject, dim=first_q_down.shape[1], heads=heads,
                       blocks=blocks, cfa_rank=first_q_down.shape[0],
                       prompt_rank=0 if first_prompt is None else first_prompt.shape[0], mask_stream=mask_stream)
    info.check(source)
    names = {}
    for i in range(blocks):
        for ours, theirs in AUTHORS_NAMES.items():
            if ours.startswith("prompt.") and not info.prompt_rank:
                continue
            names[f"blocks.{i}.{ours}"] = theirs.format(i=i)
            if mask_stream and ours.startswith("cfa."):
                mask_theirs = theirs.format(i=i).replace("i2v_adapter", "mask_i2v_adapter").replace(
                    "weight_module", "mask_weight_module")
                names[f"blocks.{i}.mask_{ours}"] = mask_theirs
    missing = [theirs for theirs in names.values() if theirs not in state]
    if missing:
        raise AdapterFormatError(f"{source} lacks {len(missing)} expected tensors, first {missing[0]}.")
    used = set(names.values())
    unknown = [key for key in state if key not in used and not AUTHORS_FROZEN.search(key)]
    if unknown:
        raise AdapterFormatError(f"{source} has tensors this converter does not know, first {unknown[0]}.")
    tensors = {ours: state[theirs] for ours, theirs in names.items()}
    check_tensors(info, tensors, source)
    return info, tensors


def _strip_prefix(key: str) -> str:
    for prefix in AUTHORS_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


# The math. Shapes: B batch, F frames, T tokens per frame, H heads, D head size, d = H * D.

def low_rank(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.linear(F.linear(x, down), up)


def frame_weights(weights: CrossFrameWeights, time_embedding: torch.Tensor) -> torch.Tensor:
    """(lambda_0, lambda_1) per batch entry, [B, 2], from the base's time embedding [B, d]."""
    logits = F.linear(F.silu(time_embedding), weights.weighting_weight, weights.weighting_bias)
    return torch.softmax(logits / WEIGHTING_TEMPERATURE, dim=-1)


LEAD_FRAMES = 2  # frames 0 and 1: both look back at frame 0 only


@dataclass(frozen=True)
class CrossFrameBias:
    """A subject-mask bias (M-MIVA) for the two calls of ``ReferenceFrames.attend``."""

    lead: list[QueryGroup]  # the lead frames' queries against frame 0's T keys
    rest: list[QueryGroup]  # one later frame's T queries against its 2T keys, the same for every later frame


@dataclass(frozen=True)
class ReferenceFrames:
    """The base's keys and values gathered once per block for every adapter, laid out as SDPA reads them.

    Frame f attends to [frame 0 ; frame max(f - 1, 0)]. For frames 0 and 1 that is frame 0 twice, and attention
    over a key set written twice equals attention over it once with values weighted (lambda_0 + lambda_1) / 2:
    so those lead frames attend to frame 0's T keys in one call, and frames 2.. to their 2T keys in another.
    """

    first_keys: torch.Tensor  # [B, H, T, D]
    first_values: torch.Tensor  # [B, H, T, D]
    keys: torch.Tensor  # [B * (F - 2), H, 2T, D], frames 2..
    values: torch.Tensor  # [B, F - 2, H, 2T, D]
    frames: int
    heads: int

    @classmethod
    def gather(cls, keys: torch.Tensor, values: torch.Tensor, frames: int, heads: int) -> ReferenceFrames:
        later = max(frames - LEAD_FRAMES, 0)

        def split(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            batch, tokens, width = tensor.shape
            per_frame = tokens // frames
            by_frame = tensor.reshape(batch, frames, per_frame, heads, width // heads).transpose(2, 3)
            # Slice copies into one buffer: cheaper than indexing, concatenating and transposing.
            gathered = tensor.new_empty(batch, later, heads, 2 * per_frame, width // heads)
            gathered[:, :, :, :per_frame] = by_frame[:, :1]
            gathered[:, :, :, per_frame:] = by_frame[:, LEAD_FRAMES - 1:-1]
            return by_frame[:, 0].contiguous(), gathered

        first_keys, later_keys = split(keys)
        first_values, later_values = split(values)
        return cls(first_keys, first_values, later_keys.flatten(0, 1), later_values, frames, heads)

    def attend(self, query: torch.Tensor, lambdas: torch.Tensor, bias: CrossFrameBias | None = None) -> torch.Tensor:
        """Cross-frame attention of ``query`` [B, F*T, d] with frame weights [B, 2]; returns [B, F*T, d]."""
        batch, tokens, width = query.shape
        per_frame = tokens // self.frames
        lead = min(self.frames, LEAD_FRAMES) * per_frame
        lambdas = lambdas.to(self.first_values.dtype)
        by_head = query.unflatten(-1, (self.heads, width // self.heads))
        lead_values = self.first_values * (lambdas.sum(dim=1) / 2).view(batch, 1, 1, 1)
        parts = [_attention(by_head[:, :lead].transpose(1, 2), self.first_keys, lead_values, self.heads,
                            None if bias is None else bias.lead)]
        if lead < tokens:
            # lambda_0 on frame 0's values, lambda_1 on the previous frame's: one multiply over the gathered values.
            values = self.values.unflatten(3, (2, per_frame)) * lambdas.view(batch, 1, 1, 2, 1, 1)
            q = by_head[:, lead:].reshape(-1, per_frame, self.heads, width // self.heads).transpose(1, 2)
            parts.append(_attention(q, self.keys, values.flatten(3, 4).flatten(0, 1), self.heads,
                                    None if bias is None else bias.rest))
        return torch.cat([part.transpose(1, 2).reshape(batch, -1, width) for part in parts], dim=1)


def cross_frame_bias(frame_scores: torch.Tensor, frames: int) -> CrossFrameBias:
    """A subject mask's bias on the cross-frame attention when every frame takes the one mask ``frame_scores`` [T]:
    the lead frames' queries against frame 0's keys, a later frame's against [frame 0 ; previous frame]."""
    lead = frame_scores.repeat(min(frames, LEAD_FRAMES))
    return CrossFrameBias(score_groups(lead, frame_scores), score_groups(frame_scores, frame_scores.repeat(2)))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
               groups: list[QueryGroup] | None) -> torch.Tensor:
    """SDPA over [n, H, L, D] tensors, biased by ``groups`` when given."""
    if groups is None:
        return F.scaled_dot_product_attention(q, k, v)
    return grouped_bias_attention(sdpa, q, k, v, heads, groups, skip_reshape=True, skip_output_reshape=True)


def adapter_query(x: torch.Tensor, base_query: torch.Tensor, weights: CrossFrameWeights,
                  rope: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The adapter's query from the self-attention input ``x`` and the base's projection ``W_q x + b_q``."""
    query = base_query + low_rank(x, weights.q_down, weights.q_up)
    return rope(F.rms_norm(query, weights.norm_q.shape, weights.norm_q, eps=NORM_EPS))


def cross_frame_residual(x: torch.Tensor, base_query: torch.Tensor, frames: ReferenceFrames,
                         time_embedding: torch.Tensor, weights: CrossFrameWeights,
                         rope: Callable[[torch.Tensor], torch.Tensor],
                         mask_bias: CrossFrameBias | None = None) -> torch.Tensor:
    """One adapter's cross-frame attention output for the video tokens, [B, F*T, d] (masked by ``mask_bias``)."""
    attention = frames.attend(adapter_query(x, base_query, weights, rope), frame_weights(weights, time_embedding),
                              mask_bias)
    return low_rank(attention, weights.o_down, weights.o_up)


def implicit_prompt(query: torch.Tensor, weights: ImplicitPromptWeights) -> torch.Tensor:
    """The MLP that stands in for the text cross-attention's attention result."""
    hidden = F.linear(query, weights.down_weight, weights.down_bias)
    hidden = F.layer_norm(hidden, weights.norm_weight.shape, weights.norm_weight, weights.norm_bias, eps=NORM_EPS)
    return F.linear(F.gelu(hidden), weights.up_weight, weights.up_bias)


def _convert_command(args) -> None:
    state = read_training_output(args.source)
    info, tensors = convert_authors_layout(state, base=args.base, motion=args.motion, subject=args.subject,
                                           heads=args.heads, source=Path(args.source).name)
    save_adapter(args.destination, info, tensors)
    size = sum(t.numel() for t in tensors.values())
    print(f"wrote {args.destination}: {info.base}, '{info.motion}' (subject '{info.subject}'), {info.blocks} blocks, "
          f"cfa rank {info.cfa_rank}, prompt rank {info.prompt_rank}, {size / 1e6:.1f} M parameters")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="MIVA adapters: convert the authors' training outputs to the "
                                     "Motion Dials format.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="a .pt / .safetensors training output -> our .safetensors")
    convert.add_argument("source", help="the authors' training output (.pt read with weights_only, or .safetensors)")
    convert.add_argument("destination", help="the adapter file to write (put it in ComfyUI/models/miva/)")
    convert.add_argument("--base", default="wan2.1-t2v-1.3b", help="the base model, e.g. wan2.1-t2v-1.3b")
    convert.add_argument("--heads", type=int, default=12, help="the base model's attention heads (12 for 1.3B)")
    convert.add_argument("--motion", required=True, help="what the adapter animates, e.g. 'horse running'")
    convert.add_argument("--subject", required=True, help="the subject's word for finding it in the image, e.g. horse")
    args = parser.parse_args(argv)
    try:
        _convert_command(args)
    except AdapterFormatError as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
