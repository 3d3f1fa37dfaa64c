// MIVA Stack and MIVA Loader in the web UI.
//
// MIVA Stack has fixed slots adapter_<i> / weight_<i> / enabled_<i> (i = 1..8), which is all the workflow
// JSON and the API prompt ever hold. This extension only decides which slots are shown and moves values
// between slots. Rows 1..n are shown, n being the last row in use (adapter not "None", or a widget fed by a
// link), at least 1, or more after "+ add adapter"; the other slots' widgets are hidden but keep their values
// and keep serializing. Each shown row has a header line with move up / move down / remove buttons (also in
// the node's right-click menu, "MIVA rows"); its enabled_<i> toggle switches it. After a run, both nodes
// show the adapters' metadata text (their `text` UI output) under their widgets.
import { app } from "../../scripts/app.js";

const ROWS = 8; // STACK_ROWS in nodes/miva.py
const NONE = "None";
const ROW_DEFAULTS = { adapter: NONE, weight: 1.0, enabled: true };
const HEADER_HEIGHT = 18;
const BUTTON_WIDTH = 20;
const BUTTONS = [
    { action: "up", glyph: "▲" },
    { action: "down", glyph: "▼" },
    { action: "remove", glyph: "✕" },
];
const STACK_MIN_WIDTH = 360;
const INFO_LINE_HEIGHT = 15;
const INFO_PADDING = 8;
const INFO_MAX_WIDTH = 460;
const INFO_FONT = "12px sans-serif";
const WARNING_COLOUR = "#fc6";

// ---- hiding widgets -------------------------------------------------------------------------------------
// ComfyUI frontend 1.2x/1.3x: LGraphNode.isWidgetVisible() honours `widget.hidden` (drawing, hit-testing and
// computeSize skip the widget), but the layout pass still gives every widget the height of its computeSize(),
// so a hidden widget also gets a computeSize of [0, -4] (zero height with the 4 px gap). Hidden widgets keep
// their values and their place in node.widgets, so they are still saved and sent to the server.
const savedComputeSize = new WeakMap();

function setHidden(widget, hidden) {
    if (!widget || !!widget.hidden === hidden) return;
    if (hidden) {
        const own = Object.prototype.hasOwnProperty.call(widget, "computeSize");
        savedComputeSize.set(widget, own ? widget.computeSize : null);
        widget.computeSize = () => [0, -4];
        widget.hidden = true;
    } else {
        const saved = savedComputeSize.get(widget);
        savedComputeSize.delete(widget);
        if (saved) widget.computeSize = saved;
        else delete widget.computeSize;
        widget.hidden = false;
    }
}

// ---- metadata text after a run ------------------------------------------------------------------------------
let measuringContext = null;

function textWidth(text) {
    measuringContext ??= document.createElement("canvas").getContext("2d");
    measuringContext.font = INFO_FONT;
    return measuringContext.measureText(text).width;
}

function infoLines(node) {
    return node.mivaInfo ? node.mivaInfo.split("\n") : [];
}

function infoHeight(node) {
    const lines = infoLines(node);
    return lines.length ? lines.length * INFO_LINE_HEIGHT + 2 * INFO_PADDING : 0;
}

function truncate(ctx, text, width) {
    if (ctx.measureText(text).width <= width) return text;
    let end = text.length;
    while (end > 0 && ctx.measureText(text.slice(0, end) + "…").width > width) end--;
    return text.slice(0, end) + "…";
}

function showInfo(node) {
    const computeSize = node.computeSize;
    node.computeSize = function () {
        const size = computeSize.apply(this, arguments);
        const lines = infoLines(this);
        const widest = Math.max(0, ...lines.map(textWidth)) + 2 * INFO_PADDING + 10;
        return [Math.max(size[0], Math.min(widest, INFO_MAX_WIDTH)), size[1] + infoHeight(this)];
    };
    const drawForeground = node.onDrawForeground;
    node.onDrawForeground = function (ctx) {
        drawForeground?.apply(this, arguments);
        const lines = infoLines(this);
        if (this.flags?.collapsed || !lines.length) return;
        const top = this.size[1] - infoHeight(this) + 2;
        ctx.save();
        ctx.fillStyle = "rgba(0, 0, 0, 0.25)";
        ctx.beginPath();
        if (ctx.roundRect) ctx.roundRect(6, top, this.size[0] - 12, infoHeight(this) - 6, 4);
        else ctx.rect(6, top, this.size[0] - 12, infoHeight(this) - 6);
        ctx.fill();
        ctx.font = INFO_FONT;
        ctx.textAlign = "left";
        lines.forEach((line, i) => {
            ctx.fillStyle = line.startsWith("WARNING") ? WARNING_COLOUR : line.startsWith("[off]") ? "#777"
                : i === 0 || lines[i - 1] === "" ? "#cde" : "#9ab";
            ctx.fillText(truncate(ctx, line, this.size[0] - 2 * INFO_PADDING - 8), INFO_PADDING + 4,
                top + INFO_PADDING - 2 + (i + 0.75) * INFO_LINE_HEIGHT);
        });
        ctx.restore();
    };
    const onExecuted = node.onExecuted;
    node.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const text = message?.text;
        this.mivaInfo = Array.isArray(text) ? text.join("\n") : (text ?? "");
        const size = this.computeSize();
        this.setSize([Math.max(this.size[0], size[0]), Math.max(this.size[1], size[1])]);
        this.setDirtyCanvas(true, true);
    };
}

// ---- MIVA Stack rows ----------------------------------------------------------------------------------------
function rowWidgets(node, i) {
    const find = (name) => node.widgets?.find((w) => w.name === name);
    return { header: find(`miva_row_${i}`), adapter: find(`adapter_${i}`), weight: find(`weight_${i}`),
        enabled: find(`enabled_${i}`) };
}

function readRow(node, i) {
    const { adapter, weight, enabled } = rowWidgets(node, i);
    return { adapter: adapter?.value ?? NONE, weight: weight?.value ?? 1.0, enabled: enabled?.value ?? true };
}

function writeRow(node, i, row) {
    const widgets = rowWidgets(node, i);
    for (const key of ["adapter", "weight", "enabled"]) {
        if (widgets[key]) widgets[key].value = row[key];
    }
}

function rowLinked(node, i) {
    const names = [`adapter_${i}`, `weight_${i}`, `enabled_${i}`];
    return !!node.inputs?.some((slot) => slot.link != null && names.includes(slot.widget?.name));
}

// The last row with an adapter, or with a widget fed by a link (a hidden row must not hide a link).
function lastRowInUse(node) {
    for (let i = ROWS; i >= 1; i--) {
        const value = readRow(node, i).adapter;
        if ((value != null && value !== NONE) || rowLinked(node, i)) return i;
    }
    return 0;
}

// Show rows 1..shown, hide the rest, and fit the node's height to what is shown.
function layoutRows(node) {
    node.mivaShown = Math.min(ROWS, Math.max(1, node.mivaShown ?? 1, lastRowInUse(node)));
    for (let i = 1; i <= ROWS; i++) {
        for (const widget of Object.values(rowWidgets(node, i))) setHidden(widget, i > node.mivaShown);
    }
    const add = node.widgets?.find((w) => w.name === "miva_add");
    if (add) {
        const full = node.mivaShown >= ROWS;
        add.label = full ? `${ROWS} rows: chain another MIVA Stack for more` : "+ add adapter";
        add.disabled = full;
    }
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), size[1]]);
    node.setDirtyCanvas(true, true);
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
        const { enabled } = rowWidgets(node, i);
        if (!enabled || i > node.mivaShown) return false;
        enabled.value = !enabled.value;
        node.setDirtyCanvas(true, true);
        return true;
    },
};

function doAction(node, action, i) {
    if (action === "up") return rowActions.move(node, i, -1);
    if (action === "down") return rowActions.move(node, i, +1);
    if (action === "remove") return rowActions.remove(node, i);
    if (action === "toggle") return rowActions.toggle(node, i);
    return false;
}

function buttonAt(width, x) {
    // Buttons sit at the right end of the header, in BUTTONS order, ending at the widget margin.
    const right = width - 15;
    const left = right - BUTTONS.length * BUTTON_WIDTH;
    if (x < left || x >= right) return null;
    return BUTTONS[Math.floor((x - left) / BUTTON_WIDTH)];
}

function buttonEnabled(node, i, action) {
    if (action === "up") return i > 1;
    if (action === "down") return i < node.mivaShown;
    return true;
}

function headerWidget(i) {
    return {
        type: "miva_row",
        name: `miva_row_${i}`,
        value: null,
        serialize: false, // not in widgets_values
        options: { serialize: false }, // not in the API prompt
        tooltip: `Row ${i}: ▲ move up, ▼ move down, ✕ remove (also in the node's right-click menu)`,
        computeSize: (width) => [width ?? 0, HEADER_HEIGHT],
        draw(ctx, drawnNode, width, y) {
            const row = readRow(drawnNode, i);
            ctx.save();
            ctx.strokeStyle = "#555";
            ctx.beginPath();
            ctx.moveTo(15, y + 1.5);
            ctx.lineTo(width - 15, y + 1.5);
            ctx.stroke();
            ctx.font = "11px sans-serif";
            ctx.textAlign = "left";
            ctx.fillStyle = row.enabled ? "#9ab" : "#777";
            ctx.fillText(`row ${i}${row.enabled ? "" : " (off)"}`, 17, y + HEADER_HEIGHT * 0.72);
            ctx.textAlign = "center";
            const left = width - 15 - BUTTONS.length * BUTTON_WIDTH;
            BUTTONS.forEach((button, b) => {
                ctx.fillStyle = buttonEnabled(drawnNode, i, button.action) ? "#ccc" : "#555";
                ctx.fillText(button.glyph, left + (b + 0.5) * BUTTON_WIDTH, y + HEADER_HEIGHT * 0.72);
            });
            ctx.restore();
        },
        onPointerDown(pointer, clickedNode, canvas) {
            const x = canvas.graph_mouse[0] - clickedNode.pos[0];
            const button = buttonAt(clickedNode.size[0], x);
            if (!button) return false;
            pointer.onClick = () => doAction(clickedNode, button.action, i);
            return true;
        },
    };
}

function setUpStack(node) {
    if (!node.widgets?.some((w) => w.name === "adapter_1")) return;
    for (let i = 1; i <= ROWS; i++) {
        const { adapter, enabled } = rowWidgets(node, i);
        if (!adapter) continue;
        const header = node.addCustomWidget(headerWidget(i));
        node.widgets.splice(node.widgets.indexOf(header), 1);
        node.widgets.splice(node.widgets.indexOf(adapter), 0, header);
        if (enabled?.options) {
            enabled.options.on ??= "on";
            enabled.options.off ??= "off";
        }
    }
    const add = node.addWidget("button", "miva_add", null, () => rowActions.add(node), { serialize: false });
    add.serialize = false;
    add.label = "+ add adapter";

    // Saved widgets_values must hold the slots' values only, in order: LGraphNode.serialize() leaves a hole for
    // every widget that does not serialize, while configure() skips those widgets, so close the holes here.
    const onSerialize = node.onSerialize;
    node.onSerialize = function (data) {
        onSerialize?.apply(this, arguments);
        if (data.widgets_values) {
            data.widgets_values = this.widgets.filter((w) => w.serialize !== false).map((w) => w.value);
        }
    };
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
        if (!app.configuringGraph && this.mivaShown) layoutRows(this); // a link to a hidden row shows it
        return result;
    };
    const getExtraMenuOptions = node.getExtraMenuOptions;
    node.getExtraMenuOptions = function () {
        const extra = getExtraMenuOptions?.apply(this, arguments);
        const items = Array.isArray(extra) ? extra : [];
        const rows = [];
        for (let i = 1; i <= this.mivaShown; i++) {
            const row = readRow(this, i);
            const entry = (content, action, disabled = false) => ({
                content, disabled, callback: () => { doAction(this, action, i); } });
            rows.push({
                content: `Row ${i}: ${row.adapter}${row.enabled ? "" : " (off)"}`,
                has_submenu: true,
                submenu: { options: [
                    entry("Move row up", "up", i === 1),
                    entry("Move row down", "down", i === this.mivaShown),
                    entry(row.enabled ? "Turn row off" : "Turn row on", "toggle"),
                    entry("Remove row", "remove"),
                ] },
            });
        }
        rows.push({ content: "Add adapter row", disabled: this.mivaShown >= ROWS,
            callback: () => { rowActions.add(this); } });
        return items.concat([{ content: "MIVA rows", has_submenu: true, submenu: { options: rows } }]);
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
    node.size[0] = Math.max(node.size[0], STACK_MIN_WIDTH); // room for the adapters' file names
    layoutRows(node);
}

// Nodes whose text after a run (what was loaded, what was found, warnings) is shown on the node itself.
const INFO_NODES = new Set(["MIVAStack", "MIVALoader", "MotionDialsSubjectMask", "MotionDialsGroundingDINOLoader",
    "MotionDialsSAM2Loader"]);

app.registerExtension({
    name: "MotionDials.MIVA",
    nodeCreated(node) {
        if (!INFO_NODES.has(node.comfyClass)) return;
        showInfo(node);
        if (node.comfyClass === "MIVAStack") setUpStack(node);
    },
});
