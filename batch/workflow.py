"""Workflows and sweeps: API format from a UI-format graph, nodes addressed by id or title, the jobs of a sweep."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field

# Node modes in a UI-format graph (litegraph): muted nodes are left out of the prompt, bypassed ones are
# passed through (their input of the same type feeds whoever read their output).
MODE_MUTED, MODE_BYPASSED = 2, 4
# Frontend-only nodes: never sent to the server.
NOTE_TYPES = {"Note", "MarkdownNote"}
REROUTE, PRIMITIVE = "Reroute", "PrimitiveNode"
SOCKET_FREE_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Widget options that make the frontend save one more entry in widgets_values after the input's own value
# ("fixed"/"randomize" for a seed's control, the upload button's "image").
EXTRA_WIDGET_VALUE_OPTIONS = ("control_after_generate", "image_upload")


class WorkflowError(ValueError):
    """A workflow or a sweep that cannot be turned into prompts; the message says what to fix."""


def is_ui_format(workflow: dict) -> bool:
    return isinstance(workflow.get("nodes"), list) and "links" in workflow


def _input_specs(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order", {})
    specs = []
    for section in ("required", "optional"):
        declared = info["input"].get(section, {})
        specs.extend((name, declared[name]) for name in order.get(section, list(declared)))
    return specs


def _is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in SOCKET_FREE_TYPES


def _spec_option(spec: list, option: str):
    return spec[1].get(option) if len(spec) > 1 and isinstance(spec[1], dict) else None


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API-format prompt the web UI would queue for a UI-format graph, with the server's /object_info."""
    nodes = {node["id"]: node for node in ui["nodes"]}
    # Links as [id, origin_id, origin_slot, target_id, target_slot, type]; the newer schema saves them as objects.
    links = {}
    for link in ui["links"]:
        if isinstance(link, dict):
            link = [link[key] for key in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")]
        links[link[0]] = link

    def source_of(link_id, seen=()):
        """What a link delivers, past reroutes and bypassed nodes: [origin id, slot], a primitive's value, or None."""
        link = links.get(link_id)
        if link is None or link_id in seen:
            return None
        origin = nodes.get(link[1])
        if origin is None or origin.get("mode") == MODE_MUTED:
            return None
        if origin["type"] == REROUTE:
            return source_of(origin["inputs"][0].get("link"), (*seen, link_id))
        if origin["type"] == PRIMITIVE:
            return {"value": origin["widgets_values"][0]}
        if origin.get("mode") == MODE_BYPASSED:
            output_type = origin["outputs"][link[2]]["type"]
            inputs = origin.get("inputs", [])
            # Like the frontend: the input in the same slot if its type matches, else the first that matches.
            candidates = [inputs[link[2]]] if link[2] < len(inputs) else []
            candidates += [slot for slot in inputs if slot.get("type") == output_type]
            for slot in candidates:
                if slot.get("type") == output_type and slot.get("link") is not None:
                    return source_of(slot["link"], (*seen, link_id))
            return None
        return [str(origin["id"]), link[2]]

    api = {}
    for node in sorted(ui["nodes"], key=lambda n: n.get("order", 0)):
        if node["type"] in NOTE_TYPES | {REROUTE, PRIMITIVE} or node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise WorkflowError(f"node {node['id']} is a {node['type']!r}, which the server does not know "
                                "(a custom node missing there?)")
        inputs = {}
        widget_values = node.get("widgets_values") or []
        position = 0
        for name, spec in _input_specs(info):
            if not _is_widget(spec) or _spec_option(spec, "forceInput"):
                continue  # a socket: its value comes through a link, below
            if isinstance(widget_values, dict):  # some custom nodes save their widgets by name
                if name in widget_values:
                    inputs[name] = widget_values[name]
                continue
            if position >= len(widget_values):
                break  # saved before the node gained this input
            inputs[name] = widget_values[position]
            position += 1 + sum(bool(_spec_option(spec, option)) for option in EXTRA_WIDGET_VALUE_OPTIONS)
        for slot in node.get("inputs", []):
            source = source_of(slot.get("link"))
            if isinstance(source, dict):
                inputs[slot["name"]] = source["value"]
            elif source is not None:
                inputs[slot["name"]] = source
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title") or info.get("display_name", node["type"])}}
    return api


def find_node(workflow: dict, reference: str) -> str:
    """The id of the node that ``reference`` names: its id, else its title, else its class (each must be unique)."""
    if reference in workflow:
        return reference
    for key in (lambda node: node.get("_meta", {}).get("title"), lambda node: node["class_type"]):
        matches = [node_id for node_id, node in workflow.items() if key(node) == reference]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise WorkflowError(f"{reference!r} names nodes {', '.join(matches)}: address one by its id")
    titles = sorted({node.get("_meta", {}).get("title", node["class_type"]) for node in workflow.values()})
    raise WorkflowError(f"no node {reference!r}; the workflow's nodes are titled: {', '.join(titles)}")


@dataclass
class Sweep:
    """One swept input: ``node`` (as given) ``.input`` takes each of ``values``, shown as ``labels`` if given."""

    node: str
    input: str
    values: list
    labels: list | None = None

    @property
    def label(self) -> str:
        return f"{self.node}.{self.input}"


_SWEEP = re.compile(r"^(?P<node>.+?)\.(?P<input>[A-Za-z_]\w*)=(?P<values>.*)$", re.DOTALL)
_RANGE = re.compile(r"^range\(\s*(-?\d+)\s*,\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?\)$")


def parse_sweep(text: str) -> Sweep:
    """``NODE.INPUT=V1,V2,...``, ``NODE.INPUT=range(START,STOP[,STEP])`` or ``NODE.INPUT=[JSON list]``."""
    match = _SWEEP.match(text)
    if not match:
        raise WorkflowError(f"cannot read --set {text!r}: expected NODE.INPUT=VALUES, e.g. 'KSampler.seed=1,2,3'")
    raw = match["values"].strip()
    if ranged := _RANGE.match(raw):
        values = list(range(*(int(part) for part in ranged.groups() if part is not None)))
    elif raw.startswith("["):
        try:
            values = json.loads(raw)
        except json.JSONDecodeError as error:
            raise WorkflowError(f"--set {text!r}: the list is not valid JSON ({error})") from None
    else:
        values = [_literal(part.strip()) for part in raw.split(",")]
    if not values:
        raise WorkflowError(f"--set {text!r} gives no values")
    return Sweep(match["node"], match["input"], values)


def _literal(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _typed_like(current, value):
    """``value`` as the type the workflow already holds there: a text stays text, a float input gets a float."""
    if isinstance(current, str):
        return value if isinstance(value, str) else json.dumps(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass
class Job:
    parameters: dict  # label -> value, what the job sets
    prompt: dict  # the API-format prompt queued
    id: str = field(init=False)

    def __post_init__(self):
        self.id = prompt_hash(self.prompt)


def prompt_hash(prompt: dict) -> str:
    """A job's identity: the same final prompt is the same job, whatever the sweep that made it."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def expand_jobs(workflow: dict, sweeps: list[Sweep], *, zipped: bool = False) -> list[Job]:
    """One job per combination of the sweeps' values: their cartesian product, or their zip."""
    targets = []
    for sweep in sweeps:
        node_id = find_node(workflow, sweep.node)
        current = workflow[node_id]["inputs"].get(sweep.input)
        if isinstance(current, list):
            raise WorkflowError(f"{sweep.label}: that input is connected to node {current[0]}, not a value to set")
        targets.append((node_id, current))
    if zipped and len({len(sweep.values) for sweep in sweeps}) > 1:
        lengths = ", ".join(f"{sweep.label}: {len(sweep.values)}" for sweep in sweeps)
        raise WorkflowError(f"--zip needs sweeps of one length ({lengths})")
    value_lists = [sweep.values for sweep in sweeps]
    combinations = zip(*value_lists, strict=True) if zipped else itertools.product(*value_lists)
    jobs = []
    for combination in combinations:
        prompt = json.loads(json.dumps(workflow))
        parameters = {}
        for sweep, (node_id, current), value in zip(sweeps, targets, combination, strict=True):
            prompt[node_id]["inputs"][sweep.input] = _typed_like(current, value)
            parameters[sweep.label] = sweep.labels[sweep.values.index(value)] if sweep.labels else value
        jobs.append(Job(parameters, prompt))
    return jobs
