// Widgets that look and work the same in both of the frontend's node renderers: the classic LiteGraph canvas and
// Nodes 2.0 (Vue, the setting Comfy.VueNodes.Enabled). Imported by dymos.js and miva.js; registers nothing itself.
//
// What the two renderers honour (ComfyUI frontend 1.32.9 with ComfyUI 0.3.75, 1.49.6 with 0.33.0):
// - Canvas drawing is the canvas's: Nodes 2.0 never calls node.onDrawForeground. It does paint a custom widget's
//   draw() into a small canvas of that widget's own (both frontends), but repaints it only on a resize or that
//   widget's own callback, so anything drawn from other widgets' state goes stale there.
// - A DOM widget (node.addDOMWidget) is shown by both: over the canvas, or inside the Vue node. Its element is
//   ours, so text and buttons in it update the moment we change them, in both renderers.
// - Hiding: the canvas reads `widget.hidden`; Nodes 2.0 reads `widget.options.hidden`, but only when it builds its
//   own copy of the node's widget list. 1.49.6 rebuilds that copy when node.widgets changes; 1.32.9 stops
//   rebuilding it after the first edit of any of the node's widgets. So widgets are hidden here once, when the
//   node is created, and what changes later (rows, text) lives inside DOM widgets.
// - Widgets that must not be saved or sent: `serialize = false` (workflow) and `options.serialize = false` (API
//   prompt), as the frontend's own DOM widgets do.

const STYLE_ID = "motion-dials-node-widgets";
const TEXT_LINE_HEIGHT = 15;
const TEXT_PADDING = 6;
const DOM_MARGIN = 6; // the DOM widget's inset on the canvas (the frontend's default is 10)

const STYLE = `
.motion-dials-text { box-sizing: border-box; contain: inline-size; font: 12px/${TEXT_LINE_HEIGHT}px sans-serif;
    color: #9ab; pointer-events: none; overflow: hidden; }
.motion-dials-text:empty { display: none; }
.motion-dials-text.motion-dials-panel { background: rgba(0, 0, 0, 0.25); border-radius: 4px;
    padding: ${TEXT_PADDING}px 8px; }
.motion-dials-text > div { white-space: pre; overflow: hidden; text-overflow: ellipsis;
    min-height: ${TEXT_LINE_HEIGHT}px; }
.motion-dials-text .motion-dials-heading { color: #cde; }
.motion-dials-text .motion-dials-off { color: #777; }
.motion-dials-text .motion-dials-warning { color: #fc6; }
`;

function ensureStyle() {
    if (document.getElementById(STYLE_ID)) return;
    const style = document.createElement("style");
    style.id = STYLE_ID;
    style.textContent = STYLE;
    document.head.append(style);
}

export function addStyle(id, css) {
    ensureStyle();
    if (document.getElementById(id)) return;
    const style = document.createElement("style");
    style.id = id;
    style.textContent = css;
    document.head.append(style);
}

// Hide a widget in both renderers, for good (see above). It keeps its value and its place in node.widgets, so it
// is still saved and sent. The canvas of frontend 1.3x still gives a hidden widget the height of its
// computeSize() when it lays the node out, hence a computeSize of zero height (with the 4 px gap taken back).
export function hideWidget(widget) {
    if (!widget) return;
    widget.hidden = true;
    widget.options ??= {};
    widget.options.hidden = true;
    widget.computeSize = () => [0, -4];
}

// widgets_values must hold the serialized widgets' values only, in order: LGraphNode.serialize() leaves a hole
// for every widget that does not serialize, while configure() skips those widgets; close the holes.
export function keepWidgetValuesPlain(node) {
    if (node.motionDialsPlainValues) return;
    node.motionDialsPlainValues = true;
    const onSerialize = node.onSerialize;
    node.onSerialize = function (data) {
        onSerialize?.apply(this, arguments);
        if (data.widgets_values) {
            data.widgets_values = this.widgets.filter((w) => w.serialize !== false).map((w) => w.value);
        }
    };
}

// A DOM widget around ``element``: not saved, not sent, shown at every zoom. ``height()`` is the height the canvas
// gives it (Nodes 2.0 sizes it by its content).
export function addElementWidget(node, name, element, height) {
    ensureStyle();
    const widget = node.addDOMWidget(name, "motion_dials", element, {
        serialize: false,
        hideOnZoom: false,
        margin: DOM_MARGIN,
        getMinHeight: () => height(),
        getMaxHeight: () => height(),
    });
    widget.serialize = false;
    widget.options.serialize = false;
    keepWidgetValuesPlain(node);
    return widget;
}

// The canvas height of a DOM widget whose content is ``contentHeight`` px high (0: nothing to show).
export function canvasHeight(contentHeight) {
    return contentHeight > 0 ? contentHeight + 2 * DOM_MARGIN : 0;
}

let measuringContext = null;

export function textWidth(text, font = "12px sans-serif") {
    measuringContext ??= document.createElement("canvas").getContext("2d");
    measuringContext.font = font;
    return measuringContext.measureText(text).width;
}

// Read-only text on the node, one line per entry of setLines(); no lines, no room taken. ``panel``: on a dark
// panel. ``lineClass(line, i, lines)`` may name a class for a line (motion-dials-heading / -off / -warning).
export function addTextWidget(node, name, { panel = false, lineClass = null } = {}) {
    ensureStyle();
    const element = document.createElement("div");
    element.className = "motion-dials-text" + (panel ? " motion-dials-panel" : "");
    element.dataset.motionDialsText = name;
    let lines = [];
    const contentHeight = () => (lines.length ? lines.length * TEXT_LINE_HEIGHT + (panel ? 2 * TEXT_PADDING : 0) : 0);
    const widget = addElementWidget(node, name, element, () => canvasHeight(contentHeight()));
    widget.setLines = (newLines) => {
        lines = newLines.slice();
        element.replaceChildren(...lines.map((line, i) => {
            const div = document.createElement("div");
            div.textContent = line || " ";
            const cls = lineClass?.(line, i, lines);
            if (cls) div.className = cls;
            return div;
        }));
        element.title = lines.join("\n");
    };
    widget.getLines = () => lines.slice();
    widget.textWidth = () => Math.max(0, ...lines.map((line) => textWidth(line))) + (panel ? 16 : 0) + 2 * DOM_MARGIN;
    return widget;
}

// Fit the node's height to its widgets (growing its width to ``minWidth``), in either renderer.
export function fitNode(node, minWidth = 0) {
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0], minWidth), size[1]]);
    node.setDirtyCanvas?.(true, true);
}
