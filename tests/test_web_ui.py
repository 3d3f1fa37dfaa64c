"""The pack in ComfyUI's real web UI, driven by headless Chromium (Debian's /usr/bin/chromium) through Playwright.

Every test runs once per node renderer the host's frontend has: the classic LiteGraph canvas, and Nodes 2.0 (the
Vue renderer, setting Comfy.VueNodes.Enabled) where the frontend package defines it. What the pack puts on its
nodes (the MIVA Stack's rows, the DyMoS hint, the text after a run) is checked in the page's DOM, where the user
sees it, in either renderer.
"""

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from host import REPO, Server, clips_as_videos, tiny_training
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
           "mmiva_wan21_subject_and_background", "miva_train_wan21"]
TRAINING_CLIPS = "horse_running"  # the clips folder the training workflow names, in the server's input folder
CLASSIC, NODES2 = "classic", "nodes2"
NODES2_SETTING = "Comfy.VueNodes.Enabled"


def frontend_renderers() -> list[str]:
    """The classic canvas always; Nodes 2.0 where the host's frontend package defines its setting."""
    import comfyui_frontend_package

    assets = Path(comfyui_frontend_package.__file__).parent / "static" / "assets"
    definition = re.compile(rb"""id:\s*["'`]""" + re.escape(NODES2_SETTING.encode()) + rb"""["'`]""")
    has_nodes2 = any(definition.search(path.read_bytes()) for path in assets.glob("*.js"))
    return [CLASSIC, NODES2] if has_nodes2 else [CLASSIC]


RENDERERS = frontend_renderers()


def artifact_name(file_name: str, renderer: str) -> str:
    """The classic renderer keeps the README pictures' names; Nodes 2.0 gets its own copies."""
    if renderer == CLASSIC:
        return file_name
    stem, suffix = file_name.rsplit(".", 1)
    return f"{stem}_{renderer}.{suffix}"


@pytest.fixture(scope="module")
def server(tiny_models):
    with Server() as running:
        running.upload_image(WORKFLOWS / "example.png")
        running.write_clips(TRAINING_CLIPS)
        yield running


def set_user_setting(server, setting: str, value):
    request = urllib.request.Request(f"{server.url}/settings/{setting}", data=json.dumps(value).encode(), method="POST")
    urllib.request.urlopen(request, timeout=30).close()


@pytest.fixture(scope="module", params=RENDERERS)
def renderer(request):
    return request.param


@pytest.fixture(scope="module")
def page(server, renderer):
    set_user_setting(server, "Comfy.TutorialCompleted", True)  # no template browser over the canvas
    set_user_setting(server, NODES2_SETTING, renderer == NODES2)
    set_user_setting(server, "Comfy.VueNodes.AutoScaleLayout", False)  # nodes stay where the workflow puts them
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(server.url)
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=60_000)
        # the renderer asked for is the one drawing
        page.wait_for_function("(vue) => !!window.LiteGraph.vueNodesMode === vue", arg=renderer == NODES2,
                               timeout=30_000)
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
    page.wait_for_timeout(400)
    directory.mkdir(exist_ok=True)
    page.screenshot(path=str(directory / file_name), clip=clip)
    assert (directory / file_name).stat().st_size > 10_000


# ---- where a node is on the screen, in either renderer ----------------------------------------------------------
# JS: the node's box on the screen (title included): its own element in Nodes 2.0, its place on the canvas otherwise;
# and the pack's DOM elements of a kind that lie inside it, visible.
NODE_DOM = """
const nodeOfType = (type) => window.app.graph._nodes.find((n) => n.type === type);
const nodeBox = (node) => {
    if (window.LiteGraph.vueNodesMode) {
        const element = document.querySelector(`[data-node-id="${node.id}"]`);
        const r = element.getBoundingClientRect();
        return {left: r.left, top: r.top, right: r.right, bottom: r.bottom, scale: window.app.canvas.ds.scale};
    }
    const canvas = window.app.canvas;
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const [x, y] = canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - title]);
    const rect = canvas.canvas.getBoundingClientRect();
    const scale = canvas.ds.scale;
    return {left: rect.left + x, top: rect.top + y, right: rect.left + x + node.size[0] * scale,
            bottom: rect.top + y + (node.size[1] + title) * scale, scale};
};
const visible = (element) => {
    const r = element.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && getComputedStyle(element).visibility !== "hidden";
};
const inside = (element, box, slack = 2) => {
    const r = element.getBoundingClientRect();
    return r.left >= box.left - slack && r.right <= box.right + slack && r.top >= box.top - slack
        && r.bottom <= box.bottom + slack;
};
const elementsOn = (node, selector) => {
    const box = nodeBox(node);
    return [...document.querySelectorAll(selector)].filter((e) => visible(e) && inside(e, box));
};
const widgetLabelsShown = (node) => {
    // the labels of the frontend's own widgets the user sees on the node
    if (window.LiteGraph.vueNodesMode) {
        const element = document.querySelector(`[data-node-id="${node.id}"]`);
        return [...element.querySelectorAll(".lg-node-widget")].filter(visible)
            .map((row) => row.innerText.split("\\n")[0].trim());
    }
    return node.widgets.filter((w) => node.isWidgetVisible(w) && !w.element).map((w) => w.label || w.name);
};
"""


def node_text(page, node_type: str, name: str) -> str:
    """The pack's text widget ``name`` as shown on the node of ``node_type`` ('' when nothing is shown)."""
    return page.evaluate(f"""([type, name]) => {{ {NODE_DOM}
        const shown = elementsOn(nodeOfType(type), `[data-motion-dials-text="${{name}}"]`);
        if (shown.length > 1) throw new Error(`${{shown.length}} ${{name}} texts on the node`);
        return shown.length ? shown[0].innerText.trim() : "";
    }}""", [node_type, name])


# ---- node menus ------------------------------------------------------------------------------------------------
def node_title_point(page, node_type: str) -> list[float]:
    return page.evaluate("""(type) => {
        const canvas = window.app.canvas;
        const node = window.app.graph._nodes.find((n) => n.type === type);
        const [x, y] = canvas.ds.convertOffsetToCanvas([node.pos[0] + 60, node.pos[1] - 15]);
        const rect = canvas.canvas.getBoundingClientRect();
        return [rect.left + x, rect.top + y];
    }""", node_type)


def menu_entry(page, renderer: str, text: str):
    menus = page.locator(".litecontextmenu" if renderer == CLASSIC else ".p-contextmenu")
    return menus.get_by_text(text, exact=True).last


def close_menus(page):
    page.keyboard.press("Escape")
    page.wait_for_timeout(200)
    page.evaluate("() => document.querySelectorAll('.litecontextmenu').forEach((m) => m.remove())")


def node_menu(page, renderer: str, node_type: str, path: list[str]):
    """Right-click the node's title, then open each submenu of ``path`` and click its last entry."""
    page.mouse.click(*node_title_point(page, node_type), button="right")
    page.wait_for_timeout(400)
    for text in path[:-1]:
        entry = menu_entry(page, renderer, text)
        entry.hover() if renderer == NODES2 else entry.click()  # Nodes 2.0 opens submenus on hover
        page.wait_for_timeout(400)
    menu_entry(page, renderer, path[-1]).click()
    page.wait_for_timeout(300)


def node_menu_shows_extension_items(page, renderer: str) -> bool:
    """Whether this renderer's node menu lists what extensions add (getExtraMenuOptions), tried on a core node."""
    if renderer == CLASSIC:
        return True
    page.evaluate("""() => {
        const probe = window.LiteGraph.createNode("PrimitiveFloat");
        probe.pos = [900, 700];
        probe.getExtraMenuOptions = () => [{content: "Motion Dials menu probe", callback: () => {}}];
        window.app.graph.add(probe);
    }""")
    page.wait_for_timeout(400)
    page.mouse.click(*node_title_point(page, "PrimitiveFloat"), button="right")
    page.wait_for_timeout(400)
    shown = page.get_by_text("Motion Dials menu probe", exact=True).count() > 0
    close_menus(page)
    page.evaluate("""() => window.app.graph.remove(window.app.graph._nodes.find((n) => n.type === "PrimitiveFloat"))""")
    return shown


# ---- DyMoS (js/dymos.js) --------------------------------------------------------------------------------------
def describe(strength: float, tau: float) -> str:
    """What js/dymos.js says the slider does."""
    if strength == 0 or tau == 0:
        return "off: the model is left untouched"
    return f"{'more motion' if strength > 0 else 'more static'}, first {round(tau * 100)} % of denoising"


def set_dymos_widget(page, name: str, value: float):
    page.evaluate("""([name, value]) => {
        const node = window.app.graph._nodes.find((n) => n.type === "DyMoSMotionSlider");
        const widget = node.widgets.find((w) => w.name === name);
        widget.value = value;
        widget.callback?.(value);
        node.setDirtyCanvas(true, true);
    }""", [name, value])
    page.wait_for_timeout(100)


def type_tau_on_the_node(page, renderer: str, value: str):
    """Type a new tau into the node's own widget, as a user does."""
    if renderer == NODES2:
        row = page.locator(".lg-node-widget").filter(has_text=re.compile(r"^(active fraction \(tau\)|tau)"))
        field = row.locator("input").first
        field.select_text(force=True)  # the widget's own drag area lies over its text
        page.keyboard.type(value)
        page.keyboard.press("Enter")
    else:  # a click in the middle of a number widget opens the canvas's value prompt
        point = page.evaluate("""() => {
            const canvas = window.app.canvas;
            const node = window.app.graph._nodes.find((n) => n.type === "DyMoSMotionSlider");
            const widget = node.widgets.find((w) => w.name === "tau");
            const [x, y] = canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2,
                node.pos[1] + widget.y + window.LiteGraph.NODE_WIDGET_HEIGHT / 2]);
            const rect = canvas.canvas.getBoundingClientRect();
            return [rect.left + x, rect.top + y];
        }""")
        page.mouse.click(*point)
        page.wait_for_timeout(300)
        field = page.locator(".graphdialog input").last
        field.fill(value)
        field.press("Enter")
    page.wait_for_timeout(300)


def test_slider_in_the_web_ui_drives_a_real_run(page, server, renderer):
    load_tiny_graph(page, server, "dymos_wan21_i2v")
    # the workflow's strength 1.0 and tau 0.25, in words, on the node
    assert node_text(page, "DyMoSMotionSlider", "dymos_hint") == describe(1.0, 0.25)

    slider = page.evaluate("""() => {
        const node = window.app.graph._nodes.find((n) => n.type === "DyMoSMotionSlider");
        const widget = node.widgets.find((w) => w.name === "strength");
        return {id: node.id, type: widget.type, before: widget.value};
    }""")
    assert slider["type"] == "slider" and slider["before"] == 1.0
    for strength in (-0.5, 0.0, 1.5):
        set_dymos_widget(page, "strength", strength)
        assert node_text(page, "DyMoSMotionSlider", "dymos_hint") == describe(strength, 0.25)
    # typed on the node: the hint follows what the widget now holds (frontend 1.32.9's Nodes 2.0 number field
    # reads a typed "0.4" as 1, its maximum; 1.49.6's and the canvas's read 0.4)
    type_tau_on_the_node(page, renderer, "0.4")
    tau = page.evaluate("""() => window.app.graph._nodes.find((n) => n.type === "DyMoSMotionSlider")
        .widgets.find((w) => w.name === "tau").value""")
    assert tau != 0.25
    assert node_text(page, "DyMoSMotionSlider", "dymos_hint") == describe(1.5, tau)

    executed_prompt = queue_from_the_browser(page, server)["prompt"][2]
    assert executed_prompt[str(slider["id"])]["inputs"]["strength"] == 1.5
    assert executed_prompt[str(slider["id"])]["inputs"]["tau"] == pytest.approx(tau)

    page.evaluate("() => window.app.canvas.deselectAll()")
    screenshot_around(page, "DyMoSMotionSlider", artifact_name("web_ui_dymos.png", renderer))


@pytest.mark.parametrize("name", ["edg_wan21_i2v", "edg_switch_wan22_i2v", "miva_wan21_one_adapter",
                                  "miva_wan21_two_adapters", "miva_dymos_wan21", "mmiva_wan21_one_subject",
                                  "mmiva_wan21_subject_and_background"])
def test_shipped_workflow_queued_from_the_web_ui_finishes(page, server, renderer, name):
    load_tiny_graph(page, server, name)
    entry = queue_from_the_browser(page, server)
    saved = [item for node_out in entry["outputs"].values() for item in node_out.get("images", [])]
    assert saved, "the run saved no video"
    if name == "edg_wan21_i2v":
        screenshot_around(page, "EDGTimestepSwitch", artifact_name("web_ui_edg.png", renderer), scale=0.8,
                          at=(1000, 300))


# ---- MIVA (js/miva.js) ---------------------------------------------------------------------------------------
HORSE, WATERFALL = "miva_wan2.1_t2v_1.3b_horse_running.safetensors", "miva_wan2.1_t2v_1.3b_waterfall.safetensors"
STACK_ROWS = 8
EMPTY_ROW = ("None", 1.0, True)


def stack_state(page) -> dict:
    """The MIVA Stack as the user sees it (the rows panel on the node, the frontend's own widgets shown), and the
    values of its 24 slots."""
    return page.evaluate(f"""(rows) => {{ {NODE_DOM}
        const node = nodeOfType("MIVAStack");
        const box = nodeBox(node);
        const panels = elementsOn(node, "[data-motion-dials-rows]");
        if (panels.length !== 1) throw new Error(`${{panels.length}} rows panels shown on the MIVA Stack`);
        const [panel] = panels;
        const shownRows = [...panel.querySelectorAll("[data-miva-row]")].filter(visible).map((row) => {{
            const toggle = row.querySelector('[data-miva-action="toggle"]');
            return {{
                index: Number(row.dataset.mivaRow),
                label: row.querySelector(".motion-dials-miva-label").innerText.trim(),
                adapter: row.querySelector("select").value,
                adapterText: row.querySelector("select").selectedOptions[0]?.textContent ?? null,
                weight: row.querySelector("input").disabled ? "link"
                    : Number.parseFloat(row.querySelector("input").value),
                enabled: toggle.getAttribute("aria-pressed") === "true",
                toggleText: toggle.innerText.trim(),
                up: !row.querySelector('[data-miva-action="up"]').disabled,
                down: !row.querySelector('[data-miva-action="down"]').disabled,
            }};
        }});
        const add = panel.querySelector('[data-miva-action="add"]');
        const values = [];
        for (let i = 1; i <= rows; i++) {{
            const value = (kind) => node.widgets.find((w) => w.name === `${{kind}}_${{i}}`).value;
            values.push([value("adapter"), value("weight"), value("enabled")]);
        }}
        const addBox = add.getBoundingClientRect();
        return {{
            rows: shownRows, values,
            slot_widgets_shown: widgetLabelsShown(node)
                .filter((label) => /^(adapter|weight|enabled)_\\d+$/.test(label)),
            add_button: visible(add) && inside(add, box) ? (add.disabled ? "disabled" : add.innerText.trim()) : null,
            panel_inside: inside(panel, box),
            // the node ends close below the add button: it shrinks with the rows
            slack_below: (box.bottom - addBox.bottom) / box.scale,
            height: (box.bottom - box.top) / box.scale,
        }};
    }}""", STACK_ROWS)


def assert_stack(page, rows: list[tuple], linked_weights: tuple[int, ...] = ()) -> dict:
    """Exactly ``rows`` (adapter, weight, enabled) are shown on the node, first to last, with their controls (the
    weight of a row in ``linked_weights`` shown as coming from its link); every later slot is empty; none of the
    slots' own widgets is shown."""
    state = stack_state(page)
    n = len(rows)
    shown = [(row["adapter"], row["weight"], row["enabled"]) for row in state["rows"]]
    wanted = [(a, "link" if i in linked_weights else w, e) for i, (a, w, e) in enumerate(rows, start=1)]
    assert shown == wanted, state["rows"]
    assert [row["index"] for row in state["rows"]] == list(range(1, n + 1))
    for row, (adapter, _, enabled) in zip(state["rows"], rows, strict=True):
        assert row["adapterText"] == adapter  # the file name itself, not "(not found)"
        assert row["label"] == f"row {row['index']}" + ("" if enabled else " (off)")
        assert row["toggleText"] == ("on" if enabled else "off")
        assert row["up"] == (row["index"] > 1) and row["down"] == (row["index"] < n)
    assert [tuple(v) for v in state["values"]] == [tuple(row) for row in rows] + [EMPTY_ROW] * (STACK_ROWS - n)
    assert state["slot_widgets_shown"] == []
    assert state["panel_inside"]
    assert 0 <= state["slack_below"] < 45, state["slack_below"]
    assert state["add_button"] == ("+ add adapter" if n < STACK_ROWS else "disabled")
    return state


def stack_row(page, i: int):
    return page.locator(f'[data-motion-dials-rows] [data-miva-row="{i}"]')


def click_row_button(page, i: int, action: str):
    stack_row(page, i).locator(f'[data-miva-action="{action}"]').click()
    page.wait_for_timeout(150)


def pick_adapter(page, i: int, adapter: str):
    stack_row(page, i).locator("select").select_option(adapter)
    page.wait_for_timeout(150)


def type_weight(page, i: int, weight: float):
    field = stack_row(page, i).locator("input")
    field.fill(str(weight))
    field.press("Enter")
    page.wait_for_timeout(150)


def click_add(page):
    page.locator('[data-motion-dials-rows] [data-miva-action="add"]').click()
    page.wait_for_timeout(150)


def api_rows(prompt: dict) -> list[tuple]:
    (stack,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "MIVAStack"]
    return [(stack[f"adapter_{i}"], stack[f"weight_{i}"], stack[f"enabled_{i}"]) for i in range(1, STACK_ROWS + 1)]


def test_miva_stack_rows_are_added_moved_toggled_removed_saved_and_sent_plainly(page, server, renderer):
    page.evaluate("""() => {
        window.app.graph.clear();
        const node = window.LiteGraph.createNode("MIVAStack");
        node.pos = [300, 260];
        window.app.graph.add(node);
        window.app.canvas.ds.scale = 1;
        window.app.canvas.ds.offset = [0, 0];
        window.app.canvas.setDirty(true, true);
    }""")
    page.wait_for_timeout(400)
    first = assert_stack(page, [EMPTY_ROW])

    # the row's own controls on the node
    pick_adapter(page, 1, HORSE)
    type_weight(page, 1, 0.75)
    assert_stack(page, [(HORSE, 0.75, True)])

    click_add(page)
    two = assert_stack(page, [(HORSE, 0.75, True), EMPTY_ROW])
    assert two["height"] > first["height"]
    pick_adapter(page, 2, WATERFALL)
    type_weight(page, 2, 0.5)
    click_add(page)
    pick_adapter(page, 3, HORSE)
    type_weight(page, 3, -0.25)
    three = assert_stack(page, [(HORSE, 0.75, True), (WATERFALL, 0.5, True), (HORSE, -0.25, True)])
    assert three["height"] - two["height"] == pytest.approx(two["height"] - first["height"], abs=1.5)

    click_row_button(page, 2, "toggle")
    assert_stack(page, [(HORSE, 0.75, True), (WATERFALL, 0.5, False), (HORSE, -0.25, True)])
    click_row_button(page, 2, "up")
    assert_stack(page, [(WATERFALL, 0.5, False), (HORSE, 0.75, True), (HORSE, -0.25, True)])
    assert stack_row(page, 1).locator('[data-miva-action="up"]').is_disabled()  # the first row stays first
    assert stack_row(page, 3).locator('[data-miva-action="down"]').is_disabled()  # the last row stays last
    click_row_button(page, 2, "down")
    assert_stack(page, [(WATERFALL, 0.5, False), (HORSE, -0.25, True), (HORSE, 0.75, True)])
    click_row_button(page, 2, "remove")
    after_remove = assert_stack(page, [(WATERFALL, 0.5, False), (HORSE, 0.75, True)])
    assert after_remove["height"] == pytest.approx(two["height"], abs=1.5)

    # the same actions from the node's right-click menu, where this renderer lists extensions' entries
    if node_menu_shows_extension_items(page, renderer):
        node_menu(page, renderer, "MIVAStack", ["Add MIVA adapter row"])
        assert_stack(page, [(WATERFALL, 0.5, False), (HORSE, 0.75, True), EMPTY_ROW])
        node_menu(page, renderer, "MIVAStack", ["MIVA row 1: " + WATERFALL + " (off)", "Turn row on"])
        assert_stack(page, [(WATERFALL, 0.5, True), (HORSE, 0.75, True), EMPTY_ROW])
        node_menu(page, renderer, "MIVAStack", ["MIVA row 1: " + WATERFALL, "Turn row off"])
        node_menu(page, renderer, "MIVAStack", ["MIVA row 3: None", "Remove row"])
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
    # Nodes 2.0 sizes a node by its content and keeps the larger of that and the size it was saved with
    assert reloaded["height"] == pytest.approx(after_remove["height"], abs=1.5 if renderer == CLASSIC else 15)
    assert api_rows(page.evaluate("async () => (await window.app.graphToPrompt()).output")) == expected

    # a link into a slot of a row not shown shows the rows up to it
    page.evaluate("""() => {
        const node = window.app.graph._nodes.find((n) => n.type === "MIVAStack");
        const source = window.LiteGraph.createNode("PrimitiveFloat");
        source.pos = [0, 260];
        window.app.graph.add(source);
        source.connect(0, node, node.findInputSlot("weight_4"));
    }""")
    page.wait_for_timeout(300)
    assert_stack(page, [(WATERFALL, 0.5, False), (HORSE, 0.75, True), EMPTY_ROW, EMPTY_ROW], linked_weights=(4,))
    page.evaluate("""() => {
        const source = window.app.graph._nodes.find((n) => n.type === "PrimitiveFloat");
        window.app.graph.remove(source);
    }""")
    page.wait_for_timeout(200)

    # at most eight rows; removing the last row in use leaves one empty row
    page.evaluate("""() => {
        const node = window.app.graph._nodes.find((n) => n.type === "MIVAStack");
        for (let i = 0; i < 10; i++) node.mivaRows.add();
    }""")
    page.wait_for_timeout(200)
    assert_stack(page, [(WATERFALL, 0.5, False), (HORSE, 0.75, True)] + [EMPTY_ROW] * (STACK_ROWS - 2))
    page.evaluate("""() => {
        const node = window.app.graph._nodes.find((n) => n.type === "MIVAStack");
        for (let i = 0; i < 10; i++) node.mivaRows.remove(1);
    }""")
    page.wait_for_timeout(200)
    assert_stack(page, [EMPTY_ROW])

    # the picture for the README: the two rows, the second one switched off
    load_graph(page, workflow)
    page.evaluate("() => window.app.canvas.deselectAll()")
    page.wait_for_timeout(200)
    height = stack_state(page)["height"]
    width = page.evaluate("() => window.app.graph._nodes.find((n) => n.type === 'MIVAStack').size[0]")
    scale, at, title = 1.3, (350, 150), 30
    clip = {"x": at[0] - 30, "y": at[1] - (title + 20) * scale, "width": width * scale + 60,
            "height": (height + 40) * scale}
    screenshot_around(page, "MIVAStack", artifact_name("miva_stack.png", renderer), scale=scale, at=at, clip=clip)


def test_miva_stack_queued_from_the_web_ui_runs_the_rows_shown(page, server, renderer):
    """Rows set on the node run: the executed prompt holds them, and the Stack's text names them in order."""
    loader_weight = 0.6 + 0.01 * renderer_variant(renderer)
    load_graph(page, api_to_ui(miva_run_graph(loader_weight), server.get_json("/object_info")))
    assert_stack(page, [EMPTY_ROW, (WATERFALL, 0.5, True)])
    pick_adapter(page, 1, HORSE)
    type_weight(page, 1, 0.25)
    click_row_button(page, 2, "up")
    click_add(page)
    pick_adapter(page, 3, HORSE)
    click_row_button(page, 3, "toggle")
    rows = [(WATERFALL, 0.5, True), (HORSE, 0.25, True), (HORSE, 1.0, False)]
    assert_stack(page, rows)
    entry = queue_from_the_browser(page, server)
    assert api_rows(entry["prompt"][2]) == rows + [EMPTY_ROW] * (STACK_ROWS - 3)
    page.wait_for_timeout(500)
    # the Stack's text: the Loader's adapter (its stack input) first, then the rows, each under its weight
    lines = [line.strip() for line in node_text(page, "MIVAStack", "miva_info").split("\n")]
    heads = [lines[0]] + [lines[i + 1] for i, line in enumerate(lines[:-1]) if line == ""]
    assert heads == [f"{loader_weight:+.2f} {HORSE}", f"+0.50 {WATERFALL}", f"+0.25 {HORSE}",
                     f"[off] +1.00 {HORSE}"], lines


def renderer_variant(renderer: str) -> int:
    """0, 1, ...: which renderer of this host's runs this is. Graphs run once per renderer differ by it somewhere, so
    that the server's cache does not skip the nodes whose text the test reads (a cached node sends no new text)."""
    return RENDERERS.index(renderer)


def miva_run_graph(loader_weight: float = 0.8) -> dict:
    """API graph: the tiny Wan 2.1 T2V with MIVA Loader (horse) -> MIVA Stack (row 2: waterfall) -> MIVA Apply."""
    stack_rows = {f"{kind}_{i}": value for i in range(1, STACK_ROWS + 1)
                  for kind, value in zip(("adapter", "weight", "enabled"), EMPTY_ROW, strict=True)}
    stack_rows.update(adapter_2=WATERFALL, weight_2=0.5)
    text = {"family": "wan", "tokens": 8}
    return {
        "1": {"class_type": "UNETLoader",
              "inputs": {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "MIVALoader", "inputs": {"adapter_name": HORSE, "weight": loader_weight,
                                                    "model": ["1", 0]}},
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


def node_heights(page, node_type: str) -> dict:
    """The node's height on the screen (canvas units), and whether its text after a run lies inside it."""
    return page.evaluate(f"""(type) => {{ {NODE_DOM}
        const node = nodeOfType(type);
        const box = nodeBox(node);
        const texts = [...document.querySelectorAll('[data-motion-dials-text="miva_info"]')].filter(visible);
        return {{height: (box.bottom - box.top) / box.scale, text_inside: elementsOn(node,
            '[data-motion-dials-text="miva_info"]').length === 1, texts_shown: texts.length}};
    }}""", node_type)


def test_miva_loader_and_stack_show_their_adapters_after_a_run_from_the_web_ui(page, server, renderer):
    graph = miva_run_graph(0.8 + 0.01 * renderer_variant(renderer))
    load_graph(page, api_to_ui(graph, server.get_json("/object_info")))
    assert unknown_node_types(page) == []
    assert not load_problem_shown(page)
    # row 1 is empty but row 2 is in use: both are shown, so the rows stay contiguous
    assert_stack(page, [EMPTY_ROW, (WATERFALL, 0.5, True)])
    assert node_text(page, "MIVALoader", "miva_info") == "" and node_text(page, "MIVAStack", "miva_info") == ""
    before = {t: node_heights(page, t)["height"] for t in ("MIVALoader", "MIVAStack")}

    entry = queue_from_the_browser(page, server)
    assert api_rows(entry["prompt"][2]) == [EMPTY_ROW, (WATERFALL, 0.5, True)] + [EMPTY_ROW] * (STACK_ROWS - 2)
    assert "horse running" in entry["outputs"]["2"]["text"][0]

    page.wait_for_timeout(600)
    loader, stack = node_text(page, "MIVALoader", "miva_info"), node_text(page, "MIVAStack", "miva_info")
    assert "motion: horse running" in loader and "subject: horse" in loader
    assert loader == entry["outputs"]["2"]["text"][0].strip()
    assert stack.index("motion: horse running") < stack.index("motion: waterfall")
    for node_type in ("MIVALoader", "MIVAStack"):  # the node grew to show the text, which lies inside it
        after = node_heights(page, node_type)
        assert after["text_inside"] and after["height"] > before[node_type] + 30, (node_type, after, before)
    page.evaluate("() => window.app.canvas.deselectAll()")
    screenshot_around(page, "MIVALoader", artifact_name("web_ui_miva.png", renderer), scale=1.0, at=(300, 200))


def images_shown(page, items: list[dict]) -> bool:
    """Whether the page shows every output image of ``items`` ({filename, ...} from /history), loaded: as a node's
    image on the classic canvas, or as an <img> in the page (Nodes 2.0)."""
    return page.evaluate("""(names) => {
        const images = [...document.querySelectorAll("img"),
            ...window.app.graph._nodes.flatMap((node) => node.imgs ?? [])];
        const loaded = images.filter((img) => img.complete && img.naturalWidth > 0)
            .map((img) => decodeURIComponent(img.src));
        return names.every((name) => loaded.some((src) => src.includes(`filename=${name}`)));
    }""", [item["filename"] for item in items])


@pytest.mark.parametrize("clips", ["folder", "videos"])
def test_training_workflow_queued_from_the_web_ui_trains_and_shows_the_loss_curve(page, server, renderer, clips):
    """The shipped training workflow (MIVA Train on the tiny Wan, a few steps on tiny clips) queued from the web UI,
    its clips from its folder or from core video loaders through MIVA Clips: the adapter is written into the server's
    own miva folder and the loss curve is shown (a node with a VIDEO input would lose its previews in Nodes 2.0)."""
    file_name = f"miva_web_ui_train_{renderer}_{clips}.safetensors"
    tiny = tiny_training(shrink_api(tinyify_api(json.loads((WORKFLOWS / "miva_train_wan21.api.json").read_text()))),
                         file_name)
    names = clips_as_videos(tiny, server, TRAINING_CLIPS)[0] if clips == "videos" else None
    load_graph(page, api_to_ui(tiny, server.get_json("/object_info")))
    assert unknown_node_types(page) == []
    assert not load_problem_shown(page)
    entry = queue_from_the_browser(page, server)
    train = next(k for k, node in entry["prompt"][2].items() if node["class_type"] == "MIVATrain")
    preview = next(k for k, node in entry["prompt"][2].items() if node["class_type"] == "PreviewImage")
    assert entry["prompt"][2][train]["inputs"]["file_name"] == file_name  # what the UI sent
    (text,) = entry["outputs"][train]["text"]
    assert text.startswith(f"wrote {file_name}") and "motion: horse running" in text and "loss: first" in text
    deadline = time.monotonic() + 15
    while not node_text(page, "MIVATrain", "miva_info") and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    assert node_text(page, "MIVATrain", "miva_info").startswith(f"wrote {file_name}")  # shown on the node
    if names:
        assert node_text(page, "MIVAClips", "miva_info") == f"{len(names)} clip{'s' * (len(names) > 1)}: " \
            + ", ".join(names)
    assert (server.miva_dir / file_name).is_file()
    from motion_dials.models.miva import load_adapter

    assert load_adapter(server.miva_dir / file_name).info.motion == "horse running"
    # the loss curve: on the Preview Image node (and MIVA Train's own preview), shown in the page
    curves = entry["outputs"][preview]["images"] + entry["outputs"][train]["images"]
    assert len(curves) == 2
    deadline = time.monotonic() + 15
    while not images_shown(page, curves) and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    assert images_shown(page, curves), curves


def subject_mask_graph(box_threshold: float, variant: int = 0) -> dict:
    """API graph: the start image, the tiny GroundingDINO and SAM 2, Subject Mask ("horse"), its preview shown
    (``variant`` 1: the loaders on the CPU by name rather than "auto")."""
    device = "cpu" if variant else "auto"
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {"class_type": "MotionDialsGroundingDINOLoader",
              "inputs": {"model_name": GROUNDING_DINO_FILE, "device": device, "precision": "fp32"}},
        "3": {"class_type": "MotionDialsSAM2Loader",
              "inputs": {"model_name": SAM2_PT_FILE, "device": device, "precision": "fp32"}},
        "4": {"class_type": "MotionDialsSubjectMask", "inputs": {
            "image": ["1", 0], "grounding_dino": ["2", 0], "sam2": ["3", 0], "prompt": "horse",
            "box_threshold": box_threshold, "text_threshold": 0.25, "mode": "best box"}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
    }


def test_subject_mask_shows_what_it_found_or_a_warning_on_the_node(page, server, renderer):
    object_info = server.get_json("/object_info")
    load_graph(page, api_to_ui(subject_mask_graph(1.0, renderer_variant(renderer)), object_info))
    assert unknown_node_types(page) == []
    entry = queue_from_the_browser(page, server)
    page.wait_for_timeout(400)
    warning = node_text(page, "MotionDialsSubjectMask", "miva_info")
    assert "WARNING: no 'horse' found in image 1" in warning
    assert entry["outputs"]["4"]["text"][0].strip() == warning
    assert page.evaluate("""() => [...document.querySelectorAll('[data-motion-dials-text="miva_info"] div')]
        .filter((line) => line.textContent.startsWith("WARNING"))
        .every((line) => line.classList.contains("motion-dials-warning"))""")  # in amber
    assert "fp32" in node_text(page, "MotionDialsSAM2Loader", "miva_info")  # what the loader loaded, on the node

    # the tiny model finds a box at threshold 0
    load_graph(page, api_to_ui(subject_mask_graph(0.0, renderer_variant(renderer)), object_info))
    queue_from_the_browser(page, server)
    page.wait_for_timeout(600)
    found = node_text(page, "MotionDialsSubjectMask", "miva_info")
    assert found.startswith("prompt: horse (best box") and "image 1: " in found and "WARNING" not in found
    # the picture for the README: the loaders, the node with what it found, and the preview
    page.evaluate("() => window.app.canvas.deselectAll()")
    screenshot_around(page, "LoadImage", artifact_name("subject_mask.png", renderer), scale=0.9, at=(110, 190),
                      clip={"x": 90, "y": 140, "width": 1000, "height": 640})


# ---- the pack's model folders in the frontend's model panels ---------------------------------------------------
def test_model_library_knows_the_miva_folder_and_its_loader(page, server, renderer):
    # what the model library reads: the folder, with the files of every path registered for it
    (miva,) = [folder for folder in server.get_json("/experiment/models") if folder["name"] == "miva"]
    assert any(Path(path).name == "miva" for path in miva["folders"])
    assert {HORSE, WATERFALL} <= {model["name"] for model in server.get_json("/experiment/models/miva")}

    # the library lists the folder; a click on an adapter brings a MIVA Loader with that adapter onto the canvas
    page.evaluate("() => window.app.graph.clear()")
    models_tab = page.locator(".side-bar-button, button").filter(has_text="Models").first
    models_tab.click()
    page.wait_for_timeout(800)
    page.get_by_text("miva", exact=True).first.click()
    page.wait_for_timeout(800)
    page.get_by_text(HORSE.removesuffix(".safetensors"), exact=True).first.click()
    page.wait_for_timeout(400)
    page.mouse.move(900, 500)
    page.mouse.click(900, 500)  # where the node is dropped, for a frontend that lets it follow the pointer
    page.wait_for_timeout(600)
    added = page.evaluate("""() => window.app.graph._nodes.map((n) =>
        [n.type, n.widgets?.find((w) => w.name === "adapter_name")?.value ?? null])""")
    assert added == [["MIVALoader", HORSE]]
    models_tab.click()  # the library closed again

    # a workflow asking for files that are not there: where the frontend lists missing models by folder, the
    # adapter's folder is named like the core loaders' ones
    workflow = json.loads((WORKFLOWS / "miva_wan21_one_adapter.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "MIVALoader":
            node["widgets_values"][0] = "miva_not_here.safetensors"
        if node["type"] == "UNETLoader":
            node["widgets_values"][0] = "unet_not_here.safetensors"
    load_graph(page, workflow)
    page.wait_for_timeout(1500)
    details = page.get_by_role("button", name="View details")
    if details.count():
        details.first.click()
        page.wait_for_timeout(1000)
    lines = [line.strip() for line in page.evaluate("() => document.body.innerText").split("\n") if line.strip()]
    lines = lines[lines.index("Missing Models"):] if "Missing Models" in lines else []
    if "unet_not_here.safetensors" in lines:  # this frontend has the missing-models panel, listing the core file
        assert lines[lines.index("unet_not_here.safetensors") + 1] == "diffusion_models"
        assert lines[lines.index("miva_not_here.safetensors") + 1] == "miva"
        page.screenshot(path=str(ARTIFACTS / artifact_name("missing_models_miva.png", renderer)))
    page.keyboard.press("Escape")
