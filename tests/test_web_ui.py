"""The pack in ComfyUI's real web UI, driven by headless Chromium (Debian's /usr/bin/chromium) through Playwright."""

import json
import time
import urllib.request

import pytest
from host import REPO, Server
from playwright.sync_api import sync_playwright
from tiny_graph import shrink_api, tinyify_api
from workflow_formats import api_to_ui

WORKFLOWS = REPO / "workflows"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHIPPED = ["dymos_wan21_i2v", "dymos_wan22_i2v", "dymos_hunyuan15_i2v", "edg_wan21_i2v", "edg_switch_wan22_i2v"]


@pytest.fixture(scope="module")
def server(tiny_models):
    with Server() as running:
        running.upload_image(WORKFLOWS / "example.png")
        yield running


def set_user_setting(server, setting: str, value):
    request = urllib.request.Request(f"{server.url}/settings/{setting}", data=json.dumps(value).encode(), method="POST")
    urllib.request.urlopen(request, timeout=30).close()


@pytest.fixture(scope="module")
def page(server):
    set_user_setting(server, "Comfy.TutorialCompleted", True)  # no template browser over the canvas
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(server.url)
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=60_000)
        yield page
        browser.close()


def load_graph(page, workflow: dict):
    page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)
    page.wait_for_timeout(300)


def unknown_node_types(page) -> list[str]:
    return page.evaluate("""() => window.app.graph._nodes
        .map((node) => node.type)
        .filter((type) => !window.LiteGraph.registered_node_types[type])""")


def load_problem_shown(page) -> bool:
    """The frontend's missing-nodes dialog, or its alert for a workflow that fails its schema."""
    missing_nodes = page.get_by_text("missing", exact=False).filter(has_text="node").count()
    invalid = page.get_by_text("Invalid workflow", exact=False).count()
    return missing_nodes + invalid > 0


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_ui_workflow_loads_and_matches_its_api_twin(page, name):
    """No missing node; and the web UI turns the UI file into exactly the API file we ship."""
    load_graph(page, json.loads((WORKFLOWS / f"{name}.json").read_text()))
    assert unknown_node_types(page) == []
    assert not load_problem_shown(page)
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    shipped = json.loads((WORKFLOWS / f"{name}.api.json").read_text())
    assert {k: v["class_type"] for k, v in prompt.items()} == {k: v["class_type"] for k, v in shipped.items()}
    for node_id, node in shipped.items():
        assert prompt[node_id]["inputs"] == node["inputs"], f"node {node_id} ({node['class_type']})"


def load_tiny_graph(page, server, name: str):
    """The shipped workflow made runnable on the tiny models, loaded into the web UI as a UI-format graph."""
    tiny = shrink_api(tinyify_api(json.loads((WORKFLOWS / f"{name}.api.json").read_text())))
    load_graph(page, api_to_ui(tiny, server.get_json("/object_info")))
    assert unknown_node_types(page) == []
    assert not load_problem_shown(page)


def queue_from_the_browser(page, server) -> dict:
    """Press Queue in the web UI; wait for the run to finish and return its history entry (it must succeed)."""
    done_before = set(server.get_json("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + 120
    new_entries = {}
    while time.monotonic() < deadline and not new_entries:
        time.sleep(0.5)
        history = server.get_json("/history")
        new_entries = {k: v for k, v in history.items() if k not in done_before and v["status"].get("completed")}
    assert new_entries, "the queued prompt did not finish"
    (entry,) = new_entries.values()
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry


def screenshot_around(page, node_type: str, file_name: str, scale: float = 1.3, at=(350, 150)):
    """Zoom the canvas so a node's corner sits at screen point ``at``; keep a screenshot in test-artifacts/."""
    page.evaluate("""([nodeType, scale, at]) => {
        const canvas = window.app.canvas;
        const node = window.app.graph._nodes.find((n) => n.type === nodeType);
        canvas.ds.scale = scale;
        canvas.ds.offset = [-node.pos[0] + at[0] / scale, -node.pos[1] + at[1] / scale];
        canvas.setDirty(true, true);
    }""", [node_type, scale, at])
    page.wait_for_timeout(300)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / file_name))
    assert (ARTIFACTS / file_name).stat().st_size > 10_000


@pytest.mark.parametrize("name", ["edg_wan21_i2v", "edg_switch_wan22_i2v"])
def test_edg_workflow_queued_from_the_web_ui_finishes(page, server, name):
    load_tiny_graph(page, server, name)
    entry = queue_from_the_browser(page, server)
    saved = [item for node_out in entry["outputs"].values() for item in node_out.get("images", [])]
    assert saved, "the run saved no video"
    if name == "edg_wan21_i2v":
        screenshot_around(page, "EDGTimestepSwitch", "web_ui_edg.png", scale=0.8, at=(1000, 300))


def test_slider_in_the_web_ui_drives_a_real_run(page, server):
    load_tiny_graph(page, server, "dymos_wan21_i2v")

    slider = page.evaluate("""() => {
        const node = window.app.graph._nodes.find((n) => n.type === "DyMoSMotionSlider");
        const widget = node.widgets.find((w) => w.name === "strength");
        const before = widget.value;
        widget.value = 1.5;
        widget.callback?.(1.5);
        node.setDirtyCanvas(true, true);
        return {id: node.id, type: widget.type, before, after: widget.value};
    }""")
    assert slider["type"] == "slider" and slider["before"] == 1.0 and slider["after"] == 1.5

    executed_prompt = queue_from_the_browser(page, server)["prompt"][2]
    assert executed_prompt[str(slider["id"])]["inputs"]["strength"] == 1.5

    screenshot_around(page, "DyMoSMotionSlider", "web_ui_dymos.png")
