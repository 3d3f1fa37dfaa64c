"""UI-format (litegraph) workflows from API-format ones, using a server's /object_info.

`python -m tests.workflow_formats` rewrites every `workflows/NAME.json` from `workflows/NAME.api.json`:
the API file is the source of truth, the UI file is what users drag into the web UI. The browser test
checks that the web UI turns each UI file back into its API file.
"""

from __future__ import annotations

import json
from pathlib import Path

if __package__:  # `python -m tests.workflow_formats`
    from .host import REPO, Server
else:  # imported by the tests, with tests/ on sys.path
    from host import REPO, Server

SOCKET_FREE_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_WIDTH, ROW_HEIGHT = 360, 260


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in SOCKET_FREE_TYPES


def _input_specs(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order", {})
    specs = []
    for section in ("required", "optional"):
        declared = info["input"].get(section, {})
        for name in order.get(section, list(declared)):
            specs.append((name, declared[name]))
    return specs


def node_widget_names(info: dict, node: dict) -> list[str]:
    return [name for name, spec in _input_specs(info) if _is_widget(spec) and name in node["inputs"]]


def _depths(api: dict) -> dict[str, int]:
    """Column of each node: one more than the deepest node feeding it."""
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            sources = [value[0] for value in api[node_id]["inputs"].values() if isinstance(value, list)]
            depth[node_id] = 1 + max((visit(source) for source in sources), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def api_to_ui(api: dict, object_info: dict) -> dict:
    depth = _depths(api)
    rows_used: dict[int, int] = {}
    nodes, links = {}, []
    for order, node_id in enumerate(sorted(api, key=lambda n: (depth[n], int(n)))):
        node = api[node_id]
        info = object_info[node["class_type"]]
        column = depth[node_id]
        row = rows_used.get(column, 0)
        rows_used[column] = row + 1
        inputs, widgets = [], []
        for name, spec in _input_specs(info):
            value = node["inputs"].get(name)
            if _is_widget(spec):
                if name in node["inputs"]:
                    widgets.append(value)
                    if spec[1].get("control_after_generate") if len(spec) > 1 else False:
                        widgets.append("fixed")
                    if spec[1].get("image_upload") if len(spec) > 1 else False:
                        widgets.append("image")
                continue
            inputs.append({"name": name, "type": spec[0], "link": None})
        outputs = [{"name": output_name, "type": output_type, "links": []}
                   for output_name, output_type in zip(info["output_name"], info["output"], strict=True)]
        nodes[node_id] = {
            "id": int(node_id), "type": node["class_type"], "pos": [column * COLUMN_WIDTH, row * ROW_HEIGHT],
            "size": [320, 60 + 24 * (max(len(inputs), len(outputs)) + len(node_widget_names(info, node)))],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        }
        title = node.get("_meta", {}).get("title")
        if title and title != info.get("display_name"):
            nodes[node_id]["title"] = title

    for node_id, node in api.items():
        for target_slot, slot in enumerate(nodes[node_id]["inputs"]):
            source = node["inputs"].get(slot["name"])
            if not isinstance(source, list):
                continue
            link_id = len(links) + 1
            origin, origin_slot = source
            links.append([link_id, int(origin), origin_slot, int(node_id), target_slot, slot["type"]])
            slot["link"] = link_id
            nodes[origin]["outputs"][origin_slot]["links"].append(link_id)

    return {
        "last_node_id": max(int(n) for n in api), "last_link_id": len(links),
        "nodes": list(nodes.values()), "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4,
    }


def main():
    api_files = sorted((REPO / "workflows").glob("*.api.json"))
    with Server() as server:
        object_info = server.get_json("/object_info")
    for api_file in api_files:
        ui_file = Path(str(api_file).removesuffix(".api.json") + ".json")
        ui_file.write_text(json.dumps(api_to_ui(json.loads(api_file.read_text()), object_info), indent=2) + "\n")
        print(f"wrote {ui_file.relative_to(REPO)}")


if __name__ == "__main__":
    main()
