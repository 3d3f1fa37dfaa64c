"""M-MIVA subject masks: GroundingDINO finds the subject named by a text prompt, SAM 2 segments it (the MIVA paper).

Model files, found through ComfyUI's folder registry (``extra_model_paths.yaml`` may add folders under the same keys):

    models/grounding-dino/      GroundingDINO weights (groundingdino_swint_ogc.pth, groundingdino_swinb_cogcoor.pth),
                                with their config .py next to them or else the one shipped in groundingdino-py
    models/bert-base-uncased/   GroundingDINO's text encoder: config.json, vocab.txt, model.safetensors
    models/sam2/                SAM 2 / 2.1 weights (.pt or .safetensors), e.g. sam2.1_hiera_small.pt

Nothing is downloaded. The loaders cache their models between runs and hand them to ComfyUI's model management
(a ModelPatcher each), which moves them to the GPU for a run and offloads them when memory is needed.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..models import segmentation
from .input_checks import MotionDialsNode, check_image
from .miva import MivaStackType
from .model_files import file_stamp, is_plain_name, register_model_folder, searched_folders

CATEGORY = "Motion Dials/M-MIVA"
DINO_FOLDER = "grounding-dino"
SAM2_FOLDER = "sam2"
BERT_FOLDER = "bert-base-uncased"
DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("best box", "union")

GroundingDinoType = io.Custom("MD_GROUNDING_DINO")
Sam2Type = io.Custom("MD_SAM2")

log = logging.getLogger("motion_dials.subject_mask")


register_model_folder(DINO_FOLDER, segmentation.WEIGHT_SUFFIXES)
register_model_folder(SAM2_FOLDER, segmentation.WEIGHT_SUFFIXES)
register_model_folder(BERT_FOLDER, ())


def weight_files(folder: str) -> list[str]:
    return [name for name in folder_paths.get_filename_list(folder) if name.endswith(segmentation.WEIGHT_SUFFIXES)]


def resolve_weights(folder: str, name: str, what: str, expected: tuple[str, ...], published: str) -> Path:
    """The path of a listed weights file; a clear error naming the file, the folders searched and where the files
    are published otherwise."""
    if is_plain_name(name):
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return Path(path)
    raise FileNotFoundError(
        f"{what} weights {name!r} were not found. Searched: {searched_folders(folder)}. Expected a file such as "
        f"{', '.join(expected)} in one of those folders (or a '{folder}' entry in extra_model_paths.yaml); they are "
        f"published at {published}. Nothing is downloaded: put the file there and refresh the page."
    )


def find_bert_folder() -> Path:
    """The first folder registered as ``bert-base-uncased`` that holds BERT's config.json and vocab.txt."""
    problems = []
    for place in folder_paths.get_folder_paths(BERT_FOLDER):
        folder = Path(place)
        problem = "not there" if not folder.is_dir() else segmentation.bert_folder_problem(folder)
        if problem is None:
            return folder
        problems.append(f"{folder} ({problem})")
    raise FileNotFoundError(
        f"GroundingDINO needs its BERT text encoder (bert-base-uncased) in a local folder with "
        f"{', '.join(segmentation.BERT_REQUIRED)} and model.safetensors; no folder has them. Searched: "
        f"{'; '.join(problems) or '(none registered)'}. Get the files from {segmentation.BERT_PUBLISHED} into "
        f"ComfyUI/models/{BERT_FOLDER}/ (or add a '{BERT_FOLDER}' entry to extra_model_paths.yaml). "
        "Nothing is downloaded."
    )


def devices(choice: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device) for a device option."""
    if choice == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    load = comfy.model_management.get_torch_device()
    if choice == "gpu" and load.type == "cpu":
        raise ValueError("device 'gpu' was chosen but ComfyUI runs on the CPU here (no GPU, or --cpu); "
                         "choose 'auto' or 'cpu'.")
    return load, comfy.model_management.unet_offload_device()


@dataclass
class LoadedModel:
    """A model with its ModelPatcher, as the loaders hand it on."""

    model: torch.nn.Module
    patcher: comfy.model_patcher.ModelPatcher
    name: str
    description: str


class Holder(torch.nn.Module):
    """What the ModelPatcher manages: it sets attributes such as ``device`` on its model, which SAM 2 has as a
    read-only property, so the model sits one level down."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model


def _wrap(model: torch.nn.Module, name: str, device: str, precision: str, description: str,
          cast_weights: bool) -> LoadedModel:
    load, offload = devices(device)
    # On the CPU both packages need fp32 (their layer norms meet fp32 activations, which CPU autocast leaves as they
    # are); on a GPU they run under autocast in the chosen precision (see segmentation.set_precision).
    used = precision if load.type != "cpu" else "fp32"
    model = segmentation.set_precision(model.to(offload), PRECISIONS[used], cast_weights)
    patcher = comfy.model_patcher.ModelPatcher(Holder(model), load_device=load, offload_device=offload)
    note = "" if used == precision else f" ({precision} is for GPUs)"
    if used != "fp32" and not cast_weights:
        note = " (autocast; weights fp32)"
    return LoadedModel(model, patcher, name, f"{description}\ndevice {load.type}, {used}{note}")


@functools.lru_cache(maxsize=2)
def _load_dino(weights: tuple, config: tuple, bert: str, bert_stamp: tuple, name: str, device: str,
               precision: str) -> LoadedModel:
    model = segmentation.build_grounding_dino(weights[0], bert, config[0])
    return _wrap(model, name, device, precision, f"{name}\nconfig {Path(config[0]).name}\nBERT {bert}",
                 cast_weights=False)


@functools.lru_cache(maxsize=2)
def _load_sam2(weights: tuple, config: tuple, name: str, device: str, precision: str) -> LoadedModel:
    model = segmentation.build_sam2(weights[0], config[0])
    return _wrap(model, name, device, precision, f"{name}\nconfig {Path(config[0]).name}, input {model.image_size} px",
                 cast_weights=True)


def load_grounding_dino(name: str, device: str = "auto", precision: str = "fp32") -> LoadedModel:
    weights = resolve_weights(DINO_FOLDER, name, "GroundingDINO", segmentation.GROUNDING_DINO_WEIGHTS,
                              segmentation.GROUNDING_DINO_PUBLISHED)
    bert = find_bert_folder()
    segmentation.require_packages()
    config = segmentation.grounding_dino_config_path(weights)
    bert_stamp = tuple(file_stamp(bert / file) for file in (*segmentation.BERT_REQUIRED, *segmentation.BERT_WEIGHTS))
    return _load_dino(file_stamp(weights), file_stamp(config), str(bert), bert_stamp, name, device, precision)


def load_sam2(name: str, device: str = "auto", precision: str = "fp32") -> LoadedModel:
    weights = resolve_weights(SAM2_FOLDER, name, "SAM 2", segmentation.SAM2_WEIGHTS, segmentation.SAM2_PUBLISHED)
    segmentation.require_packages()
    config = segmentation.sam2_config_path(weights)
    return _load_sam2(file_stamp(weights), file_stamp(config), name, device, precision)


def _loader_inputs(folder: str, what: str, examples: str) -> list:
    return [
        io.Combo.Input("model_name", options=weight_files(folder),
                       tooltip=f"{what} weights in ComfyUI/models/{folder}/ (or a '{folder}' entry of "
                       f"extra_model_paths.yaml), e.g. {examples}. Nothing is downloaded."),
        io.Combo.Input("device", options=list(DEVICES), default="auto",
                       tooltip="auto: ComfyUI's device, offloaded to the CPU when memory is needed; cpu: always the "
                       "CPU; gpu: the GPU (an error where there is none)."),
        io.Combo.Input("precision", options=list(PRECISIONS), default="fp32",
                       tooltip="Precision on a GPU: fp16 / bf16 run faster (SAM 2 also stores its weights so; "
                       "GroundingDINO keeps fp32 weights). The CPU always runs fp32."),
    ]


class GroundingDINOLoader(MotionDialsNode):
    model_file_inputs = {"model_name": DINO_FOLDER}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialsGroundingDINOLoader",
            display_name="GroundingDINO Loader",
            category=CATEGORY,
            description="Loads GroundingDINO (text prompt -> boxes) from models/grounding-dino, with its BERT text "
            "encoder from models/bert-base-uncased. The config .py next to the weights is used, else the one "
            "groundingdino-py ships for SwinT / SwinB.",
            inputs=_loader_inputs(DINO_FOLDER, "GroundingDINO",
                                  "groundingdino_swint_ogc.pth (from huggingface ShilongLiu/GroundingDINO)"),
            outputs=[GroundingDinoType.Output(display_name="grounding_dino", tooltip="For Subject Mask.")],
        )

    @classmethod
    def execute(cls, model_name, device="auto", precision="fp32") -> io.NodeOutput:
        loaded = load_grounding_dino(model_name, device, precision)
        return io.NodeOutput(loaded, ui=ui.PreviewText(loaded.description))


class SAM2Loader(MotionDialsNode):
    model_file_inputs = {"model_name": SAM2_FOLDER}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialsSAM2Loader",
            display_name="SAM 2 Loader",
            category=CATEGORY,
            description="Loads SAM 2 or SAM 2.1 (box -> mask) from models/sam2: .pt (read as tensors only) or "
            ".safetensors. The config is the sam2 package's for the size the file name says (tiny, small, base_plus, "
            "large), or a .yaml of the same name next to the weights.",
            inputs=_loader_inputs(SAM2_FOLDER, "SAM 2", "sam2.1_hiera_small.pt (from the facebook/sam2 releases)"),
            outputs=[Sam2Type.Output(display_name="sam2", tooltip="For Subject Mask.")],
        )

    @classmethod
    def execute(cls, model_name, device="auto", precision="fp32") -> io.NodeOutput:
        loaded = load_sam2(model_name, device, precision)
        return io.NodeOutput(loaded, ui=ui.PreviewText(loaded.description))


def rgb(images: torch.Tensor) -> torch.Tensor:
    """A ComfyUI IMAGE [B, H, W, C] as RGB [B, H, W, 3] float: alpha dropped, gray repeated."""
    check_image("Subject Mask", "image", images)
    channels = images.shape[-1]
    images = images.float()
    if channels == 4:
        return images[..., :3]
    return images.expand(-1, -1, -1, 3) if channels == 1 else images


def stack_subject(stack) -> str:
    """The subject word of a MIVA stack's first adapter ('' for no stack)."""
    rows = tuple(stack or ())
    return rows[0].adapter.info.subject.strip() if rows else ""


def describe(found: segmentation.Detections) -> str:
    return ", ".join(f"{phrase or '?'} {score:.2f} at ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f})"
                     for phrase, score, (x0, y0, x1, y1) in zip(found.phrases, found.scores.tolist(),
                                                                found.boxes.tolist(), strict=True))


class SubjectMask(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialsSubjectMask",
            display_name="Subject Mask",
            category=CATEGORY,
            description="M-MIVA's subject mask: GroundingDINO finds the boxes of the prompt's subject in each image, "
            "SAM 2 segments them. Feed the mask to MIVA Loader's subject_mask. No box over the threshold gives an "
            "empty mask and a warning.",
            inputs=[
                io.Image.Input("image", tooltip="The start image (a batch gives one mask per image). An alpha "
                               "channel is ignored; gray images are used as RGB."),
                GroundingDinoType.Input("grounding_dino", tooltip="From GroundingDINO Loader."),
                Sam2Type.Input("sam2", tooltip="From SAM 2 Loader."),
                io.String.Input("prompt", default="", tooltip="What to find, e.g. 'horse'; separate several with "
                                "' . '. Empty: the subject word of the connected MIVA stack's first adapter."),
                io.Float.Input("box_threshold", default=0.35, min=0.0, max=1.0, step=0.01,
                               tooltip="A box is kept when its best prompt-word score is above this (0.35 is "
                               "GroundingDINO's usual value; lower finds more, higher fewer)."),
                io.Float.Input("text_threshold", default=0.25, min=0.0, max=1.0, step=0.01,
                               tooltip="Which prompt words label a box: those scoring above this (shown on the "
                               "node); as in GroundingDINO, it does not remove boxes."),
                io.Combo.Input("mode", options=list(MODES), default="best box",
                               tooltip="best box: the mask of the highest-scoring box; union: the union of the masks "
                               "of every box over the threshold (several animals of one kind, say)."),
                MivaStackType.Input("miva_stack", optional=True,
                                    tooltip="Optional: a MIVA stack; with an empty prompt, its first adapter's "
                                    "subject word is the prompt."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="The subject's mask per image, [batch, height, width], "
                               "1 on the subject, 0 elsewhere (all 0 where nothing was found)."),
                io.Image.Output(display_name="preview", tooltip="The image with the box(es) outlined and the mask "
                                "tinted over it."),
            ],
        )

    @classmethod
    def execute(cls, image, grounding_dino, sam2, prompt, box_threshold, text_threshold, mode,
                miva_stack=None) -> io.NodeOutput:
        cls.check_inputs(box_threshold=box_threshold, text_threshold=text_threshold, mode=mode)
        text = prompt.strip() or stack_subject(miva_stack)
        if not text:
            raise ValueError("Subject Mask needs a prompt: type what to find (e.g. 'horse'), or connect a MIVA stack "
                             "whose first adapter names its subject.")
        images = rgb(image)
        comfy.model_management.load_models_gpu([grounding_dino.patcher, sam2.patcher], force_full_load=True)
        masks, previews, lines = [], [], [f"prompt: {text} ({mode}, box threshold {box_threshold:.2f})"]
        for index, picture in enumerate(images):
            comfy.model_management.throw_exception_if_processing_interrupted()
            mask, used = segmentation.subject_mask(grounding_dino.model, sam2.model, picture, text, box_threshold,
                                                   text_threshold, union=mode == "union")
            if len(used):
                lines.append(f"image {index + 1}: {describe(used)}; mask covers {float(mask.mean()):.1%}")
            else:
                warning = (f"WARNING: no '{text}' found in image {index + 1} (no box scored above {box_threshold:.2f});"
                           " its mask is empty. Try a lower box_threshold or another word.")
                log.warning("Subject Mask: %s", warning)
                lines.append(warning)
            masks.append(mask)
            previews.append(segmentation.draw_preview(picture, mask, used.boxes))
        mask = torch.stack(masks).to(comfy.model_management.intermediate_device())
        preview = torch.stack(previews).to(comfy.model_management.intermediate_device())
        return io.NodeOutput(mask, preview, ui=ui.PreviewText("\n".join(lines)))


NODES = (GroundingDINOLoader, SAM2Loader, SubjectMask)
