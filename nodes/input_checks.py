"""The checks every node of the pack makes on its widget values, from its own schema, the same on every host.

ComfyUI checks a value against its input's min, max and choices at ``/prompt``, but not everywhere: a NaN passes
every min/max test, ComfyUI 0.3.75 skips the choices of V3 combo inputs, and a BOOLEAN is converted with
``bool()``, so the string ``"false"`` arrives as ``True``. ``MotionDialsNode.validate_inputs`` therefore checks
every value itself (a node that defines it takes over ComfyUI's own min/max/choice checks), and a prompt handler
marks non-boolean values of BOOLEAN inputs before ComfyUI converts them. Values that arrive through a link are
known only at run time; ``check_inputs`` gives a node the same checks there.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import ClassVar

import folder_paths
import torch
from comfy_api.latest import io

from .model_files import is_plain_name, searched_folders

log = logging.getLogger("motion_dials")
SHOWN_CHOICES = 8


class MotionDialsNode(io.ComfyNode):
    """Base of every node of the pack."""

    # combo inputs that name a file of a model folder: input id -> folder key of ComfyUI's registry
    model_file_inputs: ClassVar[dict[str, str]] = {}

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        problems = cls.input_problems(values)
        return "; ".join(problems) if problems else True

    @classmethod
    def extra_problems(cls, values: dict) -> list[str]:
        """A node's own checks of its values beyond its schema (known values only: a link's is None)."""
        return []

    @classmethod
    def check_inputs(cls, **values) -> None:
        """Raise ValueError naming the node and input for a value that came through a link and is out of bounds."""
        problems = cls.input_problems(values)
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def input_problems(cls, values: dict) -> list[str]:
        return schema_problems(cls, values) + cls.extra_problems(values)


def title_of(schema: io.Schema) -> str:
    return schema.display_name or schema.node_id


def _boolean_problem(value) -> str | None:
    if type(value) is bool:
        return None
    return f"is {value!r}; it takes true or false (a JSON boolean, not a string or a number)"


def _number(value: float | int) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _range(spec) -> str:
    low, high = spec.min, spec.max
    if low is not None and high is not None:
        return f"a number from {_number(low)} to {_number(high)}"
    if low is not None:
        return f"a number of at least {_number(low)}"
    if high is not None:
        return f"a number of at most {_number(high)}"
    return "a finite number"


def _number_problem(spec, value) -> str | None:
    integer = isinstance(spec, io.Int.Input)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"is {value!r}, not a number; set {_range(spec)}"
    if not integer and math.isnan(value):
        return f"is NaN (not a number); set {_range(spec)}"
    if not integer and math.isinf(value):
        return f"is {'minus ' if value < 0 else ''}infinity; set {_range(spec)}"
    if integer and value != int(value):
        return f"is {value!r}, not a whole number; set {_range(spec)}"
    if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
        return f"is {_number(value)}, outside its range; set {_range(spec)}"
    return None


def _choice_problem(spec, value) -> str | None:
    options = list(spec.options or [])
    if any(value == option and type(value) is type(option) for option in options):
        return None
    shown = ", ".join(repr(option) for option in options[:SHOWN_CHOICES])
    more = f" and {len(options) - SHOWN_CHOICES} more" if len(options) > SHOWN_CHOICES else ""
    return f"{value!r} is not one of its choices ({shown or 'none'}{more}); pick one from the list"


def _file_problem(folder: str, listed: list[str], value) -> str | None:
    """A model file name: plain, ``listed`` by ComfyUI, and inside one of the folder's registered folders (a link
    out of them is refused: register the folder it points to instead)."""
    if not isinstance(value, str) or not is_plain_name(value):
        return (f"{value!r} is not a file name inside models/{folder}/ (no '..', no absolute path); pick a file "
                "from the list")
    path = folder_paths.get_full_path(folder, value)
    if path is None or value not in listed:
        return (f"{value!r} is not a file in {searched_folders(folder)}; put it there and refresh the page, or pick "
                "one from the list")
    real = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(root)) for root in folder_paths.get_folder_paths(folder)]
    if not any(real.is_relative_to(root) for root in roots):
        return (f"{value!r} links to {real}, outside the '{folder}' model folders; add the folder it is in to "
                f"extra_model_paths.yaml under '{folder}' instead of linking to it")
    return None


def schema_problems(cls, values: dict) -> list[str]:
    """What is wrong with the given widget values of node ``cls``, one sentence each naming node and input.
    Values not given, and None (a link, whose value is not known yet), are not checked."""
    schema = cls.define_schema()
    problems = []
    for spec in schema.inputs:
        value = values.get(spec.id)
        if value is None:
            continue
        if isinstance(spec, (io.Float.Input, io.Int.Input)):
            problem = _number_problem(spec, value)
        elif isinstance(spec, io.Boolean.Input):
            problem = _boolean_problem(value)
        elif isinstance(spec, io.Combo.Input):
            folder = cls.model_file_inputs.get(spec.id)
            listed = [] if folder is None else folder_paths.get_filename_list(folder)
            # a choice that is no file of the folder ("None" in MIVA Stack) is checked as a plain choice
            if folder is None or (value in spec.options and value not in listed):
                problem = _choice_problem(spec, value)
            else:
                problem = _file_problem(folder, listed, value) or _choice_problem(spec, value)
        else:
            continue
        if problem:
            problems.append(f"{title_of(schema)}: {spec.id} {problem}.")
    return problems


class NotABoolean(str):
    """What a BOOLEAN input of the pack was given instead of true or false: it reads as the original value (as
    ComfyUI reports it back) and refuses to be taken as a truth value, so ComfyUI's ``bool()`` conversion fails
    with the reason, naming the input."""

    def __new__(cls, value, reason: str):
        marked = super().__new__(cls, repr(value))
        marked.reason = reason
        return marked

    def __bool__(self):
        raise ValueError(self.reason)


def mark_non_booleans(node_classes: dict[str, type], json_data: dict) -> dict:
    """An on-prompt handler: every value of a BOOLEAN input of a pack node that is not a JSON boolean (nor a link)
    becomes a NotABoolean."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data
    for node in prompt.values():
        cls = node_classes.get(node.get("class_type")) if isinstance(node, dict) else None
        inputs = node.get("inputs") if cls is not None else None
        if not isinstance(inputs, dict):
            continue
        schema = cls.define_schema()
        for spec in schema.inputs:
            value = inputs.get(spec.id)
            problem = _boolean_problem(value) if isinstance(spec, io.Boolean.Input) and value is not None \
                and not isinstance(value, list) else None
            if problem:
                inputs[spec.id] = NotABoolean(value, f"{title_of(schema)}: {spec.id} {problem}.")
    return json_data


def _prompt_server():
    """ComfyUI's running server, or None (the pack imported by a script or a test)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def install_prompt_handler(node_classes) -> None:
    """Mark non-boolean BOOLEAN values of ``node_classes`` in every prompt the server is sent."""
    server = _prompt_server()
    if server is None or getattr(server, "motion_dials_prompt_handler", False):
        return
    by_id = {cls.define_schema().node_id: cls for cls in node_classes}
    server.add_on_prompt_handler(lambda json_data: mark_non_booleans(by_id, json_data))
    server.motion_dials_prompt_handler = True


def warn_on_node(node_id: str | None, message: str) -> None:
    """A value that leaves a dial without effect, found at run time: in the log, and as text on the node in the
    web UI (where the run came from a server and the node's id is known)."""
    log.warning("%s", message)
    server = _prompt_server()
    if node_id is not None and server is not None:
        server.send_progress_text(f"WARNING: {message}", node_id)


def check_image(node: str, name: str, image, least: int = 1):
    """``image`` if it is a ComfyUI IMAGE [batch, height, width, channels] of at least ``least`` pictures; else a
    ValueError naming the node and input."""
    shape = list(getattr(image, "shape", ()))
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or shape[-1] not in (1, 3, 4):
        what = f"a tensor of shape {shape}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{node}: {name} must be an IMAGE [batch, height, width, 3]; it got {what}. Connect the "
                         "IMAGE output of a node such as Load Image (one picture is a batch of 1).")
    if not shape[0] or not shape[1] or not shape[2]:
        raise ValueError(f"{node}: {name} is an empty IMAGE batch ({shape}). Check the node that feeds it (a folder "
                         "without images, or a filter that kept none).")
    if shape[0] < least:
        raise ValueError(f"{node}: {name} needs at least {least} pictures, got {shape[0]}: connect a video's frames "
                         "(e.g. the output of VAE Decode).")
    return image
