"""EDG: the dynamic / consistency merge, its building blocks, and the timestep switch.

From the EDG paper, "Extrapolating and Decoupling Image-to-Video Generation Models" (CVPR 2025), and its code.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..models.merge import (
    SEED_LIMIT,
    Dare,
    consistency_seed,
    dare_add_difference,
    edg_consistency,
    edg_dynamic,
    extrapolate,
)
from .input_checks import MotionDialsNode
from .model_switch import MODES, switch_models
from .weight_merge import Formula, check_same_architecture, merged_clone

CATEGORY = "Motion Dials/EDG"
BOUNDARY_HINT = (
    "EDG: 0.5 (T = 500). Wan 2.2's own expert split: 0.875 for T2V A14B, 0.9 for I2V A14B."
)


def _seed_input(tooltip: str) -> io.Int.Input:
    return io.Int.Input("seed", default=0, min=0, max=SEED_LIMIT - 1, control_after_generate=False, tooltip=tooltip)


def _dare_rate_input() -> io.Float.Input:
    return io.Float.Input(
        "dare_rate", default=0.7, min=0.0, max=0.99, step=0.01,
        tooltip="DARE drop rate p: each element of a difference is dropped with probability p and the kept ones "
        "are scaled by 1 / (1 - p). EDG uses 0.7. Biases and norms (1-D tensors) are never dropped.",
    )


class EDGMerge(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        factor = dict(min=-10.0, max=10.0, step=0.01)
        return io.Schema(
            node_id="EDGMerge",
            display_name="EDG Merge",
            category=CATEGORY,
            description=(
                "Builds EDG's two models from a pretrained and a motion fine-tuned checkpoint: a dynamic model "
                "(extrapolated away from the fine-tune, then DARE) for the early, high-noise steps, and a "
                "consistency model (the fine-tune plus a DARE share of its own change) for the late steps. "
                "Computed as weight patches when the models load; save them with ComfyUI's model-save nodes."
            ),
            inputs=[
                io.Model.Input("pretrained", tooltip="theta_pre: the base image-to-video model."),
                io.Model.Input("finetuned", tooltip="theta_sft: the same model fine-tuned for motion."),
                io.Float.Input("dyn_alpha", default=0.25, **factor,
                               tooltip="Extrapolation: dyn = pre + dyn_alpha * (pre - sft). EDG: 0.25."),
                io.Float.Input("dyn_beta", default=0.75, **factor,
                               tooltip="Dynamic model = pre + dyn_beta * DARE(dyn - pre). EDG: 0.75."),
                io.Float.Input("con_alpha", default=1.0, **factor,
                               tooltip="Consistency model = con_alpha * sft + con_beta * DARE(sft - pre). EDG: 1.0."),
                io.Float.Input("con_beta", default=0.25, **factor,
                               tooltip="Weight of the DARE task vector in the consistency model. EDG: 0.25."),
                _dare_rate_input(),
                _seed_input("Seed of the DARE masks: one seed always gives the same two models (EDG's own masks "
                            "are unseeded). The dynamic model's mask uses this seed, the consistency model's seed + 1, "
                            "as DARE Add Difference would with those seeds."),
            ],
            outputs=[
                io.Model.Output("dynamic", display_name="dynamic",
                                tooltip="theta_dyn*: run it early (EDG Timestep Switch, early_model)."),
                io.Model.Output("consistency", display_name="consistency",
                                tooltip="theta_con*: run it late (EDG Timestep Switch, late_model)."),
            ],
        )

    @classmethod
    def execute(cls, pretrained, finetuned, dyn_alpha, dyn_beta, con_alpha, con_beta, dare_rate,
                seed) -> io.NodeOutput:
        cls.check_inputs(dyn_alpha=dyn_alpha, dyn_beta=dyn_beta, con_alpha=con_alpha, con_beta=con_beta,
                         dare_rate=dare_rate, seed=seed)
        check_same_architecture(pretrained, finetuned, ("pretrained", "finetuned"))
        dynamic = merged_clone(pretrained, (finetuned,), Formula(
            edg_dynamic, dict(alpha=dyn_alpha, beta=dyn_beta), Dare(dare_rate, seed)), "EDG Merge (dynamic)")
        consistency = merged_clone(pretrained, (finetuned,), Formula(
            edg_consistency, dict(alpha=con_alpha, beta=con_beta), Dare(dare_rate, consistency_seed(seed))),
            "EDG Merge (consistency)")
        return io.NodeOutput(dynamic, consistency)


class ModelMergeExtrapolate(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialsModelMergeExtrapolate",
            display_name="Model Merge Extrapolate",
            category=CATEGORY,
            description="model1 * ratio + model2 * (1 - ratio), like ModelMergeSimple but with any ratio: above 1 "
            "moves away from model2 (EDG's dyn = pre + a (pre - sft) is ratio 1 + a, model1 = pre).",
            inputs=[
                io.Model.Input("model1", tooltip="The model to move towards (or past)."),
                io.Model.Input("model2", tooltip="The model to move away from when ratio > 1."),
                io.Float.Input("ratio", default=1.25, min=-10.0, max=10.0, step=0.01,
                               tooltip="1 gives model1, 0 gives model2; 1.25 is EDG's extrapolation (a = 0.25)."),
            ],
            outputs=[io.Model.Output(tooltip="The merged model (weight patches on a clone of model1).")],
        )

    @classmethod
    def execute(cls, model1, model2, ratio) -> io.NodeOutput:
        cls.check_inputs(ratio=ratio)
        check_same_architecture(model1, model2, ("model1", "model2"))
        return io.NodeOutput(merged_clone(model1, (model2,), Formula(extrapolate, dict(ratio=ratio)),
                                          "Model Merge Extrapolate"))


class DareAddDifference(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialsDareAddDifference",
            display_name="DARE Add Difference",
            category=CATEGORY,
            description="Task arithmetic with DARE: target + strength * DARE(tuned - base). EDG's consistency model "
            "is target = tuned = sft, base = pre, strength 0.25; its dynamic model is target = base = pre, tuned = "
            "the extrapolated model, strength 0.75.",
            inputs=[
                io.Model.Input("target", tooltip="The model the difference is added to."),
                io.Model.Input("base", tooltip="The model the difference is taken from (usually the pretrained)."),
                io.Model.Input("tuned", tooltip="The model the difference leads to (usually the fine-tune)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How much of the DARE task vector is added."),
                _dare_rate_input(),
                _seed_input("Seed of the DARE mask: one seed always gives the same model."),
            ],
            outputs=[io.Model.Output(tooltip="The merged model (weight patches on a clone of target).")],
        )

    @classmethod
    def execute(cls, target, base, tuned, strength, dare_rate, seed) -> io.NodeOutput:
        cls.check_inputs(strength=strength, dare_rate=dare_rate, seed=seed)
        check_same_architecture(target, base, ("target", "base"))
        check_same_architecture(target, tuned, ("target", "tuned"))
        formula = Formula(dare_add_difference, dict(strength=strength), Dare(dare_rate, seed))
        return io.NodeOutput(merged_clone(target, (base, tuned), formula, "DARE Add Difference"))


class EDGTimestepSwitch(MotionDialsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EDGTimestepSwitch",
            display_name="EDG Timestep Switch",
            category=CATEGORY,
            description=(
                "Two models in one sampler run: the early model while timestep / 1000 > boundary, the late model "
                "after. Use it instead of two chained KSamplerAdvanced nodes: the split is set once, and multistep "
                "samplers keep their history across the switch. Put patches (DyMoS, LoRAs) on each model before "
                "this node; nodes after it patch the early model only."
            ),
            inputs=[
                io.Model.Input("early_model", tooltip="Runs the high-noise steps: EDG's dynamic model, or Wan 2.2's "
                               "high-noise expert."),
                io.Model.Input("late_model", tooltip="Runs the low-noise steps: EDG's consistency model, or Wan "
                               "2.2's low-noise expert. Same family and latent format as the early model."),
                io.Float.Input("boundary", default=0.5, min=0.0, max=1.0, step=0.005,
                               tooltip="In timestep units / 1000: the early model runs while timestep(sigma) / 1000 "
                               "> boundary. " + BOUNDARY_HINT),
                io.Combo.Input("mode", options=list(MODES), default=MODES[0],
                               tooltip="hard switch: one model per step (EDG). blend: inside the window, mix the "
                               "two predictions with a weight linear in the timestep."),
                io.Float.Input("window", default=0.2, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="blend only: width of the mixing window around the boundary, in timestep "
                               "units / 1000. 1.0 around 0.5 is EDG's unused blended variant (weight t / 1000)."),
            ],
            outputs=[io.Model.Output(tooltip="One model for any sampler node (KSampler, KSamplerAdvanced, "
                                     "SamplerCustomAdvanced).")],
        )

    @classmethod
    def execute(cls, early_model, late_model, boundary, mode, window=0.2) -> io.NodeOutput:
        cls.check_inputs(boundary=boundary, mode=mode, window=window)
        return io.NodeOutput(switch_models(early_model, late_model, boundary, mode, window))
