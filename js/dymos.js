// DyMoS Motion Slider: say in words what the strength slider does, under the node's widgets. The hint is a DOM
// widget (node_widgets.js), so both the classic canvas and Nodes 2.0 show it; it follows every change of
// strength and tau, whether made on the node, in a loaded workflow or by a script that calls the widget's callback.
import { app } from "../../scripts/app.js";
import { addTextWidget, fitNode } from "./node_widgets.js";

export function describe(strength, tau) {
    if (strength === 0 || tau === 0) return "off: the model is left untouched";
    const direction = strength > 0 ? "more motion" : "more static";
    return `${direction}, first ${Math.round(tau * 100)} % of denoising`;
}

app.registerExtension({
    name: "MotionDials.DyMoSMotionSlider",
    nodeCreated(node) {
        if (node.comfyClass !== "DyMoSMotionSlider") return;
        const widget = (name) => node.widgets?.find((w) => w.name === name);
        const hint = addTextWidget(node, "dymos_hint");
        hint.element.classList.add("motion-dials-dymos-hint");
        const update = () => hint.setLines([describe(widget("strength")?.value ?? 0, widget("tau")?.value ?? 0)]);
        for (const name of ["strength", "tau"]) {
            const input = widget(name);
            if (!input) continue;
            const callback = input.callback;
            input.callback = function () {
                const result = callback?.apply(this, arguments);
                update();
                return result;
            };
        }
        const onConfigure = node.onConfigure;
        node.onConfigure = function () {
            const result = onConfigure?.apply(this, arguments);
            update(); // the loaded values
            return result;
        };
        update();
        fitNode(node);
    },
});
