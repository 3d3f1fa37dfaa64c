// MIVA Stack and MIVA Loader (and the M-MIVA nodes) in the web UI, the same in the classic canvas and in
// Nodes 2.0 (see node_widgets.js for what each renderer honours).
//
// MIVA Stack has fixed slots adapter_<i> / weight_<i> / enabled_<i> (i = 1..8), which is all the workflow JSON and
// the API prompt ever hold. Those widgets are hidden for good when the node is created; one DOM widget shows the
// rows in use and edits the slots: rows 1..n, n being the last row in use (adapter not "None", or a slot fed by a
// link), at least 1, or more after "+ add adapter". Each row has its adapter, its weight, an on/off switch
// (enabled_<i>) and move up / move down / remove buttons; the same actions are in the node's right-click menu
// ("MIVA row <i>: ...", "Add MIVA adapter row") where the renderer shows extension menu items. After a run, the
// Loader, the Stack and the M-MIVA nodes show their text output (what was loaded, what was found, warnings) on
// the node.
import { app } from "../../scripts/app.js";
import { addElementWidget, addStyle, addTextWidget, canvasHeight, fitNode, hideWidget } from "./node_widgets.js";

const ROWS = 8; // STACK_ROWS in nodes/miva.py
const NONE = "None";
const ROW_DEFAULTS = { adapter: NONE, weight: 1.0, enabled: true };
const WEIGHT_SPEC = { min: -2, max: 2, step: 0.05, round: 0.001 }; // WEIGHT_RANGE in nodes/miva.py
const STACK_MIN_WIDTH = 360;
const INFO_MAX_WIDTH = 460;
const ROW_HEIGHT = 50; // CSS below: a row's two lines
const ADD_HEIGHT = 26;

addStyle("motion-dials-miva", `
/* contain: its own width never widens the node (the renderer's flex rows would let it overflow) */
.motion-dials-miva-rows { box-sizing: border-box; contain: inline-size; font: 11px sans-serif; color: #9ab; }
.motion-dials-miva-row { box-sizing: border-box; height: ${ROW_HEIGHT}px; border-top: 1px solid #555;
    padding-top: 2px; display: flex; flex-direction: column; gap: 2px; }
.motion-dials-miva-row .motion-dials-miva-head { display: flex; align-items: center; height: 18px; gap: 4px; }
.motion-dials-miva-row .motion-dials-miva-label { flex: 1; white-space: nowrap; overflow: hidden; }
.motion-dials-miva-row.motion-dials-miva-off .motion-dials-miva-label { color: #777; }
.motion-dials-miva-row .motion-dials-miva-body { display: flex; align-items: center; height: 24px; gap: 4px; }
.motion-dials-miva-rows button { font: inherit; color: #ccc; background: none; border: none; padding: 0 4px;
    height: 18px; min-width: 20px; cursor: pointer; }
.motion-dials-miva-rows button:disabled { color: #555; cursor: default; }
.motion-dials-miva-rows button[data-miva-action="toggle"] { border: 1px solid #666; border-radius: 8px;
    min-width: 30px; color: #9c9; }
.motion-dials-miva-rows button[data-miva-action="toggle"][aria-pressed="false"] { color: #777; }
.motion-dials-miva-rows select, .motion-dials-miva-rows input { box-sizing: border-box; height: 22px;
    font: 12px sans-serif; color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);
    border: 1px solid var(--border-color, #444); border-radius: 4px; }
.motion-dials-miva-rows select { flex: 1; min-width: 0; }
.motion-dials-miva-rows input { width: 64px; flex: none; padding: 0 4px; }
.motion-dials-miva-row.motion-dials-miva-off select,
.motion-dials-miva-row.motion-dials-miva-off input { opacity: 0.55; }
.motion-dials-miva-rows button[data-miva-action="add"] { box-sizing: border-box; width: 100%;
    height: ${ADD_HEIGHT - 4}px;
    margin-top: 4px; border: 1px solid var(--border-color, #444); border-radius: 4px;
    background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd); }
`);

// ---- metadata text after a run ------------------------------------------------------------------------------
function infoLineClass(line, i, lines) {
    if (line.startsWith("WARNING")) return "motion-dials-warning";
    if (line.startsWith("[off]")) return "motion-dials-off";
    return i === 0 || lines[i - 1] === "" ? "motion-dials-heading" : null;
}

function showInfo(node) {
    const info = addTextWidget(node, "miva_info", { panel: true, lineClass: infoLineClass });
    node.mivaInfoWidget = info;
    const onExecuted = node.onExecuted;
    node.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const text = message?.text;
        const joined = Array.isArray(text) ? text.join("\n") : (text ?? "");
        info.setLines(joined ? joined.split("\n") : []);
        const size = this.computeSize();
        const width = Math.max(this.size[0], Math.min(info.textWidth(), INFO_MAX_WIDTH));
        this.setSize([width, Math.max(this.size[1], size[1])]);
        this.setDirtyCanvas(true, true);
    };
}

// ---- MIVA Stack rows ----------------------------------------------------------------------------------------
function slot(node, kind, i) {
    return node.widgets?.find((w) => w.name === `${kind}_${i}`);
}

function readRow(node, i) {
    return { adapter: slot(node, "adapter", i)?.value ?? NONE, weight: slot(node, "weight", i)?.value ?? 1.0,
        enabled: slot(node, "enabled", i)?.value ?? true };
}

function setSlot(node, kind, i, value) {
    const widget = slot(node, kind, i);
    if (!widget || widget.value === value) return;
    widget.value = value;
    widget.callback?.(value); // what an edit on the widget itself does (the frontend's change tracking listens)
}

function writeRow(node, i, row) {
    for (const kind of ["adapter", "weight", "enabled"]) setSlot(node, kind, i, row[kind]);
}

function slotLinked(node, kind, i) {
    return !!node.inputs?.some((input) => input.link != null && input.widget?.name === `${kind}_${i}`);
}

function rowLinked(node, i) {
    return ["adapter", "weight", "enabled"].some((kind) => slotLinked(node, kind, i));
}

// The last row with an adapter, or with a slot fed by a link (a row not shown must not hide a link).
function lastRowInUse(node) {
    for (let i = ROWS; i >= 1; i--) {
        const value = readRow(node, i).adapter;
        if ((value != null && value !== NONE) || rowLinked(node, i)) return i;
    }
    return 0;
}

function adapterChoices(node, i) {
    const values = slot(node, "adapter", i)?.options?.values;
    const list = typeof values === "function" ? values() : values;
    return Array.isArray(list) && list.length ? list : [NONE];
}

function weightSpec(node) {
    const spec = node.constructor?.nodeData?.input?.optional?.weight_1?.[1];
    return { ...WEIGHT_SPEC, ...(spec ?? {}) };
}

function normaliseWeight(node, text) {
    const { min, max, round } = weightSpec(node);
    const value = Number.parseFloat(text);
    if (!Number.isFinite(value)) return null;
    const clamped = Math.min(max, Math.max(min, value));
    return round ? Math.round(clamped / round) * round : clamped;
}

function formatWeight(value) {
    return Number.isFinite(value) ? String(Math.round(value * 1000) / 1000) : "";
}

function element(tag, attributes = {}, text = null) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes)) {
        if (value === false || value == null) continue;
        el.setAttribute(key, value === true ? "" : value);
    }
    if (text != null) el.textContent = text;
    return el;
}

function button(action, glyph, title, disabled, row = null) {
    const el = element("button", { type: "button", "data-miva-action": action, title, disabled });
    el.textContent = glyph;
    if (row != null) el.dataset.mivaRowIndex = String(row);
    return el;
}

// The rows panel, rebuilt from the slots (cheap: at most eight rows).
function renderRows(node) {
    const panel = node.mivaPanel;
    if (!panel) return;
    const shown = node.mivaShown;
    const rows = [];
    for (let i = 1; i <= shown; i++) {
        const row = readRow(node, i);
        const block = element("div", { class: "motion-dials-miva-row", "data-miva-row": String(i),
            "data-enabled": String(!!row.enabled) });
        if (!row.enabled) block.classList.add("motion-dials-miva-off");

        const head = element("div", { class: "motion-dials-miva-head" });
        head.append(element("span", { class: "motion-dials-miva-label" }, `row ${i}${row.enabled ? "" : " (off)"}`));
        const toggle = button("toggle", row.enabled ? "on" : "off",
            row.enabled ? "Turn this row off" : "Turn this row on", slotLinked(node, "enabled", i), i);
        toggle.setAttribute("aria-pressed", String(!!row.enabled));
        head.append(toggle,
            button("up", "▲", "Move this row up", i === 1, i),
            button("down", "▼", "Move this row down", i === shown, i),
            button("remove", "✕", "Remove this row", false, i));

        const body = element("div", { class: "motion-dials-miva-body" });
        const select = element("select", { "data-miva-field": "adapter", title: `adapter_${i}`,
            disabled: slotLinked(node, "adapter", i) });
        const choices = adapterChoices(node, i);
        const options = choices.includes(row.adapter) ? choices : [...choices, row.adapter];
        for (const name of options) {
            const option = element("option", { value: name }, name === row.adapter && !choices.includes(name)
                ? `${name} (not found)` : name);
            option.selected = name === row.adapter;
            select.append(option);
        }
        if (slotLinked(node, "adapter", i)) select.title = `adapter_${i}: from its link`;
        select.addEventListener("change", () => {
            setSlot(node, "adapter", i, select.value);
            layoutRows(node);
        });
        const { min, max, step } = weightSpec(node);
        const weight = element("input", { type: "number", "data-miva-field": "weight", title: `weight_${i}`,
            min: String(min), max: String(max), step: String(step), disabled: slotLinked(node, "weight", i) });
        weight.value = slotLinked(node, "weight", i) ? "" : formatWeight(row.weight);
        if (slotLinked(node, "weight", i)) weight.placeholder = "link";
        const commitWeight = () => {
            const value = normaliseWeight(node, weight.value);
            if (value === null) {
                weight.value = formatWeight(readRow(node, i).weight);
                return;
            }
            setSlot(node, "weight", i, value);
            weight.value = formatWeight(value);
        };
        weight.addEventListener("change", commitWeight);
        weight.addEventListener("keydown", (event) => {
            if (event.key === "Enter") commitWeight();
            event.stopPropagation(); // typing a number is not a canvas shortcut
        });
        body.append(select, weight);
        block.append(head, body);
        rows.push(block);
    }
    const full = shown >= ROWS;
    const add = button("add", full ? `${ROWS} rows: chain another MIVA Stack for more` : "+ add adapter",
        full ? "A MIVA Stack holds eight rows; its stack output feeds the next Stack" : "Add an adapter row", full);
    panel.replaceChildren(...rows, add);
}

// Show rows 1..shown, and fit the node's height to them.
function layoutRows(node) {
    node.mivaShown = Math.min(ROWS, Math.max(1, node.mivaShown ?? 1, lastRowInUse(node)));
    renderRows(node);
    fitNode(node, STACK_MIN_WIDTH);
}

const rowActions = {
    add(node) {
        if ((node.mivaShown ?? 1) >= ROWS) return false;
        node.mivaShown += 1;
        writeRow(node, node.mivaShown, ROW_DEFAULTS);
        layoutRows(node);
        return true;
    },
    remove(node, i) {
        if (i < 1 || i > node.mivaShown) return false;
        for (let j = i; j < node.mivaShown; j++) writeRow(node, j, readRow(node, j + 1));
        writeRow(node, node.mivaShown, ROW_DEFAULTS);
        node.mivaShown = Math.max(1, node.mivaShown - 1);
        layoutRows(node);
        return true;
    },
    move(node, i, delta) {
        const j = i + delta;
        if (i < 1 || i > node.mivaShown || j < 1 || j > node.mivaShown) return false;
        const row = readRow(node, i);
        writeRow(node, i, readRow(node, j));
        writeRow(node, j, row);
        layoutRows(node);
        return true;
    },
    toggle(node, i) {
        if (i < 1 || i > node.mivaShown || !slot(node, "enabled", i)) return false;
        setSlot(node, "enabled", i, !readRow(node, i).enabled);
        renderRows(node);
        return true;
    },
};

function doAction(node, action, i) {
    if (action === "add") return rowActions.add(node);
    if (action === "up") return rowActions.move(node, i, -1);
    if (action === "down") return rowActions.move(node, i, +1);
    if (action === "remove") return rowActions.remove(node, i);
    if (action === "toggle") return rowActions.toggle(node, i);
    return false;
}

// Redraw the panel whenever a slot's value changes, whoever changes it (a loaded workflow, a model dropped on the
// node, a script), once per task however many slots change.
function watchSlots(node) {
    let pending = false;
    const schedule = () => {
        if (pending) return;
        pending = true;
        queueMicrotask(() => {
            pending = false;
            if (node.mivaShown) layoutRows(node);
        });
    };
    for (const widget of node.widgets) {
        if (!/^(adapter|weight|enabled)_\d+$/.test(widget.name)) continue;
        let descriptor = null;
        for (let o = widget; o && !descriptor; o = Object.getPrototypeOf(o)) {
            descriptor = Object.getOwnPropertyDescriptor(o, "value");
        }
        let stored = widget.value;
        const get = descriptor?.get ? () => descriptor.get.call(widget) : () => stored;
        const set = descriptor?.set ? (value) => descriptor.set.call(widget, value) : (value) => { stored = value; };
        Object.defineProperty(widget, "value", {
            configurable: true,
            enumerable: true,
            get,
            set(value) {
                const before = get();
                set(value);
                if (before !== get()) schedule();
            },
        });
    }
}

// Right-click menu entries: one per row shown, each with its actions, and one to add a row. Two levels at most:
// Nodes 2.0's node menu (frontend 1.49) flattens anything deeper.
function rowMenu(node) {
    const items = [];
    for (let i = 1; i <= node.mivaShown; i++) {
        const row = readRow(node, i);
        const entry = (content, action, disabled = false) => ({
            content, disabled, callback: () => { doAction(node, action, i); } });
        items.push({
            content: `MIVA row ${i}: ${row.adapter}${row.enabled ? "" : " (off)"}`,
            has_submenu: true,
            submenu: { options: [
                entry("Move row up", "up", i === 1),
                entry("Move row down", "down", i === node.mivaShown),
                entry(row.enabled ? "Turn row off" : "Turn row on", "toggle"),
                entry("Remove row", "remove"),
            ] },
        });
    }
    items.push({ content: "Add MIVA adapter row", disabled: node.mivaShown >= ROWS,
        callback: () => { rowActions.add(node); } });
    return items;
}

function setUpStack(node) {
    if (!node.widgets?.some((w) => w.name === "adapter_1")) return;
    for (const widget of node.widgets) {
        if (/^(adapter|weight|enabled)_\d+$/.test(widget.name)) hideWidget(widget);
    }
    const panel = element("div", { class: "motion-dials-miva-rows", "data-motion-dials-rows": "" });
    panel.addEventListener("click", (event) => {
        const target = event.target.closest?.("button[data-miva-action]");
        if (!target || target.disabled) return;
        event.stopPropagation();
        doAction(node, target.dataset.mivaAction, Number(target.dataset.mivaRowIndex ?? 0));
    });
    // the element handles its own pointer events (the canvas would otherwise start dragging the node)
    for (const type of ["pointerdown", "mousedown"]) panel.addEventListener(type, (event) => event.stopPropagation());
    node.mivaPanel = panel;
    const rowsWidget = addElementWidget(node, "miva_rows", panel,
        () => canvasHeight((node.mivaShown ?? 1) * ROW_HEIGHT + ADD_HEIGHT));
    // before the info text
    node.widgets.splice(node.widgets.indexOf(rowsWidget), 1);
    node.widgets.splice(node.widgets.indexOf(node.mivaInfoWidget ?? null) >= 0
        ? node.widgets.indexOf(node.mivaInfoWidget) : node.widgets.length, 0, rowsWidget);
    watchSlots(node);

    const onConfigure = node.onConfigure;
    node.onConfigure = function () {
        const result = onConfigure?.apply(this, arguments);
        this.mivaShown = 1; // then as many as the loaded values use
        layoutRows(this);
        return result;
    };
    const onConnectionsChange = node.onConnectionsChange;
    node.onConnectionsChange = function () {
        const result = onConnectionsChange?.apply(this, arguments);
        if (!app.configuringGraph && this.mivaShown) layoutRows(this); // a link to a row not shown shows it
        return result;
    };
    const getExtraMenuOptions = node.getExtraMenuOptions;
    node.getExtraMenuOptions = function () {
        const extra = getExtraMenuOptions?.apply(this, arguments);
        const items = Array.isArray(extra) ? extra : [];
        return items.concat(rowMenu(this));
    };
    // For scripts and tests: the same actions as the buttons and the menu.
    node.mivaRows = {
        shown: () => node.mivaShown,
        add: () => rowActions.add(node),
        remove: (i) => rowActions.remove(node, i),
        moveUp: (i) => rowActions.move(node, i, -1),
        moveDown: (i) => rowActions.move(node, i, +1),
        toggle: (i) => rowActions.toggle(node, i),
    };
    node.mivaShown = 1;
    layoutRows(node);
}

// ---- the pack's model folders in the frontend's model panels ---------------------------------------------------
// The frontend knows which node loads the files of a model folder from its "modelToNode" registry: the model
// library adds that node when a file is clicked (or dropped on the canvas), and the missing-models panel names the
// folder of a missing file by the node that asked for it ("Unknown" otherwise). The registry ships with the core
// loaders and a list of other packs' ones; it has no extension hook, so the pack's loaders are added to it through
// the app's Pinia store, the way the frontend adds its own (quickRegister), when that store exists.
const MODEL_FOLDERS = [
    ["miva", "MIVALoader", "adapter_name"],
    ["miva", "MIVAStack", "adapter_1"],
    ["grounding-dino", "MotionDialsGroundingDINOLoader", "model_name"],
    ["sam2", "MotionDialsSAM2Loader", "model_name"],
];

function registerModelFolders(store) {
    if (typeof store?.quickRegister !== "function") return false;
    for (const [folder, nodeType, key] of MODEL_FOLDERS) {
        const known = store.getAllNodeProviders?.(folder) ?? [];
        if (!known.some((provider) => provider.nodeDef?.name === nodeType)) store.quickRegister(folder, nodeType, key);
    }
    return true;
}

function setUpModelFolders() {
    const pinia = app.extensionManager?._p
        ?? document.getElementById("vue-app")?.__vue_app__?.config?.globalProperties?.$pinia;
    if (!pinia) return;
    if (registerModelFolders(pinia._s?.get("modelToNode"))) return;
    // not created yet: the frontend creates its stores on first use
    pinia.use?.(({ store }) => {
        if (store.$id === "modelToNode") registerModelFolders(store);
    });
}

// Nodes whose text after a run (what was loaded, what was found, warnings) is shown on the node itself.
const INFO_NODES = new Set(["MIVAStack", "MIVALoader", "MIVATrain", "MIVAClips", "MotionDialsSubjectMask",
    "MotionDialsGroundingDINOLoader", "MotionDialsSAM2Loader"]);

app.registerExtension({
    name: "MotionDials.MIVA",
    setup() {
        try {
            setUpModelFolders();
        } catch (error) {
            console.warn("Motion Dials: could not tell the model library about the pack's model folders", error);
        }
    },
    nodeCreated(node) {
        if (!INFO_NODES.has(node.comfyClass)) return;
        showInfo(node);
        if (node.comfyClass === "MIVAStack") setUpStack(node);
    },
});
