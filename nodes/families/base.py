"""What every model family states, and the types the core and the effects share."""

from __future__ import annotations

import enum
import importlib.util
import math
from dataclasses import dataclass, field

import torch


class AttentionKind(enum.Enum):
    VIDEO_SELF = "video self-attention"
    TEXT_CROSS = "text cross-attention"
    IMAGE_CROSS = "image cross-attention"
    JOINT = "joint text+video attention"


class UnsupportedModelError(ValueError):
    pass


class LayoutError(RuntimeError):
    """A model call whose tokens do not sit where the family's layout says: stop rather than bias the wrong ones."""


@dataclass(frozen=True)
class TokenLayout:
    """Where the video tokens sit in one attention call: ``frames x height x width`` tokens, frame-major, from
    ``video_start`` in the queries (and, for self- and joint attention, in the keys)."""

    frames: int
    height: int
    width: int
    video_start: int
    sequence_length: int  # keys
    query_length: int

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_end(self) -> int:
        return self.video_start + self.frames * self.tokens_per_frame

    def frame_start(self, frame: int) -> int:
        """Position of the first token of latent (token) frame ``frame``; ``frame_start(frames)`` is the end."""
        return self.video_start + min(frame, self.frames) * self.tokens_per_frame

    @property
    def video_only(self) -> bool:
        """Whether the call's queries and keys are the video tokens and nothing else."""
        return self.video_start == 0 and self.video_end == self.sequence_length == self.query_length


@dataclass
class BlockRun:
    """One block's run inside a model call, as its family reads it from the block's arguments."""

    block_type: str
    index: int
    module: torch.nn.Module
    inputs: dict  # the block's arguments by name
    stream: torch.Tensor  # the video stream entering the block, [B, L, C]
    video_start: int  # where the latent's tokens start in the stream
    text_tokens: int = 0  # joint families: the text tokens beside the stream in the block's attention
    image_tokens: int | None = None  # image-conditioning tokens of an image cross-attention, where there is one
    attention_calls: int = 0
    # what an effect added to the stream before the cross-attention, added again to that module's output
    stream_residual: torch.Tensor | None = None
    probe: dict = field(default_factory=dict)  # what the family's probe hooks saw during this block
    probe_hooks: list = field(default_factory=list)


def sequence_length(tensor: torch.Tensor, skip_reshape: bool) -> int:
    """Tokens of an attention input: [B, N, H*D], or [B, H, N, D] with skip_reshape."""
    return tensor.shape[2 if skip_reshape else 1]


def as_rows(tensor: torch.Tensor, skip_reshape: bool) -> torch.Tensor:
    """An attention input as [B, N, ...] (a view)."""
    return tensor.transpose(1, 2) if skip_reshape else tensor


def locate_rows(sequence: torch.Tensor, rows: torch.Tensor, candidates, what: str) -> int:
    """Where the ``rows`` [B, n, ...] sit in ``sequence`` [B, L, ...], among the candidate offsets.

    The rows are copies of the same values (a concatenation), so the first and the last must be equal exactly;
    exactly one candidate may fit. This is how the core finds a stream inside a joint attention call whatever
    order the host concatenates it in.
    """
    count = rows.shape[1]
    fits = []
    for offset in dict.fromkeys(candidates):
        if offset < 0 or offset + count > sequence.shape[1]:
            continue
        if torch.equal(sequence[:, offset], rows[:, 0]) and torch.equal(sequence[:, offset + count - 1],
                                                                          rows[:, count - 1]):
            fits.append(offset)
    if len(fits) != 1:
        raise LayoutError(
            f"Motion Dials could not find {what} in the attention call ({count} of {sequence.shape[1]} tokens; "
            f"{'no' if not fits else 'more than one'} place fits). This ComfyUI lays the model out in a way the "
            "pack does not know yet: please report it with your ComfyUI version."
        )
    return fits[0]


def patch_tokens(shape, patch_size) -> int:
    """Tokens of a latent [..., F, H, W] after padding to the patch size and patching."""
    return math.prod(-(-size // patch) for size, patch in zip(shape[-len(patch_size):], patch_size, strict=True))


class ModelFamily:
    """One family of video DiTs: which models it claims, its blocks, and its token layout per call."""

    name = ""
    needs_module = ""  # a module of the host the family lives in, where not every host has it
    # Inside a block, the submodule whose input is the residual stream after the self-attention's residual and
    # whose output feeds the cross-attention, and the cross-attention module whose output joins that stream
    # (effects that act between the two: MIVA's cross-frame attention and implicit prompt); "" where none is stated.
    stream_before_cross_attention = ""
    cross_attention = ""

    def on_this_host(self) -> bool:
        return not self.needs_module or importlib.util.find_spec(self.needs_module) is not None

    def claims(self, base_model) -> bool:
        raise NotImplementedError

    def refusal(self, base_model) -> str | None:
        """Why a model this family claims cannot be patched (a variant whose layout is not stated), or None."""
        return None

    def blocks(self, diffusion_model) -> list[tuple[str, int, torch.nn.Module]]:
        """(block type, index within the type, module) of every transformer block, in the order they run."""
        raise NotImplementedError

    def patch_size(self, diffusion_model) -> tuple[int, int, int]:
        raise NotImplementedError

    def attention_heads(self, diffusion_model) -> int:
        """The heads of the model's video attention (every block has as many)."""
        return diffusion_model.num_heads

    def token_grid(self, diffusion_model, latent_shape) -> tuple[int, int, int]:
        """Token frames, height and width of a latent [B, C, F, H, W], padded to the patch size as the model does."""
        return tuple(-(-size // patch) for size, patch in zip(latent_shape[-3:], self.patch_size(diffusion_model),
                                                               strict=True))

    def call_hooks(self, forward) -> list:
        """Hooks that watch the model call as a whole (removed when it ends), for what the blocks cannot see."""
        return []

    def enter_block(self, forward, block_type: str, index: int, module, args: tuple, kwargs: dict) -> BlockRun:
        """The block about to run, from its arguments; may add probe hooks to ``BlockRun.probe_hooks``."""
        raise NotImplementedError

    def attention_layout(self, forward, run: BlockRun, call_index: int, q, k, v,
                         skip_reshape: bool) -> tuple[AttentionKind, TokenLayout] | None:
        """Kind and layout of the ``call_index``-th attention call of the block, or None for calls left alone."""
        raise NotImplementedError

    def block_path(self, block_type: str, index: int) -> str:
        """The block's attribute path inside the diffusion model, e.g. "blocks.3"."""
        raise NotImplementedError

    def layout(self, forward, run: BlockRun, q_len: int, k_len: int, video_start: int) -> TokenLayout:
        frames, height, width = forward.token_grid
        return TokenLayout(frames, height, width, video_start, k_len, q_len)

    def mismatch(self, forward, what: str) -> LayoutError:
        import comfyui_version

        return LayoutError(
            f"Motion Dials stopped before patching the wrong tokens: in this {self.name} call {what}. "
            f"(ComfyUI {comfyui_version.__version__}; latent grid {tuple(forward.latent_grid)}.) Remove the Motion "
            "Dials node for this model, and please report it with your ComfyUI version."
        )


class JointFamily(ModelFamily):
    """An MM-DiT family: each block runs one joint attention over its video stream and its text stream. The order
    of the two in that call is found on the first block of each model call (``locate_stream``), never assumed."""

    def stream_offset_known(self, forward) -> bool:
        return (self.name, "stream offset") in forward.memo

    def locate_stream(self, forward, run: BlockRun, v, skip_reshape: bool) -> int:
        """Where the block's stream starts in the joint attention (0 or after the text), from the block's probes."""
        raise NotImplementedError

    def attention_layout(self, forward, run, call_index, q, k, v, skip_reshape):
        q_len, k_len = sequence_length(q, skip_reshape), sequence_length(k, skip_reshape)
        stream_tokens = run.stream.shape[1]
        if call_index != 0 or q_len != k_len or q_len != stream_tokens + run.text_tokens:
            raise self.mismatch(forward, f"attention call {call_index} of block {run.index} has {q_len} queries "
                                f"and {k_len} keys, not the {stream_tokens} stream and {run.text_tokens} text tokens")
        key = (self.name, "stream offset")
        if key not in forward.memo:
            forward.memo[key] = self.locate_stream(forward, run, v, skip_reshape)
        return AttentionKind.JOINT, self.layout(forward, run, q_len, k_len, forward.memo[key] + run.video_start)
