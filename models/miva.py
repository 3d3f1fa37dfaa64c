"""MIVA motion adapters (the MIVA paper) as plain torch: the file format, the authors' layout, the math.

The file format (`motion-dials/miva`, version 2) is safetensors with string metadata:

    format          "motion-dials/miva"
    format_version  "2"
    base            the model trained on, "<family>-<kind>-<size>", e.g. "wan2.1-t2v-1.3b"
    motion          what the adapter animates, e.g. "horse running"
    subject         the word that finds the subject in the image (GroundingDINO prompt), e.g. "horse"
    dim, heads, blocks   the base model's width, attention heads and transformer blocks
    query_rank      rank of the cross-frame attention's query change; 0: a full query projection
    output_rank     rank of its output projection; 0: a full matrix
    output_bias     "true" when the output projection has a bias
    prompt_rank     rank p of the implicit-prompt MLP, 0 when the adapter keeps the text cross-attention
    prompt_bias     "true" when the MLP's two linears have biases
    prompt_query_bias  "true" when the MLP's frozen query (the base cross-attention's) keeps its bias
    mask_stream     "true" when the adapter carries M-MIVA's mask-stream projections
    training.*      what the adapter was trained from (steps, clips, resolution, ...), when known

and, for every block i (d = dim, r = query_rank, s = output_rank):

    blocks.{i}.cfa.q.down [r, d], .q.up [d, r]        low-rank change of the block's query projection, or
    blocks.{i}.cfa.q.weight [d, d], .q.bias [d]       a full query projection of its own (query_rank 0)
    blocks.{i}.cfa.norm_q [d]                         the RMSNorm gain on its query
    blocks.{i}.cfa.o.down [s, d], .o.up [d, s], or .o.weight [d, d]; .o.bias [d] with output_bias
    blocks.{i}.cfa.weighting.weight [2, d], .bias [2] (lambda, 1 - lambda) from the time embedding
    blocks.{i}.prompt.down.weight [p, d], .norm.weight [p], .norm.bias [p], .up.weight [d, p]
                                                      (.down.bias [p], .up.bias [d] with prompt_bias)
    blocks.{i}.mask.q.*, blocks.{i}.mask.o.*          the mask stream's query and output (q_m, o_m), in
                                                      the forms of cfa.q and cfa.o, when mask_stream is true

What they compute inside one Wan block (the MIVA paper, "Few-Shot-Based Modular Image-to-Video Adapter for
Diffusion Models", its method section, as the authors' Wan code wires it), x the residual stream after the
self-attention's residual, on the video tokens of F latent frames of T tokens each:

    query  = rms_norm(W_q x + b_q + q.up(q.down(x))) * norm_q       (W_q, b_q: the block's self-attention query)
    keys   = norm_k(W_k x + b_k), values = W_v x + b_v               (the block's own k, v, norm_k, on this x)
    no RoPE; frame f's queries attend to the keys of [frame 0 ; frame max(f - 1, 0)], whose values are scaled by
    lambda and 1 - lambda, (lambda, 1 - lambda) = softmax(weighting(silu(t_emb)) / 0.2)
    x      = x + sum_k w_k * o_k(attention_k), before the cross-attention, which with the feed-forward sees it.

The implicit prompt replaces the whole cross-attention module: its output, added to the stream directly, is
sum_k w_k * up_k(gelu(layer_norm_k(down_k(norm_q_ca(W_q_ca norm3(x)))))), with the base cross-attention's query
projection and norm shared by every adapter; the text and the base's output projection are not used.

Version 1 files (made before the authors' code was read) wired the cross-frame attention on the self-attention's
input with RoPE and the base's keys; their weights cannot run right in version 2 and are refused.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .attention import QueryGroup, grouped_bias_attention, sdpa
from .checkpoint import read_tensors
from .mask_attention import score_groups

FORMAT = "motion-dials/miva"
FORMAT_VERSION = 2
WEIGHTING_TEMPERATURE = 0.2
QUERY_NORM_EPS = 1e-6  # the block's RMSNorm epsilon, which the authors' adapter query norm takes
PROMPT_NORM_EPS = 1e-5  # the authors' implicit-prompt LayerNorm is torch's default
BASE_PATTERN = re.compile(r"^(?P<family>[a-z]+[0-9.]*)-(?P<kind>[a-z0-9]+)-(?P<size>[0-9.]+b)$")
DETAIL_PREFIX = "training."
SIZES = ("dim", "heads", "blocks", "query_rank", "output_rank", "prompt_rank")
SWITCHES = ("output_bias", "prompt_bias", "prompt_query_bias", "mask_stream")
TEXTS = ("base", "motion", "subject")


class AdapterFormatError(ValueError):
    pass


def _flag(value: bool) -> str:
    return "true" if value else "false"


@dataclass(frozen=True)
class AdapterInfo:
    base: str
    motion: str
    subject: str
    dim: int
    heads: int
    blocks: int
    query_rank: int
    output_rank: int
    output_bias: bool
    prompt_rank: int
    prompt_bias: bool
    prompt_query_bias: bool
    mask_stream: bool
    details: dict = field(default_factory=dict, compare=False, hash=False)  # training facts, str -> str

    @property
    def family(self) -> str:
        """"wan2.1" for "wan2.1-t2v-1.3b"."""
        return self.base.split("-")[0]

    def to_metadata(self) -> dict[str, str]:
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        metadata.update({name: str(getattr(self, name)) for name in TEXTS + SIZES})
        metadata.update({name: _flag(getattr(self, name)) for name in SWITCHES})
        metadata.update({DETAIL_PREFIX + key: str(value) for key, value in self.details.items()})
        return metadata

    @classmethod
    def from_metadata(cls, metadata: dict | None, source: str) -> AdapterInfo:
        metadata = metadata or {}
        if metadata.get("format") != FORMAT:
            raise AdapterFormatError(
                f"{source} is not a Motion Dials MIVA adapter (its metadata has no format '{FORMAT}'). An adapter "
                "from the MIVA authors' training code must be converted first: use the 'MIVA Convert' node or "
                "`python -m motion_dials.models.miva convert`."
            )
        version = metadata.get("format_version")
        if version == "1":
            raise AdapterFormatError(
                f"{source} is a version 1 MIVA adapter. Version 1 ran the cross-frame attention on the "
                "self-attention's input with the base's keys, a misreading of the paper that the authors' code "
                "corrects; its weights would act wrongly in the corrected wiring. Convert the training output "
                "again with MIVA Convert, or train the adapter again with MIVA Train."
            )
        if version != str(FORMAT_VERSION):
            raise AdapterFormatError(
                f"{source} has format version {version!r}; this Motion Dials reads version {FORMAT_VERSION}. "
                "Update Motion Dials, or convert the adapter again."
            )
        missing = [name for name in TEXTS + SIZES + SWITCHES if name not in metadata]
        if missing:
            raise AdapterFormatError(f"{source} lacks the metadata {', '.join(missing)}; convert it again.")
        try:
            info = cls(
                **{name: metadata[name] for name in TEXTS},
                **{name: int(metadata[name]) for name in SIZES},
                **{name: {"true": True, "false": False}[metadata[name]] for name in SWITCHES},
                details={key[len(DETAIL_PREFIX):]: value for key, value in metadata.items()
                         if key.startswith(DETAIL_PREFIX)},
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
        if min(self.dim, self.heads, self.blocks) < 1 or min(self.query_rank, self.output_rank, self.prompt_rank) < 0 \
                or self.dim % self.heads:
            raise AdapterFormatError(
                f"{source}: impossible sizes (dim {self.dim}, heads {self.heads}, blocks {self.blocks}, query rank "
                f"{self.query_rank}, output rank {self.output_rank}, prompt rank {self.prompt_rank})."
            )


def _projection_shapes(prefix: str, rank: int, dim: int, bias: bool) -> dict[str, tuple[int, ...]]:
    """A d -> d projection stored as low-rank factors (rank > 0) or a full matrix (rank 0)."""
    shapes = {f"{prefix}.down": (rank, dim), f"{prefix}.up": (dim, rank)} if rank else {f"{prefix}.weight": (dim, dim)}
    if bias:
        shapes[f"{prefix}.bias"] = (dim,)
    return shapes


def block_shapes(info: AdapterInfo, i: int) -> dict[str, tuple[int, ...]]:
    """The tensor names of block ``i`` with their shapes."""
    d, p = info.dim, info.prompt_rank
    streams = ("cfa", "mask") if info.mask_stream else ("cfa",)
    shapes = {}
    for stream in streams:
        # A full query projection of the adapter's own carries its bias; a low-rank change keeps the block's.
        shapes.update(_projection_shapes(f"blocks.{i}.{stream}.q", info.query_rank, d, not info.query_rank))
        shapes.update(_projection_shapes(f"blocks.{i}.{stream}.o", info.output_rank, d, info.output_bias))
    shapes.update({f"blocks.{i}.cfa.norm_q": (d,), f"blocks.{i}.cfa.weighting.weight": (2, d),
                   f"blocks.{i}.cfa.weighting.bias": (2,)})
    if p:
        shapes.update({f"blocks.{i}.prompt.down.weight": (p, d), f"blocks.{i}.prompt.norm.weight": (p,),
                       f"blocks.{i}.prompt.norm.bias": (p,), f"blocks.{i}.prompt.up.weight": (d, p)})
        if info.prompt_bias:
            shapes.update({f"blocks.{i}.prompt.down.bias": (p,), f"blocks.{i}.prompt.up.bias": (d,)})
    return shapes


def expected_shapes(info: AdapterInfo) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the format, with its shape."""
    return {name: shape for i in range(info.blocks) for name, shape in block_shapes(info, i).items()}


def check_shapes(info: AdapterInfo, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise AdapterFormatError unless ``shapes`` (tensor name -> shape) are exactly the format's for ``info``.
    The counts are compared first, so metadata that declares a billion blocks costs nothing."""
    expected_count = info.blocks * len(block_shapes(info, 0))
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
        if not bool(torch.isfinite(tensor.detach()).all()):
            raise AdapterFormatError(f"{source}: {name} holds NaN or infinite values; the file is damaged or came "
                                     "from a training run that diverged. Use another adapter, or train it again.")


@dataclass(frozen=True)
class Projection:
    """A d -> d map: low-rank factors (``down``, ``up``) or a full ``weight``; an optional ``bias``."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str) -> Projection:
        return cls(*(tensors.get(f"{prefix}.{name}") for name in ("down", "up", "weight", "bias")))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        out = F.linear(F.linear(x, self.down), self.up)
        return out if self.bias is None else out + self.bias


@dataclass(frozen=True)
class CrossFrameWeights:
    query: Projection  # the change of the block's query projection, or a full one (``replaces_query``)
    norm_q: torch.Tensor
    output: Projection
    weighting_weight: torch.Tensor
    weighting_bias: torch.Tensor

    @property
    def replaces_query(self) -> bool:
        return self.query.weight is not None


@dataclass(frozen=True)
class ImplicitPromptWeights:
    down_weight: torch.Tensor
    down_bias: torch.Tensor | None
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    up_weight: torch.Tensor
    up_bias: torch.Tensor | None


@dataclass(frozen=True)
class BlockAdapter:
    cfa: CrossFrameWeights
    prompt: ImplicitPromptWeights | None
    mask_cfa: CrossFrameWeights | None  # the mask stream: its own query and output, the rest shared

    def to(self, device, dtype) -> BlockAdapter:
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device=device, dtype=dtype)
            if value is None:
                return None
            return type(value)(*(move(part) for part in vars(value).values()))

        return move(self)

    @classmethod
    def from_tensors(cls, info: AdapterInfo, tensors: dict, i: int) -> BlockAdapter:
        prefix = f"blocks.{i}"

        def cross_frame(stream: str) -> CrossFrameWeights:
            return CrossFrameWeights(Projection.from_tensors(tensors, f"{prefix}.{stream}.q"),
                                     tensors[f"{prefix}.cfa.norm_q"],
                                     Projection.from_tensors(tensors, f"{prefix}.{stream}.o"),
                                     tensors[f"{prefix}.cfa.weighting.weight"], tensors[f"{prefix}.cfa.weighting.bias"])

        prompt = None
        if info.prompt_rank:
            prompt = ImplicitPromptWeights(*(tensors.get(f"{prefix}.prompt.{name}") for name in (
                "down.weight", "down.bias", "norm.weight", "norm.bias", "up.weight", "up.bias")))
        return cls(cross_frame("cfa"), prompt, cross_frame("mask") if info.mask_stream else None)


@dataclass(frozen=True)
class Adapter:
    name: str
    info: AdapterInfo
    blocks: tuple[BlockAdapter, ...]

    @classmethod
    def from_tensors(cls, name: str, info: AdapterInfo, tensors: dict[str, torch.Tensor]) -> Adapter:
        """The adapter over ``tensors`` themselves (no copies: a training run's parameters stay its leaves)."""
        check_tensors(info, tensors, name)
        return cls(name, info, tuple(BlockAdapter.from_tensors(info, tensors, i) for i in range(info.blocks)))


def initial_tensors(info: AdapterInfo, diffusion_model, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A fresh adapter for ``diffusion_model`` (a Wan model), float32 on the CPU, initialised as the authors do:
    the query starts as the block's own (its change zero, or a copy of the projection), the query gain as the
    block's, the output projections at zero so training starts from the base model; the low-rank down-factors,
    the frame weighting and the prompt's first linear as torch's Linear initialises them."""
    tensors = {}

    def linear_init(out_features: int, in_features: int) -> torch.Tensor:
        bound = 1.0 / in_features ** 0.5  # torch.nn.Linear's default
        return (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound

    for i in range(info.blocks):
        attention = diffusion_model.blocks[i].self_attn
        for name, shape in block_shapes(info, i).items():
            part = name.split(".", 2)[2]
            if part.endswith("q.weight"):
                value = attention.q.weight
            elif part.endswith("q.bias"):
                value = attention.q.bias
            elif part == "cfa.norm_q":
                value = attention.norm_q.weight
            elif part.endswith(("q.down", "o.down", "weighting.weight", "prompt.down.weight")):
                value = linear_init(*shape)
            elif part in ("cfa.weighting.bias", "prompt.down.bias"):
                value = linear_init(shape[0], info.dim)[:, 0]
            elif part == "prompt.norm.weight":
                value = torch.ones(shape)
            else:  # the query change's up-factor and every output part: zero
                value = torch.zeros(shape)
            tensors[name] = value.detach().to(device="cpu", dtype=torch.float32, copy=True)
    return tensors


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
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=info.to_metadata())


# The authors' training outputs: plain state dicts of the trainable parameters (their `diffsynth` Wan code), after
# any "model." / "diffusion_model." / "module." prefix. Per block i, the CFA is `blocks.{i}.i2v_adapter` (q, o and
# the mask stream's q_m, o_m as full Linears or LoRA-factored by PEFT; norm_q; weight_module.linear) and the
# implicit prompt `blocks.{i}.cross_attn` (CA2, CA_norm, CA3).
AUTHORS_PROJECTIONS = {"cfa.q": "i2v_adapter.q", "cfa.o": "i2v_adapter.o",
                       "mask.q": "i2v_adapter.q_m", "mask.o": "i2v_adapter.o_m"}
AUTHORS_TENSORS = {
    "cfa.norm_q": "i2v_adapter.norm_q.weight",
    "cfa.weighting.weight": "i2v_adapter.weight_module.linear.weight",
    "cfa.weighting.bias": "i2v_adapter.weight_module.linear.bias",
    "prompt.down.weight": "cross_attn.CA2.weight", "prompt.down.bias": "cross_attn.CA2.bias",
    "prompt.norm.weight": "cross_attn.CA_norm.weight", "prompt.norm.bias": "cross_attn.CA_norm.bias",
    "prompt.up.weight": "cross_attn.CA3.weight", "prompt.up.bias": "cross_attn.CA3.bias",
}
# Frozen copies of the base (the CFA's k, v, norm_k; the prompt's query and norm; PEFT's base layers), which the
# pack takes from the model itself: accepted and dropped.
AUTHORS_FROZEN = re.compile(r"i2v_adapter\.(k|v|norm_k)\.|\.base_layer\.|cross_attn\.(q|norm_q)\.")
AUTHORS_UNSUPPORTED = {
    "cross_attn.CA4": "an implicit prompt with an extra output projection (use_out)",
    "cross_attn_b.": "a background implicit prompt (CA mask guidance)",
    "cross_attn.CA2.0.": "several implicit prompts in one file",
}
AUTHORS_PREFIXES = ("module.", "model.", "diffusion_model.")
LORA_FACTORS = (("lora_A.default.weight", "lora_B.default.weight"), ("lora_A.weight", "lora_B.weight"))


def read_training_output(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from the authors' code: `.safetensors`, or `.pt` / `.pth` read without running any code."""
    return read_tensors(path, AdapterFormatError, "ask for the adapter as safetensors.", wrappers=("state_dict",))


def _authors_projection(state: dict, theirs: str, lora_alpha: float | None, source: str):
    """Our tensors of one projection of theirs, and its rank (0: full), or None where the file has none."""
    for down_name, up_name in LORA_FACTORS:
        down, up = state.get(f"{theirs}.{down_name}"), state.get(f"{theirs}.{up_name}")
        if down is not None and up is not None:
            rank = down.shape[0]
            scale = (lora_alpha if lora_alpha is not None else rank) / rank  # PEFT scales by alpha / rank
            return {"down": down, "up": up * scale}, rank, False
    weight = state.get(f"{theirs}.weight")
    if weight is None:
        return None
    parts = {"weight": weight}
    if f"{theirs}.bias" in state:
        parts["bias"] = state[f"{theirs}.bias"]
    return parts, 0, "bias" in parts


def convert_authors_layout(state: dict[str, torch.Tensor], *, base: str, motion: str, subject: str, heads: int,
                           lora_alpha: float | None = None, source: str = "the training output",
                           details: dict | None = None) -> tuple[AdapterInfo, dict]:
    """Our format from the authors' state dict; the sizes and forms come from the tensors themselves.
    ``lora_alpha``: PEFT's alpha of a LoRA-factored run (the file does not hold it); None reads it as the rank."""
    state = {_strip_prefix(key): value for key, value in state.items()}
    for marker, what in AUTHORS_UNSUPPORTED.items():
        if any(marker in key for key in state):
            raise AdapterFormatError(f"{source} holds {what}, which Motion Dials does not run yet.")
    block_numbers = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
    if not block_numbers:
        raise AdapterFormatError(f"{source} has no 'blocks.<i>.' tensors: it is not a MIVA training output for a DiT.")
    blocks = len(block_numbers)
    if block_numbers != set(range(blocks)):
        raise AdapterFormatError(f"{source} numbers its blocks {min(block_numbers)} to {max(block_numbers)} with "
                                 f"gaps ({blocks} blocks): it is not a complete MIVA training output.")
    tensors, forms = {}, {}
    for i in range(blocks):
        for ours, theirs in AUTHORS_PROJECTIONS.items():
            found = _authors_projection(state, f"blocks.{i}.{theirs}", lora_alpha, source)
            if found is None:
                continue
            parts, rank, bias = found
            forms.setdefault(ours, set()).add((rank, bias))
            for part, value in parts.items():
                tensors[f"blocks.{i}.{ours}.{part}"] = value
        for ours, theirs in AUTHORS_TENSORS.items():
            if f"blocks.{i}.{theirs}" in state:
                tensors[f"blocks.{i}.{ours}"] = state[f"blocks.{i}.{theirs}"]
    unknown = [key for key in state if not AUTHORS_FROZEN.search(key) and not _authors_name(key)]
    if unknown:
        raise AdapterFormatError(f"{source} has tensors this converter does not know, first {unknown[0]}.")
    for ours in ("cfa.q", "cfa.o"):
        if ours not in forms:
            raise AdapterFormatError(f"{source} lacks blocks.0.{AUTHORS_PROJECTIONS[ours]}: the cross-frame "
                                     "attention's query and output must both have been trained.")
    for ours, seen in forms.items():
        if len(seen) != 1:
            raise AdapterFormatError(f"{source}: {AUTHORS_PROJECTIONS[ours]} changes form or rank between blocks.")
    (query_rank, _), = forms["cfa.q"]
    (output_rank, output_bias), = forms["cfa.o"]
    mask_stream = "mask.q" in forms or "mask.o" in forms
    if mask_stream and (forms.get("mask.q") != forms["cfa.q"] or forms.get("mask.o") != forms["cfa.o"]):
        raise AdapterFormatError(f"{source}: the mask stream's q_m / o_m must both be there, in the forms of q / o.")
    first_prompt = tensors.get("blocks.0.prompt.down.weight")
    prompt_bias = "blocks.0.prompt.down.bias" in tensors
    dim = tensors["blocks.0.cfa.norm_q"].shape[0] if "blocks.0.cfa.norm_q" in tensors else \
        state[next(k for k in state if k.startswith("blocks.0.i2v_adapter.o"))].shape[0]
    info = AdapterInfo(base=base, motion=motion, subject=subject, dim=dim, heads=heads, blocks=blocks,
                       query_rank=query_rank, output_rank=output_rank, output_bias=output_bias,
                       prompt_rank=0 if first_prompt is None else first_prompt.shape[0], prompt_bias=prompt_bias,
                       # the authors' implicit prompt has one bias switch for its query and its two linears
                       prompt_query_bias=prompt_bias, mask_stream=mask_stream, details=dict(details or {}))
    info.check(source)
    expected = expected_shapes(info)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise AdapterFormatError(f"{source} lacks what {missing[0]} is made from (the authors' "
                                 f"{_theirs(missing[0])}); is it a complete MIVA training output?")
    tensors = {name: tensors[name].float() if tensors[name].dtype == torch.float64 else tensors[name]
               for name in expected}
    check_tensors(info, tensors, source)
    return info, tensors


def _authors_name(key: str) -> bool:
    """Whether ``key`` is one of the authors' trainable MIVA tensors."""
    match = re.match(r"blocks\.\d+\.(.*)", key)
    if match is None:
        return False
    rest = match.group(1)
    return rest in AUTHORS_TENSORS.values() or any(
        rest in (f"{theirs}.weight", f"{theirs}.bias") or rest in (f"{theirs}.{factor}" for pair in LORA_FACTORS
                                                                    for factor in pair)
        for theirs in AUTHORS_PROJECTIONS.values())


def _theirs(ours: str) -> str:
    block, rest = re.match(r"(blocks\.\d+)\.(.*)", ours).groups()
    for mine, theirs in AUTHORS_TENSORS.items():
        if rest == mine:
            return f"{block}.{theirs}"
    prefix, part = rest.rsplit(".", 1)
    return f"{block}.{AUTHORS_PROJECTIONS.get(prefix, prefix)}.{part}"


def _strip_prefix(key: str) -> str:
    for prefix in AUTHORS_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


# The math. Shapes: B batch, F frames, T tokens per frame, H heads, D head size, d = H * D.

def frame_weights(weights: CrossFrameWeights, time_embedding: torch.Tensor) -> torch.Tensor:
    """(lambda, 1 - lambda) per batch entry, [B, 2], from the base's time embedding [B, d]."""
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
    """The keys and values of one block's stream gathered once for every adapter, laid out as SDPA reads them.

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
            # lambda on frame 0's values, 1 - lambda on the previous frame's: one multiply over the gathered values.
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


def adapter_query(x: torch.Tensor, base_query: torch.Tensor | None, weights: CrossFrameWeights) -> torch.Tensor:
    """The adapter's query from the stream ``x``; ``base_query`` is the block's ``W_q x + b_q`` (unused when the
    adapter has a full query projection of its own)."""
    query = weights.query(x) if weights.replaces_query else base_query + weights.query(x)
    return F.rms_norm(query, weights.norm_q.shape, weights.norm_q, eps=QUERY_NORM_EPS)


def cross_frame_attention(x: torch.Tensor, base_query: torch.Tensor | None, frames: ReferenceFrames,
                          time_embedding: torch.Tensor, weights: CrossFrameWeights,
                          mask_bias: CrossFrameBias | None = None) -> torch.Tensor:
    """One adapter's cross-frame attention output for the video tokens, [B, F*T, d] (masked by ``mask_bias``)."""
    attention = frames.attend(adapter_query(x, base_query, weights), frame_weights(weights, time_embedding), mask_bias)
    return weights.output(attention)


def implicit_prompt(query: torch.Tensor, weights: ImplicitPromptWeights) -> torch.Tensor:
    """The MLP that stands in for the whole text cross-attention, from its frozen normalised query."""
    hidden = F.linear(query, weights.down_weight, weights.down_bias)
    hidden = F.layer_norm(hidden, weights.norm_weight.shape, weights.norm_weight, weights.norm_bias,
                          eps=PROMPT_NORM_EPS)
    return F.linear(F.gelu(hidden), weights.up_weight, weights.up_bias)


def _convert_command(args) -> None:
    state = read_training_output(args.source)
    info, tensors = convert_authors_layout(state, base=args.base, motion=args.motion, subject=args.subject,
                                           heads=args.heads, lora_alpha=args.lora_alpha,
                                           source=Path(args.source).name)
    save_adapter(args.destination, info, tensors)
    size = sum(t.numel() for t in tensors.values())
    print(f"wrote {args.destination}: {info.base}, '{info.motion}' (subject '{info.subject}'), {info.blocks} blocks, "
          f"{describe_ranks(info)}, {size / 1e6:.1f} M parameters")


def describe_ranks(info: AdapterInfo) -> str:
    def rank(value: int) -> str:
        return f"rank {value}" if value else "full"

    prompt = f"implicit prompt rank {info.prompt_rank}" if info.prompt_rank else "text cross-attention kept"
    return f"query {rank(info.query_rank)}, output {rank(info.output_rank)}, {prompt}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="MIVA adapters: convert the authors' training outputs to the "
                                     "Motion Dials format (version 2).")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="a .pt / .safetensors training output -> our .safetensors")
    convert.add_argument("source", help="the authors' training output (.pt read with weights_only, or .safetensors)")
    convert.add_argument("destination", help="the adapter file to write (put it in ComfyUI/models/miva/)")
    convert.add_argument("--base", default="wan2.1-t2v-1.3b", help="the base model, e.g. wan2.1-t2v-1.3b")
    convert.add_argument("--heads", type=int, default=12, help="the base model's attention heads (12 for 1.3B)")
    convert.add_argument("--lora-alpha", type=float, default=None,
                         help="PEFT's lora_alpha of a LoRA-factored run (default: the rank, a scale of 1)")
    convert.add_argument("--motion", required=True, help="what the adapter animates, e.g. 'horse running'")
    convert.add_argument("--subject", required=True, help="the subject's word for finding it in the image, e.g. horse")
    args = parser.parse_args(argv)
    try:
        _convert_command(args)
    except AdapterFormatError as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
