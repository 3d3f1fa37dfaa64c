"""Subject masks for M-MIVA (the MIVA paper): GroundingDINO finds boxes for a text prompt, SAM 2 segments them.

Plain torch plus the PyPI packages ``groundingdino-py`` and ``sam2`` (both optional: ``requirements-segmentation.txt``).
Nothing here downloads anything and nothing here runs code from a model file:

- Weights: ``.safetensors``, or ``.pt`` / ``.pth`` read with ``torch.load(weights_only=True)`` (a pickle that holds
  more than tensors is refused). Official checkpoints wrap the state dict as ``{"model": state_dict}``.
- GroundingDINO configs are the package's ``.py`` files (``GroundingDINO_SwinT_OGC.py``, ``GroundingDINO_SwinB_cfg.py``)
  or one next to the weights, which wins; they are read as literal assignments (``name = 256``), never executed.
  A config may set ``swin_params = dict(embed_dim=..., depths=[...], num_heads=[...], window_size=...)`` to build the
  package's Swin backbone at other sizes than its named ones (the tests' tiny model does).
- GroundingDINO's BERT text encoder comes from a local folder (``config.json``, ``vocab.txt``, and weights used only
  when the GroundingDINO checkpoint does not carry BERT's own, which the official ones do), loaded by transformers
  with ``local_files_only``.
- SAM 2 / SAM 2.1 configs are the YAML files shipped in the ``sam2`` package (tiny, small, base-plus, large), chosen by
  the weights' file name, or a ``.yaml`` next to the weights. A config is data: read as plain YAML (no interpolation),
  and built by this module from only the classes the package's configs name, each given only arguments it takes
  (Hydra's ``instantiate`` imports what a ``_target_`` names and calls it, ``sam2.build_sam.torch.load`` included).

The package's own BERT wrapper calls ``BertModel`` methods that transformers 5 removed; ``TextEncoder`` takes its
place with the same submodules (so the checkpoints' ``bert.*`` keys load) and the same per-phrase attention mask.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import math
import re
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
import yaml

from .checkpoint import read_tensors

GROUNDING_DINO_PUBLISHED = "https://huggingface.co/ShilongLiu/GroundingDINO"
SAM2_PUBLISHED = "https://github.com/facebookresearch/sam2 (releases; also https://huggingface.co/facebook)"
BERT_PUBLISHED = "https://huggingface.co/google-bert/bert-base-uncased"
INSTALL_HINT = (
    "Install them into ComfyUI's Python: pip install -r requirements-segmentation.txt, then "
    "SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0 groundingdino-py==0.4.0 "
    "(`make setup` does this for the development environment)."
)

# The published GroundingDINO weights, the config the package ships for each, and the config name on the hub.
GROUNDING_DINO_WEIGHTS = ("groundingdino_swint_ogc.pth", "groundingdino_swinb_cogcoor.pth")
GROUNDING_DINO_CONFIGS = {"swint": "GroundingDINO_SwinT_OGC.py", "swinb": "GroundingDINO_SwinB_cfg.py"}
GROUNDING_DINO_HUB_CONFIGS = {"swint": "GroundingDINO_SwinT_OGC.cfg.py", "swinb": "GroundingDINO_SwinB.cfg.py"}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
BERT_REQUIRED = ("config.json", "vocab.txt")
BERT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

SAM2_SIZES = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
SAM2_WEIGHTS = tuple(f"{version}_hiera_{size}.pt" for version in ("sam2.1", "sam2") for size in SAM2_SIZES)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_SHORT_SIDE, DINO_MAX_SIDE = 800, 1333  # the official GroundingDINO inference resize

_BUILD_LOCK = threading.Lock()  # builds patch module attributes of the packages for their duration


class ModelFileError(ValueError):
    """A model file or folder that cannot be used, with the reason and what to do."""


def require_packages() -> None:
    missing = []
    for module, package in (("groundingdino", "groundingdino-py"), ("sam2", "sam2"), ("hydra", "hydra-core"),
                            ("timm", "timm"), ("addict", "addict"), ("yapf", "yapf")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ImportError(f"Subject masks need the Python packages {', '.join(missing)}. {INSTALL_HINT}")


# ----------------------------------------------------------------------------------------------- reading files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: safetensors, or a torch file read as tensors only (``{"model": ...}`` unwrapped,
    a ``module.`` prefix dropped)."""
    state = read_tensors(path, ModelFileError, "use the published file, or a .safetensors copy of it.",
                         wrappers=("model",))
    return {key.removeprefix("module."): value for key, value in state.items()}


def read_python_config(path: str | Path) -> dict:
    """A GroundingDINO config ``.py`` as a dict, from its literal top-level assignments; anything else is refused
    (the file is parsed, never run)."""
    path = Path(path)
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise ModelFileError(f"GroundingDINO config {path.name} cannot be read ({error}).") from None
    config = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if not isinstance(target, ast.Name):
            raise ModelFileError(f"GroundingDINO config {path.name}, line {node.lineno}: only `name = value` "
                                 "assignments of literal values are read.")
        value = node.value
        if (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict"
                and not value.args):
            value = ast.Dict(keys=[ast.Constant(k.arg) for k in value.keywords],
                             values=[k.value for k in value.keywords])
        try:
            config[target.id] = ast.literal_eval(value)
        except (ValueError, TypeError, RecursionError):
            raise ModelFileError(f"GroundingDINO config {path.name}, line {node.lineno}: {target.id} is not a "
                                 "literal value (numbers, strings, lists, dicts, None, True, False).") from None
    return config


# ------------------------------------------------------------------------------------------------ GroundingDINO


def grounding_dino_size(weights: Path) -> str | None:
    name = weights.name.lower().replace("-", "_")
    for size in GROUNDING_DINO_CONFIGS:
        if size in name:
            return size
    return None


def package_config_dir(package: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        require_packages()
    return Path(spec.origin).parent


def grounding_dino_config_path(weights: str | Path) -> Path:
    """The config for a GroundingDINO weights file: ``<stem>.py`` / ``<stem>.cfg.py`` next to it, else the hub's
    config name for its size next to it, else the package's config for its size (SwinT or SwinB, by file name)."""
    weights = Path(weights)
    size = grounding_dino_size(weights)
    candidates = [weights.with_name(weights.stem + ".py"), weights.with_name(weights.stem + ".cfg.py")]
    if size:
        candidates.append(weights.with_name(GROUNDING_DINO_HUB_CONFIGS[size]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if size:
        return package_config_dir("groundingdino") / "config" / GROUNDING_DINO_CONFIGS[size]
    raise ModelFileError(
        f"No config for GroundingDINO weights {weights.name}: its name says neither SwinT ('swint') nor SwinB "
        f"('swinb'), and there is no {weights.stem}.cfg.py next to it. Put the model's config .py next to the "
        f"weights (the published ones are on {GROUNDING_DINO_PUBLISHED})."
    )


def bert_folder_problem(folder: Path) -> str | None:
    missing = [name for name in BERT_REQUIRED if not (folder / name).is_file()]
    return f"missing {', '.join(missing)}" if missing else None


class TextEncoder(torch.nn.Module):
    """BERT as GroundingDINO runs it: the token embeddings with its per-phrase position ids, then the encoder with its
    per-phrase self-attention mask [B, L, L]. Holds the same submodules as the package's BertModelWarper."""

    def __init__(self, bert_model):
        super().__init__()
        self.config = bert_model.config
        self.embeddings = bert_model.embeddings
        self.encoder = bert_model.encoder
        self.pooler = bert_model.pooler

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, **_):
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask.bool()
        keep = keep[:, None, None, :] if keep.ndim == 2 else keep[:, None]
        bias = torch.zeros(keep.shape, dtype=hidden.dtype, device=hidden.device)
        bias = bias.masked_fill(~keep, torch.finfo(hidden.dtype).min)
        return {"last_hidden_state": self.encoder(hidden, attention_mask=bias)[0]}


def _swin_builder(params: dict):
    from groundingdino.models.GroundingDINO.backbone.swin_transformer import SwinTransformer

    def build(modelname, pretrain_img_size, **kw):
        return SwinTransformer(pretrain_img_size=pretrain_img_size, **{**params, **kw})

    return build


def construct_grounding_dino(config: str | Path, bert_folder: str | Path, bert_weights_from_folder: bool = True):
    """GroundingDINO as its config describes it, built by the package's own code, with BERT from ``bert_folder``
    (its weights too when ``bert_weights_from_folder``; else random, for a checkpoint that carries them)."""
    require_packages()
    with warnings.catch_warnings():  # its Swin imports timm.models.layers, which timm 1.x calls deprecated
        warnings.simplefilter("ignore", FutureWarning)
        from groundingdino.models import build_model
        from groundingdino.models.GroundingDINO import groundingdino as gd_module
        from groundingdino.models.GroundingDINO.backbone import backbone as backbone_module
    from groundingdino.util import get_tokenlizer
    from groundingdino.util.slconfig import SLConfig
    from transformers import AutoTokenizer, BertConfig, BertModel

    config, bert_folder = Path(config), Path(bert_folder)
    settings = read_python_config(config)
    problem = bert_folder_problem(bert_folder)
    if problem:
        raise ModelFileError(f"BERT folder {bert_folder} cannot be used: {problem}.")
    swin_params = settings.pop("swin_params", None)
    settings.update(text_encoder_type=str(bert_folder), use_checkpoint=False, use_transformer_ckpt=False)

    def tokenizer(_name):
        return AutoTokenizer.from_pretrained(str(bert_folder), local_files_only=True)

    def language_model(_name):
        if bert_weights_from_folder:
            return BertModel.from_pretrained(str(bert_folder), local_files_only=True)
        return BertModel(BertConfig.from_pretrained(str(bert_folder), local_files_only=True))

    with _BUILD_LOCK, contextlib.ExitStack() as patches:  # unpatched before the lock is released
        patches.enter_context(mock.patch.object(get_tokenlizer, "get_tokenlizer", tokenizer))
        patches.enter_context(mock.patch.object(get_tokenlizer, "get_pretrained_language_model", language_model))
        patches.enter_context(mock.patch.object(gd_module, "BertModelWarper", TextEncoder))
        if swin_params:
            patches.enter_context(
                mock.patch.object(backbone_module, "build_swin_transformer", _swin_builder(dict(swin_params)))
            )
        try:
            model = build_model(SLConfig(settings))
        except (AttributeError, KeyError, TypeError, ValueError, AssertionError) as error:
            raise ModelFileError(f"GroundingDINO cannot be built from config {config.name}: {error!r}") from None
    model.motion_dials_config = {"config": config.name, **settings}
    return model.eval().requires_grad_(False)


def build_grounding_dino(weights: str | Path, bert_folder: str | Path, config: str | Path | None = None):
    """GroundingDINO from its weights and config, with BERT from ``bert_folder``; in eval mode on the CPU, fp32."""
    weights, bert_folder = Path(weights), Path(bert_folder)
    config_path = Path(config) if config else grounding_dino_config_path(weights)
    read_python_config(config_path)  # a bad config is reported before the weights are read
    problem = bert_folder_problem(bert_folder)
    if problem:
        raise ModelFileError(f"BERT folder {bert_folder} cannot be used: {problem}.")
    state = read_state_dict(weights)
    bert_in_checkpoint = any(key.startswith("bert.encoder.") for key in state)
    if not bert_in_checkpoint and not any((bert_folder / name).is_file() for name in BERT_WEIGHTS):
        raise ModelFileError(
            f"{weights.name} does not carry BERT's weights and the BERT folder {bert_folder} has none "
            f"({' or '.join(BERT_WEIGHTS)}); get them from {BERT_PUBLISHED}."
        )
    model = construct_grounding_dino(config_path, bert_folder, bert_weights_from_folder=not bert_in_checkpoint)
    state = {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if not bert_in_checkpoint:
        missing = [k for k in missing if not k.startswith("bert.")]
    if missing or unexpected:
        raise ModelFileError(
            f"{weights.name} does not match config {config_path.name}: {len(missing)} weights missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})."
        )
    return model


@dataclass
class Detections:
    """Boxes found in one image, best first: [N, 4] x0, y0, x1, y1 in pixels; [N] scores; one phrase per box."""

    boxes: torch.Tensor
    scores: torch.Tensor
    phrases: list[str]

    def __len__(self) -> int:
        return len(self.scores)


def caption(prompt: str) -> str:
    """GroundingDINO's caption for a prompt: lower case, ending with '.' (separate phrases with ' . ')."""
    text = prompt.lower().strip()
    return text if text.endswith(".") else text + "."


def _param(model) -> torch.Tensor:
    return next(model.parameters())


def set_precision(model, dtype: torch.dtype, cast_weights: bool):
    """Run ``model`` under autocast in ``dtype`` (none for fp32); with ``cast_weights`` its weights are stored in
    ``dtype`` too. SAM 2 takes both; GroundingDINO keeps fp32 weights, as its decoder's feed-forward layers turn
    autocast off."""
    if cast_weights:
        model.to(dtype=dtype)
    model.motion_dials_autocast = dtype
    return model


@contextlib.contextmanager
def _inference(model) -> Iterator[tuple[torch.device, torch.dtype]]:
    """No grad; autocast in the dtype set by ``set_precision`` (default: the weights') when that is not fp32.
    Yields the device and the dtype inputs take (the weights')."""
    param = _param(model)
    dtype = getattr(model, "motion_dials_autocast", param.dtype)
    autocast = (torch.autocast(param.device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        yield param.device, param.dtype


def _normalised(image: torch.Tensor, height: int, width: int, device, dtype) -> torch.Tensor:
    """[H, W, 3] in [0, 1] -> [1, 3, height, width], resized (bilinear, antialiased) and ImageNet-normalised."""
    x = image.to(device=device, dtype=torch.float32).permute(2, 0, 1)[None]
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def dino_input_size(height: int, width: int, short: int = DINO_SHORT_SIDE, longest: int = DINO_MAX_SIDE):
    """The official resize: the short side to ``short``, unless the long side would pass ``longest``."""
    low, high = min(height, width), max(height, width)
    if high / low * short > longest:
        short = int(round(longest * low / high))
    if width < height:
        return int(short * height / width), short
    return short, int(short * width / height)


def check_image(image: torch.Tensor) -> torch.Tensor:
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"Expected an RGB image [height, width, 3]; got {list(image.shape)}.")
    return image


def detect(model, image: torch.Tensor, prompt: str, box_threshold: float, text_threshold: float) -> Detections:
    """GroundingDINO on one image [H, W, 3] in [0, 1]: the boxes whose best prompt-token score passes
    ``box_threshold``, best first; each box's phrase is the prompt tokens scoring above ``text_threshold``."""
    image = check_image(image)
    height, width = image.shape[:2]
    text = caption(prompt)
    with _inference(model) as (device, dtype):
        x = _normalised(image, *dino_input_size(height, width), device, dtype)
        outputs = model(x, captions=[text])
        logits = outputs["pred_logits"][0].float().sigmoid().cpu()  # [queries, 256 text positions]
        boxes = outputs["pred_boxes"][0].float().cpu()  # [queries, 4] cx, cy, w, h in [0, 1]
    scores = logits.max(dim=1).values
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = order[scores[order] > box_threshold]
    ids = model.tokenizer(text)["input_ids"]
    special = set(model.specical_tokens)  # [CLS], [SEP], '.', '?' (the package's spelling)
    phrases = []
    for i in keep.tolist():
        words = [ids[j] for j in torch.nonzero(logits[i, :len(ids)] > text_threshold).flatten().tolist()
                 if ids[j] not in special]
        phrases.append(model.tokenizer.decode(words).strip())
    cx, cy, w, h = boxes[keep].unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1).clamp(0.0, 1.0)
    xyxy = xyxy * torch.tensor([width, height, width, height], dtype=xyxy.dtype)
    return Detections(xyxy.reshape(-1, 4), scores[keep], phrases)


# ------------------------------------------------------------------------------------------------------- SAM 2


def sam2_config_path(weights: str | Path) -> Path:
    """The config for SAM 2 weights: ``<stem>.yaml`` next to them, else the package's config for the version
    (``sam2.1`` or ``sam2`` in the name) and size (tiny, small, base_plus / b+, large) the file name says."""
    weights = Path(weights)
    beside = weights.with_suffix(".yaml")
    if beside.is_file():
        return beside
    name = weights.name.lower().replace("-", "_").replace("base_plus", "b+").replace("baseplus", "b+")
    version = "sam2.1" if "sam2.1" in name or "sam21" in name else "sam2" if "sam2" in name else None
    size = next((short for word, short in (*SAM2_SIZES.items(), ("b+", "b+")) if word in name), None)
    if size is None:
        size = next((short for short in ("t", "s", "l") if f"hiera_{short}" in name), None)
    if version is None or size is None:
        raise ModelFileError(
            f"No config for SAM 2 weights {weights.name}: name the file as published (e.g. sam2.1_hiera_small.pt, "
            f"sam2_hiera_base_plus.pt) or put {weights.stem}.yaml next to it. Published files: {SAM2_PUBLISHED}."
        )
    return package_config_dir("sam2") / "configs" / version / f"{version}_hiera_{size}.yaml"


def sam2_classes() -> dict[str, type]:
    """The classes a SAM 2 config may build, under the exact names the package's inference configs
    (``configs/sam2``, ``configs/sam2.1``) give them. A ``_target_`` is looked up here, never imported."""
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
    from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
    from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine
    from sam2.modeling.sam.transformer import RoPEAttention
    from sam2.modeling.sam2_base import SAM2Base

    return {
        "sam2.modeling.sam2_base.SAM2Base": SAM2Base,
        "sam2.modeling.backbones.image_encoder.ImageEncoder": ImageEncoder,
        "sam2.modeling.backbones.hieradet.Hiera": Hiera,
        "sam2.modeling.backbones.image_encoder.FpnNeck": FpnNeck,
        "sam2.modeling.position_encoding.PositionEmbeddingSine": PositionEmbeddingSine,
        "sam2.modeling.memory_attention.MemoryAttention": MemoryAttention,
        "sam2.modeling.memory_attention.MemoryAttentionLayer": MemoryAttentionLayer,
        "sam2.modeling.sam.transformer.RoPEAttention": RoPEAttention,
        "sam2.modeling.memory_encoder.MemoryEncoder": MemoryEncoder,
        "sam2.modeling.memory_encoder.MaskDownSampler": MaskDownSampler,
        "sam2.modeling.memory_encoder.Fuser": Fuser,
        "sam2.modeling.memory_encoder.CXBlock": CXBlock,
    }


SAM2_MODEL_CLASS = "sam2.modeling.sam2_base.SAM2Base"
# Hiera torch.loads the file its weights_path names; the pack reads the weights itself, as tensors only.
SAM2_REFUSED_ARGUMENTS = {"sam2.modeling.backbones.hieradet.Hiera": ("weights_path",)}
_PLAIN_VALUES = (str, int, float, bool, type(None))


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader (plain data, no tags that build objects) that reads ``1e-6`` as a number, as OmegaConf
    does: the package's configs write CXBlock's ``layer_scale_init_value`` so, and YAML 1.1 reads it as text."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _key_path(keys: str, key) -> str:
    return f"{keys}.{key}" if keys else str(key)


def _sam2_refusal(path: Path, keys: str, problem: str, classes: dict) -> ModelFileError:
    names = ", ".join(name.rsplit(".", 1)[1] for name in classes)
    return ModelFileError(
        f"SAM 2 config {path.name}, {keys}: {problem}. A SAM 2 config is read as data: use the sam2 package's "
        f"config for these weights (take {path.name} away from beside them), or a config that builds only the sam2 "
        f"classes the package's configs name ({names}), with arguments they take and plain values."
    )


def _arguments(cls) -> tuple[set[str], set[str]]:
    """The keyword arguments ``cls`` takes and those it needs. ``**kwargs`` are followed into the base classes'
    ``__init__`` (RoPEAttention hands its own to Attention's); nothing else reaches a ``**kwargs``."""
    accepted, required = set(), set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]  # without self
        named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        accepted.update(p.name for p in named)
        required.update(p.name for p in named if p.default is p.empty)
        if all(p.kind is not p.VAR_KEYWORD for p in parameters):
            break
    return accepted, required


def _check_sam2_config(node, keys: str, path: Path, classes: dict, seen: set) -> None:
    """Refuses anything in the parsed YAML but plain values and the allowed classes with arguments they take."""
    def refuse(where, problem):
        return _sam2_refusal(path, where, problem, classes)

    if isinstance(node, list | dict):
        if id(node) in seen:  # walking every use of an alias of an alias ... grows exponentially
            raise refuse(keys, "a YAML alias (*name) repeats a part of the file, which the package's configs never do")
        seen.add(id(node))
    if isinstance(node, list):
        for index, item in enumerate(node):
            _check_sam2_config(item, f"{keys}[{index}]", path, classes, seen)
        return
    if not isinstance(node, dict):
        if type(node) not in _PLAIN_VALUES:
            raise refuse(keys, f"a {type(node).__name__} value is not read (only text, numbers, true/false, null, "
                               "lists and mappings)")
        if isinstance(node, str) and "${" in node:
            raise refuse(keys, f"{node!r}: ${{...}} interpolations and resolvers are not read; write the value")
        return
    name = node.get("_target_")
    if "_target_" in node and (not isinstance(name, str) or name not in classes):
        raise refuse(_key_path(keys, "_target_"), f"{name!r} is not one of the classes a SAM 2 config may build")
    for key in node:
        where = _key_path(keys, key)
        if not isinstance(key, str) or "${" in key:
            raise refuse(where, f"the key {key!r} is not a plain name")
        if key != "_target_" and key.startswith("_") and key.endswith("_"):
            raise refuse(where, f"{key} is a Hydra instruction, which is not followed; only _target_ is read")
    if "_target_" in node:
        short = name.rsplit(".", 1)[1]
        accepted, required = _arguments(classes[name])
        for key in node:
            if key != "_target_" and key not in accepted:
                raise refuse(_key_path(keys, key), f"{short} takes no argument {key!r}")
            if key in SAM2_REFUSED_ARGUMENTS.get(name, ()):
                raise refuse(_key_path(keys, key), f"{short}'s {key} would read a file the config names")
        missing = sorted(required - node.keys())
        if missing:
            raise refuse(keys, f"{short} needs {', '.join(missing)}, which the config does not give")
    for key, value in node.items():
        _check_sam2_config(value, _key_path(keys, key), path, classes, seen)


def _build_sam2_node(node, keys: str, path: Path, classes: dict):
    """A checked node built as Hydra's ``instantiate`` would: children first, in the file's order."""
    if isinstance(node, list):
        return [_build_sam2_node(item, f"{keys}[{index}]", path, classes) for index, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    values = {key: _build_sam2_node(value, _key_path(keys, key), path, classes)
              for key, value in node.items() if key != "_target_"}
    if "_target_" not in node:
        return values
    cls = classes[node["_target_"]]
    try:
        return cls(**values)
    except Exception as error:  # noqa: BLE001 - the package's code may fail on the config's values in any way
        raise ModelFileError(f"SAM 2 cannot be built from config {path.name}: {keys} ({cls.__name__}): "
                             f"{error!r}") from None


def construct_sam2(config: str | Path):
    """SAM 2 (``SAM2Base``) as its YAML config describes it, with the package's own initial weights. The whole file
    is checked before anything is built."""
    require_packages()
    config = Path(config)
    try:
        with config.open(encoding="utf-8") as stream:  # a parse error then names the file and the line
            settings = yaml.load(stream, Loader=_ConfigLoader)
    except Exception as error:  # noqa: BLE001 - any read or parse error is reported the same way
        raise ModelFileError(f"SAM 2 config {config.name} cannot be read ({error}).") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("model"), dict):
        raise ModelFileError(f"SAM 2 config {config.name} has no 'model' section.")
    classes = sam2_classes()
    _check_sam2_config(settings, "", config, classes, set())
    if settings["model"].get("_target_") != SAM2_MODEL_CLASS:
        raise _sam2_refusal(config, "model._target_", f"the model must be {SAM2_MODEL_CLASS}", classes)
    # as sam2.build_sam.build_sam2 does for image prediction: fall back to multi-mask output when one is unstable
    settings["model"]["sam_mask_decoder_extra_args"] = {"dynamic_multimask_via_stability": True,
                                                        "dynamic_multimask_stability_delta": 0.05,
                                                        "dynamic_multimask_stability_thresh": 0.98}
    with _BUILD_LOCK:
        model = _build_sam2_node(settings["model"], "model", config, classes)
    model.motion_dials_config = {"config": config.name}
    return model.eval().requires_grad_(False)


def build_sam2(weights: str | Path, config: str | Path | None = None):
    """SAM 2 / SAM 2.1 from its weights and config, in eval mode on the CPU, fp32."""
    weights = Path(weights)
    config_path = Path(config) if config else sam2_config_path(weights)
    state = read_state_dict(weights)
    model = construct_sam2(config_path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelFileError(
            f"{weights.name} does not match SAM 2 config {config_path.name}: {len(missing)} weights missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})."
        )
    return model


def segment(model, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """SAM 2 masks of one image [H, W, 3] in [0, 1] for boxes [N, 4] (x0, y0, x1, y1 in pixels): [N, H, W] bool,
    one mask per box (single-mask output, as for box prompts)."""
    image = check_image(image)
    height, width = image.shape[:2]
    boxes = boxes.reshape(-1, 4).float()
    if not len(boxes):
        return torch.zeros(0, height, width, dtype=torch.bool)
    size = model.image_size
    with _inference(model) as (device, dtype):
        x = _normalised(image, size, size, device, dtype)
        backbone = model.forward_image(x)
        _, features, _, sizes = model._prepare_backbone_features(backbone)
        if model.directly_add_no_mem_embed:
            features[-1] = features[-1] + model.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(1, -1, *s) for f, s in zip(features, sizes, strict=True)]
        scale = torch.tensor([size / width, size / height], device=device)
        corners = boxes.to(device).reshape(-1, 2, 2) * scale
        labels = torch.tensor([[2, 3]], dtype=torch.int, device=device).repeat(len(boxes), 1)
        sparse, dense = model.sam_prompt_encoder(points=(corners, labels), boxes=None, masks=None)
        low_res, _, _, _ = model.sam_mask_decoder(
            image_embeddings=maps[-1], image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            repeat_image=len(boxes) > 1, high_res_features=maps[:-1],
        )
        logits = F.interpolate(low_res.float(), size=(height, width), mode="bilinear", align_corners=False)
    return (logits[:, 0] > 0.0).cpu()


# ------------------------------------------------------------------------------------------------ both together


def subject_mask(dino, sam, image: torch.Tensor, prompt: str, box_threshold: float, text_threshold: float,
                 union: bool) -> tuple[torch.Tensor, Detections]:
    """The subject's mask [H, W] (0 or 1, float) in one image and the boxes it came from: the best box's SAM 2 mask,
    or with ``union`` the union of the masks of every box over the threshold. No box: an empty mask."""
    found = detect(dino, image, prompt, box_threshold, text_threshold)
    used = found if union else Detections(found.boxes[:1], found.scores[:1], found.phrases[:1])
    masks = segment(sam, image, used.boxes)
    mask = masks.any(dim=0) if len(used) else torch.zeros(image.shape[:2], dtype=torch.bool)
    return mask.float(), used


def draw_preview(image: torch.Tensor, mask: torch.Tensor, boxes: torch.Tensor, mask_color=(0.1, 0.9, 0.2),
                 box_color=(1.0, 0.2, 0.1), opacity: float = 0.45) -> torch.Tensor:
    """The image [H, W, 3] with the mask tinted over it and each box outlined (lines 1/150 of the image wide)."""
    tint = torch.tensor(mask_color, dtype=image.dtype)
    out = image * (1 - opacity * mask[..., None]) + tint * (opacity * mask[..., None])
    tint = torch.tensor(box_color, dtype=image.dtype)
    height, width = image.shape[:2]
    line = max(1, math.ceil(max(height, width) / 150))
    for x0, y0, x1, y1 in boxes.round().long().tolist():
        x0, x1 = sorted((min(max(x0, 0), width - 1), min(max(x1, 0), width - 1)))
        y0, y1 = sorted((min(max(y0, 0), height - 1), min(max(y1, 0), height - 1)))
        out[y0:y0 + line, x0:x1 + 1] = tint
        out[max(y1 - line + 1, 0):y1 + 1, x0:x1 + 1] = tint
        out[y0:y1 + 1, x0:x0 + line] = tint
        out[y0:y1 + 1, max(x1 - line + 1, 0):x1 + 1] = tint
    return out.clamp(0.0, 1.0)
