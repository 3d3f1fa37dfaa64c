"""The pack in ComfyUI's real web UI, driven by headless Chromium (Debian's /usr/bin/chromium) through Playwright."""

import json
import time
import urllib.request

import pytest
from host import REPO, Server
from playwright.sync_api import sync_playwright
from tiny_graph import shrink_api, tinyify_api
from tiny_segmenters import GROUNDING_DINO_FILE, SAM2_PT_FILE
from workflow_formats import api_to_ui

WORKFLOWS = REPO / "workflows"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHIPPED = ["dymos_wan21_i2v", "dymos_wan22_i2v", "dymos_hunyuan15_i2v", "edg_wan21_i2v", "edg_switch_wan22_i2v",
           "miva_wan21_one_adapter", "miva_wan21_two_adapters", "miva_dymos_wan21", "mmiva_wan21_one_subject",
           "mmiva_wan21_subject_and_background"]


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


def screenshot_around(page, node_type: str, file_name: str, scale: float = 1.3, at=(350, 150), directory=ARTIFACTS,
                      clip: dict | None = None):
    """Zoom the canvas so a node's corner sits at screen point ``at``; keep a screenshot (of ``clip`` only, if
    given) in ``directory``."""
    page.evaluate("""([nodeType, scale, at]) => {
        const canvas = window.app.canvas;
        const node = window.app.graph._nodes.find((n) => n.type === nodeType);
        canvas.ds.scale = scale;
        canvas.ds.offset = [-node.pos[0] + at[0] / scale, -node.pos[1] + at[1] / scale];
        canvas.setDirty(true, true);
    }""", [node_type, scale, at])
    page.wait_for_timeout(300)
    directory.mkdir(exist_ok=True)
    page.screenshot(path=str(directory / file_name), clip=clip)
    assert (directory / file_name).stat().st_size > 10_000


@pytest.mark.parametrize("name", ["edg_wan21_i2v", "edg_switch_wan22_i2v", "miva_wan21_one_adapter",
                                  "miva_wan21_two_adapters", "miva_dymos_wan21", "mmiva_wan21_one_subject",
                                  "mmiva_wan21_subject_and_background"])
def test_shipped_workflow_queued_from_the_web_ui_finishes(page, server, name):
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


# ---- MIVA (js/miva.js) ---------------------------------------------------------------------------------------
HORSE, WATERFALL = "miva_wan2.1_t2v_1.3b_horse_running.safetensors", "miva_wan2.1_t2v_1.3b_waterfall.safetensors"
STACK_ROWS = 8
EMPTY_ROW = ("None", 1.0, True)


def stack_state(page) -> dict:
    """The MIVA Stack's rows as the web UI shows them, its hidden widgets, and whether its size fits them."""
    return page.evaluate("""(rows) => {
        const node = window.app.graph._nodes.find((n) => n.type === "MIVAStack");
        const widget = (name) => node.widgets.find((w) => w.name === name);
        const shown = [], values = [];
        for (let i = 1; i <= rows; i++) {
            const names = [`miva_row_${i}`, `adapter_${i}`, `weight_${i}`, `enabled_${i}`];
            const visible = names.map((name) => node.isWidgetVisible(widget(name)));
            if (new Set(visible).size !== 1) throw new Error(`row ${i} is partly hidden: ${visible}`);
            shown.push(visible[0]);
            values.push([widget(`adapter_${i}`).value, widget(`weight_${i}`).value, widget(`enabled_${i}`).value]);
        }
        const add = widget("miva_add");
        return {
            shown, values, rows: values.filter((_, i) => shown[i]),
            add_button: node.isWidgetVisible(add) ? (add.disabled ? "disabled" : add.label) : null,
            height: node.size[1], fits: node.size[1] === node.computeSize()[1],
            hidden_have_no_height: node.widgets.filter((w) => w.hidden).every((w) => w.computeSize()[1] === -4),
        };
    }""", STACK_ROWS)


def assert_stack(page, rows: list[tuple]) -> dict:
    """Exactly ``rows`` (adapter, weight, enabled) are shown, first to last; every later slot is hidden and empty."""
    state = stack_state(page)
    n = len(rows)
    assert state["shown"] == [True] * n + [False] * (STACK_ROWS - n)
    assert [tuple(row) for row in state["rows"]] == [tuple(row) for row in rows]
    assert all(tuple(row) == EMPTY_ROW for row in state["values"][n:])
    assert state["fits"] and state["hidden_have_no_height"]
    assert state["add_button"] == ("+ add adapter" if n < STACK_ROWS else "disabled")
    return state


def set_stack_widget(page, name: str, value):
    page.evaluate("""([name, value]) => {
        const node = window.app.graph._nodes.find((n) => n.type === "MIVAStack");
        const widget = node.widgets.find((w) => w.name === name);
        widget.value = value;
        widget.callback?.(value);
        node.setDirtyCanvas(true, true);
    }""", [name, value])


def click_stack_widget(page, name: str, x: float | None = None, button: str = "left"):
    """Click the MIVA Stack's widget ``name`` on the canvas: in its middle, or ``x`` canvas units from the node's
    left edge (from its right edge when negative)."""
    point = page.evaluate("""([name, x]) => {
        const canvas = window.app.canvas;
        const node = window.app.graph._nodes.find((n) => n.type === "MIVAStack");
        const widget = node.widgets.find((w) => w.name === name);
        const height = widget.computeSize?.(node.size[0])[1] ?? window.LiteGraph.NODE_WIDGET_HEIGHT;
        const localX = x === null ? node.size[0] / 2 : x < 0 ? node.size[0] + x : x;
        const [cx, cy] = canvas.ds.convertOffsetToCanvas([node.pos[0] + localX, node.pos[1] + widget.y + height / 2]);
        const rect = canvas.canvas.getBoundingClientRect();
        return [rect.left + cx, rect.top + cy];
    }""", [name, x])
    page.mouse.click(*point, button=button)
    page.wait_for_timeout(200)


# the header's buttons, from the node's right edge (js/miva.js: 20 px each, ending 15 px from the edge)
MOVE_UP, MOVE_DOWN, REMOVE = -65, -45, -25


def api_rows(prompt: dict) -> list[tuple]:
    (stack,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "MIVAStack"]
    return [(stack[f"adapter_{i}"], stack[f"weight_{i}"], stack[f"enabled_{i}"]) for i in range(1, STACK_ROWS + 1)]


def test_miva_stack_rows_are_added_moved_toggled_removed_saved_and_sent_plainly(page, server):
    page.evaluate("""() => {
        window.app.graph.clear();
        const node = window.LiteGraph.createNode("MIVAStack");
        node.pos = [300, 260];
        window.app.graph.add(node);
        window.app.canvas.ds.scale = 1;
        window.app.canvas.ds.offset = [0, 0];
        window.app.canvas.setDirty(true, true);
    }""")
    page.wait_for_timeout(300)
    first = assert_stack(page, [EMPTY_ROW])

    # pick row 1's adapter from the combo's own menu, on the canvas
    click_stack_widget(page, "adapter_1")
    page.locator(".litecontextmenu").get_by_text(HORSE, exact=True).click()
    set_stack_widget(page, "weight_1", 0.75)
    assert_stack(page, [(HORSE, 0.75, True)])

    click_stack_widget(page, "miva_add")
    two = assert_stack(page, [(HORSE, 0.75, True), EMPTY_ROW])
    assert two["height"] > first["height"]
    set_stack_widget(page, "adapter_2", WATERFALL)
    set_stack_widget(page, "weight_2", 0.5)
    click_stack_widget(page, "miva_add")
    set_stack_widget(page, "adapter_3", HORSE)
    set_stack_widget(page, "weight_3", -0.25)
    three = assert_stack(page, [(HORSE, 0.75, True), (WATERFALL, 0.5, True), (HORSE, -0.25, True)])
    assert three["height"] - two["height"] == two["height"] - first["height"]

    click_stack_widget(page, "enabled_2")  # the toggle
    assert_stack(page, [(HORSE, 0.75, True), (WATERFALL, 0.5, False), (HORSE, -0.25, True)])
    click_stack_widget(page, "miva_row_2", MOVE_UP)
    assert_stack(page, [(WATERFALL, 0.5, False), (HORSE, 0.75, True), (HORSE, -0.25, True)])
    click_stack_widget(page, "miva_row_1", MOVE_UP)  # the first row stays first
    click_stack_widget(page, "miva_row_3", MOVE_DOWN)  # the last row stays last
    assert_stack(page, [(WATERFALL, 0.5, False), (HORSE, 0.75, True), (HORSE, -0.25, True)])
    click_stack_widget(page, "miva_row_2", MOVE_DOWN)
    assert_stack(page, [(WATERFALL, 0.5, False), (HORSE, -0.25, True), (HORSE, 0.75, True)])
    click_stack_widget(page, "miva_row_2", REMOVE)
    after_remove = assert_stack(page, [(WATERFALL, 0.5, False), (HORSE, 0.75, True)])
    assert after_remove["height"] == two["height"]

    # the same actions from the node's right-click menu: add a row, then remove it again
    click_stack_widget(page, "miva_row_1", 40, button="right")
    page.get_by_text("MIVA rows", exact=True).click()
    page.locator(".litecontextmenu").last.get_by_text("Add adapter row", exact=True).click()
    page.wait_for_timeout(200)
    assert_stack(page, [(WATERFALL, 0.5, False), (HORSE, 0.75, True), EMPTY_ROW])
    click_stack_widget(page, "miva_row_1", 40, button="right")
    page.get_by_text("MIVA rows", exact=True).click()
    page.locator(".litecontextmenu").last.get_by_text("Row 3: None", exact=True).click()
    page.locator(".litecontextmenu").last.get_by_text("Remove row", exact=True).click()
    page.wait_for_timeout(200)
    assert_stack(page, [(WATERFALL, 0.5, False), (HORSE, 0.75, True)])

    # the API prompt holds the plain slots, in the order shown
    expected = [(WATERFALL, 0.5, False), (HORSE, 0.75, True)] + [EMPTY_ROW] * (STACK_ROWS - 2)
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert api_rows(prompt) == expected
    (stack_inputs,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "MIVAStack"]
    assert set(stack_inputs) == {f"{kind}_{i}" for kind in ("adapter", "weight", "enabled")
                                 for i in range(1, STACK_ROWS + 1)}

    # saved and loaded again: widgets_values are the 24 slot values in order, and the rows in use come back
    workflow = json.loads(page.evaluate("() => JSON.stringify(window.app.graph.serialize())"))
    (saved,) = [node for node in workflow["nodes"] if node["type"] == "MIVAStack"]
    assert saved["widgets_values"] == [value for row in expected for value in row]
    page.evaluate("() => window.app.graph.clear()")
    load_graph(page, workflow)
    assert not load_problem_shown(page)
    reloaded = assert_stack(page, [(WATERFALL, 0.5, False), (HORSE, 0.75, True)])
    assert reloaded["height"] == after_remove["height"]
    assert api_rows(page.evaluate("async () => (await window.app.graphToPrompt()).output")) == expected

    # a link into a hidden row's widget shows the rows up to it; the value then comes from the link
    page.evaluate("""() => {
        const node = window.app.graph._nodes.find((n) => n.type === "MIVAStack");
        const source = window.LiteGraph.createNode("PrimitiveFloat");
        source.pos = [0, 260];
        window.app.graph.add(source);
        source.connect(0, node, node.findInputSlot("weight_4"));
    }""")
    page.wait_for_timeout(200)
    assert_stack(page, [(WATERFALL, 0.5, False), (HORSE, 0.75, True), EMPTY_ROW, EMPTY_ROW])
    page.evaluate("""() => {
        const source = window.app.graph._nodes.find((n) => n.type === "PrimitiveFloat");
        window.app.graph.remove(source);
    }""")

    # at most eight rows; removing the last row in use leaves one empty row
    page.evaluate("""() => {
        const node = window.app.graph._nodes.find((n) => n.type === "MIVAStack");
        for (let i = 0; i < 10; i++) node.mivaRows.add();
    }""")
    assert_stack(page, [(WATERFALL, 0.5, False), (HORSE, 0.75, True)] + [EMPTY_ROW] * (STACK_ROWS - 2))
    page.evaluate("""() => {
        const node = window.app.graph._nodes.find((n) => n.type === "MIVAStack");
        for (let i = 0; i < 10; i++) node.mivaRows.remove(1);
    }""")
    assert_stack(page, [EMPTY_ROW])

    # the picture for the README: the two rows, the second one switched off
    load_graph(page, workflow)
    width, height = page.evaluate("""() => {
        window.app.canvas.deselectAll();
        return [...window.app.graph._nodes.find((n) => n.type === "MIVAStack").size];
    }""")
    scale, at, title = 1.3, (350, 150), 30
    clip = {"x": at[0] - 30, "y": at[1] - (title + 20) * scale, "width": width * scale + 60,
            "height": (height + title + 40) * scale}
    screenshot_around(page, "MIVAStack", "miva_stack.png", scale=scale, at=at, clip=clip)


def miva_run_graph() -> dict:
    """API graph: the tiny Wan 2.1 T2V with MIVA Loader (horse) -> MIVA Stack (row 2: waterfall) -> MIVA Apply."""
    stack_rows = {f"{kind}_{i}": value for i in range(1, STACK_ROWS + 1)
                  for kind, value in zip(("adapter", "weight", "enabled"), EMPTY_ROW, strict=True)}
    stack_rows.update(adapter_2=WATERFALL, weight_2=0.5)
    text = {"family": "wan", "tokens": 8}
    return {
        "1": {"class_type": "UNETLoader",
              "inputs": {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "MIVALoader", "inputs": {"adapter_name": HORSE, "weight": 0.8, "model": ["1", 0]}},
        "3": {"class_type": "MIVAStack", "inputs": {"stack": ["2", 0], **stack_rows}},
        "4": {"class_type": "MIVAApply", "inputs": {"model": ["1", 0], "stack": ["3", 0]}},
        "5": {"class_type": "MotionDialsTestConditioning", "inputs": {**text, "text": "a horse runs by a waterfall"}},
        "6": {"class_type": "MotionDialsTestConditioning", "inputs": {**text, "text": "static"}},
        "7": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9,
                                                                 "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 1, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["9", 0]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
    }


def test_miva_loader_and_stack_show_their_adapters_after_a_run_from_the_web_ui(page, server):
    load_graph(page, api_to_ui(miva_run_graph(), server.get_json("/object_info")))
    assert unknown_node_types(page) == []
    assert not load_problem_shown(page)
    # row 1 is empty but row 2 is in use: both are shown, so the rows stay contiguous
    assert_stack(page, [EMPTY_ROW, (WATERFALL, 0.5, True)])

    entry = queue_from_the_browser(page, server)
    assert api_rows(entry["prompt"][2]) == [EMPTY_ROW, (WATERFALL, 0.5, True)] + [EMPTY_ROW] * (STACK_ROWS - 2)
    assert "horse running" in entry["outputs"]["2"]["text"][0]

    page.wait_for_timeout(500)
    shown = page.evaluate("""() => Object.fromEntries(window.app.graph._nodes
        .filter((n) => n.type === "MIVALoader" || n.type === "MIVAStack")
        .map((n) => {
            const info = n.mivaInfo;
            n.mivaInfo = "";
            const without = n.computeSize()[1];
            n.mivaInfo = info;
            return [n.type, {info, height: n.size[1], needed: n.computeSize()[1], without}];
        }))""")
    loader, stack = shown["MIVALoader"], shown["MIVAStack"]
    assert "motion: horse running" in loader["info"] and "subject: horse" in loader["info"]
    assert loader["height"] >= loader["needed"] > loader["without"]  # the node grew to show the text
    assert stack["info"].index("motion: horse running") < stack["info"].index("motion: waterfall")
    assert stack["height"] >= stack["needed"] > stack["without"]
    screenshot_around(page, "MIVALoader", "web_ui_miva.png", scale=1.0, at=(300, 200))


def subject_mask_graph(box_threshold: float) -> dict:
    """API graph: the start image, the tiny GroundingDINO and SAM 2, Subject Mask ("horse"), its preview shown."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {"class_type": "MotionDialsGroundingDINOLoader",
              "inputs": {"model_name": GROUNDING_DINO_FILE, "device": "auto", "precision": "fp32"}},
        "3": {"class_type": "MotionDialsSAM2Loader",
              "inputs": {"model_name": SAM2_PT_FILE, "device": "auto", "precision": "fp32"}},
        "4": {"class_type": "MotionDialsSubjectMask", "inputs": {
            "image": ["1", 0], "grounding_dino": ["2", 0], "sam2": ["3", 0], "prompt": "horse",
            "box_threshold": box_threshold, "text_threshold": 0.25, "mode": "best box"}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
    }


def node_info(page, node_type: str) -> str:
    return page.evaluate("(type) => window.app.graph._nodes.find((n) => n.type === type).mivaInfo ?? ''", node_type)


def test_subject_mask_shows_what_it_found_or_a_warning_on_the_node(page, server):
    object_info = server.get_json("/object_info")
    load_graph(page, api_to_ui(subject_mask_graph(1.0), object_info))
    assert unknown_node_types(page) == []
    entry = queue_from_the_browser(page, server)
    page.wait_for_timeout(300)
    warning = node_info(page, "MotionDialsSubjectMask")
    assert "WARNING: no 'horse' found in image 1" in warning
    assert entry["outputs"]["4"]["text"][0] == warning
    assert "fp32" in node_info(page, "MotionDialsSAM2Loader")  # what the loader loaded, on the node

    load_graph(page, api_to_ui(subject_mask_graph(0.0), object_info))  # the tiny model finds a box at threshold 0
    queue_from_the_browser(page, server)
    page.wait_for_timeout(500)
    found = node_info(page, "MotionDialsSubjectMask")
    assert found.startswith("prompt: horse (best box") and "image 1: " in found and "WARNING" not in found
    # the picture for the README: the loaders, the node with what it found, and the preview
    page.evaluate("() => window.app.canvas.deselectAll()")
    screenshot_around(page, "LoadImage", "subject_mask.png", scale=0.9, at=(110, 190),
                      clip={"x": 90, "y": 140, "width": 1000, "height": 640})
