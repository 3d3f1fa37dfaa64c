// DyMoS Motion Slider: say in words what the strength slider does, under the node's widgets.
import { app } from "../../scripts/app.js";

const HINT_HEIGHT = 18;

function describe(strength, tau) {
    if (strength === 0 || tau === 0) return "off: the model is left untouched";
    const direction = strength > 0 ? "more motion" : "more static";
    return `${direction}, first ${Math.round(tau * 100)} % of denoising`;
}

app.registerExtension({
    name: "MotionDials.DyMoSMotionSlider",
    nodeCreated(node) {
        if (node.comfyClass !== "DyMoSMotionSlider") return;
        const widget = (name) => node.widgets?.find((w) => w.name === name);
        const drawForeground = node.onDrawForeground;
        node.onDrawForeground = function (ctx) {
            drawForeground?.apply(this, arguments);
            if (this.flags?.collapsed) return;
            const strength = widget("strength")?.value ?? 0;
            const tau = widget("tau")?.value ?? 0;
            ctx.save();
            ctx.font = "12px sans-serif";
            ctx.fillStyle = "#9ab";
            ctx.textAlign = "left";
            ctx.fillText(describe(strength, tau), 10, this.size[1] - 6);
            ctx.restore();
        };
        // Room for the hint below the last widget, whatever size the frontend computes.
        const computeSize = node.computeSize;
        node.computeSize = function () {
            const size = computeSize.apply(this, arguments);
            return [size[0], size[1] + HINT_HEIGHT];
        };
        node.setSize(node.computeSize());
    },
});
