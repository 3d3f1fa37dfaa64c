"""EDG on the tiny models through ComfyUI's real loader, patcher and samplers.

The two tiny Wan 2.2 I2V experts (one architecture, different random weights) stand in for the
pretrained and the fine-tuned checkpoint, and for two independent models in one sampler run.
"""

import copy

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import pytest
import torch
from sampling import boundary_between, conditioning, load_tiny, sample_tiny, sigmas_of

from motion_dials.models.merge import CHUNK, dare_generator
from motion_dials.nodes.edg import DareAddDifference, EDGMerge, EDGTimestepSwitch, ModelMergeExtrapolate
from motion_dials.nodes.model_switch import SwitchError
from motion_dials.nodes.weight_merge import MergeError

CASE = "wan2.2_i2v_high"  # conditioning of the Wan 2.2 I2V experts
STEPS, SPLIT = 6, 3
EDG = dict(dyn_alpha=0.25, dyn_beta=0.75, con_alpha=1.0, con_beta=0.25, dare_rate=0.7)


def plain_state(model) -> dict:
    return {key: tensor.detach().clone().float() for key, tensor in model.model.diffusion_model.state_dict().items()}


def loaded_state(model) -> dict:
    """The weights as ComfyUI computes them when it loads the model (patches applied)."""
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    return plain_state(model)


def fingerprint(model) -> tuple:
    return (copy.deepcopy(model.model_options), dict(model.patches), model.patches_uuid)


@pytest.fixture(scope="module")
def pair(tiny_models):
    """(pretrained, finetuned) models and their state dicts read before anything patched them."""
    pre, sft = load_tiny("wan2.2_i2v_high"), load_tiny("wan2.2_i2v_low")
    return pre, sft, plain_state(pre), plain_state(sft)


def edg_merge(pre, sft, seed=7, **overrides):
    return EDGMerge.execute(pre, sft, **{**EDG, **overrides}, seed=seed).result


# ---- the merge -------------------------------------------------------------------------------------------

def dare_reference(delta, rate, seed, key):
    """DARE as the EDG paper words it, with the pack's mask stream (drawn per chunk of the flat tensor)."""
    if delta.ndim <= 1:
        return delta
    draws = [torch.rand(min(CHUNK, delta.numel() - start), generator=dare_generator(seed, key, chunk))
             for chunk, start in enumerate(range(0, delta.numel(), CHUNK))]
    keep = torch.cat(draws).view(delta.shape) >= rate
    return torch.where(keep, delta / (1 - rate), torch.zeros_like(delta))


def test_merge_equals_the_reference_formulas(pair):
    pre, sft, pre_sd, sft_sd = pair
    dynamic, consistency = edg_merge(pre, sft, seed=7)
    dynamic_sd, consistency_sd = loaded_state(dynamic), loaded_state(consistency)
    rate = EDG["dare_rate"]
    for key in pre_sd:
        full_key = "diffusion_model." + key
        p, s = pre_sd[key], sft_sd[key]
        dyn = p + EDG["dyn_alpha"] * (p - s)
        expected_dynamic = p + EDG["dyn_beta"] * dare_reference(dyn - p, rate, 7, full_key)
        expected_consistency = EDG["con_alpha"] * s + EDG["con_beta"] * dare_reference(s - p, rate, 8, full_key)
        torch.testing.assert_close(dynamic_sd[key], expected_dynamic, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(consistency_sd[key], expected_consistency, rtol=1e-5, atol=1e-6, msg=key)


def test_dare_keeps_about_one_element_in_three_and_leaves_1d_tensors_whole(pair):
    pre, sft, pre_sd, sft_sd = pair
    consistency_sd = loaded_state(edg_merge(pre, sft, con_alpha=0.0, con_beta=1.0)[1])  # = DARE(sft - pre)
    kept = total = 0
    for key, merged in consistency_sd.items():
        delta = sft_sd[key] - pre_sd[key]
        if delta.ndim == 1:
            torch.testing.assert_close(merged, delta, rtol=1e-5, atol=1e-6)
            continue
        nonzero = merged != 0
        torch.testing.assert_close(merged[nonzero], delta[nonzero] / 0.3, rtol=1e-4, atol=1e-5)
        kept += int(nonzero.sum())
        total += delta.numel()
    assert 0.29 < kept / total < 0.31


def test_merge_is_deterministic_for_a_seed_and_differs_between_seeds(pair):
    pre, sft, _, _ = pair
    first = loaded_state(edg_merge(pre, sft, seed=3)[0])
    again = loaded_state(edg_merge(pre, sft, seed=3)[0])
    other = loaded_state(edg_merge(pre, sft, seed=4)[0])
    matrix = next(key for key, tensor in first.items() if tensor.ndim == 2)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first[matrix], other[matrix])


def test_building_blocks_rebuild_edg_merge_exactly(pair):
    """Extrapolate + DARE Add Difference, seeds s and s + 1, give EDG Merge's two models: one code path."""
    pre, sft, _, _ = pair
    dynamic, consistency = edg_merge(pre, sft, seed=11)
    extrapolated = ModelMergeExtrapolate.execute(pre, sft, 1.0 + EDG["dyn_alpha"]).result[0]
    by_hand_dynamic = DareAddDifference.execute(pre, pre, extrapolated, EDG["dyn_beta"], EDG["dare_rate"], 11).result[0]
    by_hand_consistency = DareAddDifference.execute(sft, pre, sft, EDG["con_beta"], EDG["dare_rate"], 12).result[0]
    for merged, by_hand in ((dynamic, by_hand_dynamic), (consistency, by_hand_consistency)):
        expected, actual = loaded_state(merged), loaded_state(by_hand)
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)


def test_extrapolate_goes_past_one(pair):
    pre, sft, pre_sd, sft_sd = pair
    merged = loaded_state(ModelMergeExtrapolate.execute(pre, sft, 1.5).result[0])
    for key in pre_sd:
        torch.testing.assert_close(merged[key], 1.5 * pre_sd[key] - 0.5 * sft_sd[key], rtol=1e-5, atol=1e-6)


def test_merge_and_sampling_leave_the_input_models_unchanged(pair):
    pre, sft, pre_sd, sft_sd = pair
    before = fingerprint(pre), fingerprint(sft)
    dynamic, consistency = edg_merge(pre, sft)
    sample_tiny(CASE, switch(dynamic, consistency, 0.5), 2)
    assert (fingerprint(pre), fingerprint(sft)) == before
    assert all(torch.equal(tensor, pre_sd[key]) for key, tensor in loaded_state(pre).items())
    assert all(torch.equal(tensor, sft_sd[key]) for key, tensor in loaded_state(sft).items())


def test_merged_models_save_with_comfyuis_model_save_node(pair, tmp_path):
    import comfy.sd
    from comfy_extras.nodes_model_merging import ModelSave

    dynamic = edg_merge(pair[0], pair[1])[0]
    saver = ModelSave()
    saver.output_dir = str(tmp_path)
    saver.save(dynamic, "edg/dynamic")
    (saved,) = (tmp_path / "edg").glob("dynamic*.safetensors")
    reloaded = plain_state(comfy.sd.load_diffusion_model(str(saved)))
    expected = loaded_state(dynamic)
    assert reloaded.keys() == expected.keys()
    assert all(torch.equal(reloaded[key], expected[key]) for key in expected)


def test_mismatched_architectures_name_the_first_key_and_both_shapes(tiny_models, pair):
    pre = pair[0]
    t2v = load_tiny("wan2.1_t2v")  # 16 input channels where the I2V model has 36
    with pytest.raises(MergeError, match=r"patch_embedding\.weight has shape \(256, 36, 1, 2, 2\) in pretrained but "
                                         r"\(256, 16, 1, 2, 2\) in finetuned"):
        edg_merge(pre, t2v)
    with pytest.raises(MergeError, match="HunyuanVideo15"):
        edg_merge(pre, load_tiny("hunyuan15_i2v"))


def test_a_nan_in_the_result_is_a_clear_error_and_leaves_nothing_patched(pair):
    pre, sft, pre_sd, _ = pair
    key = "diffusion_model.blocks.0.self_attn.q.weight"
    broken = sft.clone()
    poison = torch.zeros_like(sft.model.diffusion_model.blocks[0].self_attn.q.weight)
    poison[0, 0] = float("nan")
    broken.add_patches({key: (poison,)})
    dynamic, _ = edg_merge(pre, broken)
    with pytest.raises(MergeError, match=r"NaN or Inf in diffusion_model\.blocks\.0\.self_attn\.q\.weight"):
        comfy.model_management.load_models_gpu([dynamic], force_full_load=True)
    assert all(torch.equal(tensor, pre_sd[k]) for k, tensor in loaded_state(pre).items())


# ---- the switch ------------------------------------------------------------------------------------------

def recording(model, name, log):
    """A clone of ``model`` that logs (name, sigma, weight-patch uuid of its module) for each model call."""
    recorded = model.clone()

    def wrapper(executor, x, t, *args, **kwargs):
        log.append((name, round(float(t.flatten()[0]), 6), executor.class_obj.current_weight_patches_uuid))
        return executor(x, t, *args, **kwargs)

    recorded.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_recording", wrapper)
    return recorded


@pytest.fixture(scope="module", params=["independent models", "EDG merge (shared base)"])
def early_late(request, pair):
    pre, sft, _, _ = pair
    return (pre, sft) if request.param == "independent models" else edg_merge(pre, sft)


def switch(early, late, boundary, mode="hard switch", window=0.2):
    return EDGTimestepSwitch.execute(early, late, boundary, mode, window).result[0]


def switched_and_chained(early, late, sampler="euler"):
    """The latent of one sampler run through the switch, and of two chained KSamplerAdvanced-style runs."""
    switched = sample_tiny(CASE, switch(early, late, boundary_between(early, SPLIT, STEPS)), STEPS, sampler=sampler)
    first = sample_tiny(CASE, early, STEPS, sampler=sampler, last_step=SPLIT)
    chained = sample_tiny(CASE, late, STEPS, sampler=sampler, start_step=SPLIT, latent={"samples": first})
    return switched, chained


def test_hard_switch_equals_two_chained_samplers_with_euler(early_late):
    switched, chained = switched_and_chained(*early_late)
    torch.testing.assert_close(switched, chained, rtol=0, atol=1e-5)


def record_switched_run(early, late, boundary, mode="hard switch", window=0.2) -> list:
    """Sample through the switch; the log of (model, sigma, weight-patch uuid) of every model call."""
    log = []
    sample_tiny(CASE, switch(recording(early, "early", log), recording(late, "late", log), boundary, mode, window),
                STEPS)
    return log


def models_by_step(log) -> list[set]:
    """Which models answered at each step's sigma."""
    answered = {}
    for name, sigma, _ in log:
        answered.setdefault(sigma, set()).add(name)
    return [answered[sigma] for sigma in sorted(answered, reverse=True)]


def test_each_model_answers_exactly_its_side_of_the_boundary(early_late):
    early, late = early_late
    log = record_switched_run(early, late, boundary_between(early, SPLIT, STEPS))
    assert len(models_by_step(log)) == STEPS
    assert models_by_step(log) == [{"early"} if i < SPLIT else {"late"} for i in range(STEPS)]


def test_hard_switch_patches_shared_weights_once_per_switch(pair):
    """The two EDG models share one module: it is re-patched at the switch and at no other step."""
    dynamic, consistency = edg_merge(pair[0], pair[1])
    log = record_switched_run(dynamic, consistency, boundary_between(dynamic, SPLIT, STEPS))
    uuids = [uuid for _, _, uuid in log]
    changes = sum(1 for before, after in zip(uuids, uuids[1:], strict=False) if before != after)
    assert changes == 1 and uuids[0] != uuids[-1]


def test_blend_runs_both_models_inside_the_window_without_re_patching(early_late):
    early, late = early_late
    sigmas = sigmas_of(early, STEPS)
    sampling = early.get_model_object("model_sampling")
    fractions = [float(sampling.timestep(sigmas[i : i + 1])) / 1000 for i in range(STEPS)]
    boundary = boundary_between(early, SPLIT, STEPS)
    window = 2 * (fractions[SPLIT - 1] - boundary) + 1e-3  # covers exactly the two steps next to the boundary
    log = record_switched_run(early, late, boundary, "blend", window)
    expected = [{"early"} if i < SPLIT - 1 else {"early", "late"} if i < SPLIT + 1 else {"late"} for i in range(STEPS)]
    assert models_by_step(log) == expected
    uuids_by_model = {}
    for name, _, uuid in log:
        uuids_by_model.setdefault(name, set()).add(uuid)
    assert all(len(uuids) == 1 for uuids in uuids_by_model.values()), "no model may be re-patched mid-run"


def test_blend_with_a_zero_window_is_the_hard_switch(early_late):
    early, late = early_late
    boundary = boundary_between(early, SPLIT, STEPS)
    hard = sample_tiny(CASE, switch(early, late, boundary), STEPS)
    blend = sample_tiny(CASE, switch(early, late, boundary, "blend", 0.0), STEPS)
    torch.testing.assert_close(blend, hard, rtol=0, atol=1e-6)


def reference_dpmpp_2m_over_two_models(early, late, split):
    """DPM-Solver++(2M) in plain Python: early denoiser for steps < split, late after, one history throughout.

    Each model is ComfyUI's own denoiser (CFG included), taken from two plain sampler runs: the first runs the
    loop's early steps, the second continues the same loop (x and the previous denoised) with the late model.
    """
    positive, negative, latent = conditioning(CASE)
    latent_image = comfy.sample.fix_empty_latent_channels(early, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, 0)
    sigmas = sigmas_of(early, STEPS)
    state = {}

    def loop(steps):
        def sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None):
            x = state.get("x", x)
            old_denoised = state.get("old_denoised")
            s_in = x.new_ones([x.shape[0]])
            for i in steps:
                denoised = model(x, sigmas[i] * s_in, **extra_args)
                t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
                h = t_next - t
                if old_denoised is None or sigmas[i + 1] == 0:
                    x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
                else:
                    r = (t + sigmas[i - 1].log()) / h
                    blended = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                    x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * blended
                old_denoised = denoised
            state.update(x=x, old_denoised=old_denoised)
            return x
        return comfy.samplers.KSAMPLER(sampler_function)

    comfy.sample.sample_custom(early, noise, 2.0, loop(range(split)), sigmas, positive, negative, latent_image, seed=0)
    return comfy.sample.sample_custom(late, noise, 2.0, loop(range(split, STEPS)), sigmas, positive, negative,
                                      latent_image, seed=0)


def test_dpmpp_2m_keeps_its_history_across_the_switch(early_late):
    early, late = early_late
    switched, chained = switched_and_chained(early, late, "dpmpp_2m")
    reference = reference_dpmpp_2m_over_two_models(early, late, SPLIT)
    torch.testing.assert_close(switched, reference, rtol=0, atol=1e-5)
    assert (switched - chained).abs().max() > 1e-3, "a restarted sampler loses its history; one run keeps it"


def test_switch_rejects_models_that_cannot_share_a_run(pair, tiny_models):
    pre = pair[0]
    with pytest.raises(SwitchError, match="HunyuanVideo15"):
        switch(pre, load_tiny("hunyuan15_i2v"), 0.5)
    with pytest.raises(SwitchError, match="in_dim"):
        switch(pre, load_tiny("wan2.1_t2v"), 0.5)


def test_switch_mode_is_validated():
    assert EDGTimestepSwitch.validate_inputs(mode="hard switch") is True
    refusal = EDGTimestepSwitch.validate_inputs(mode="soft")
    assert "EDG Timestep Switch: mode 'soft' is not one of its choices" in refusal


def test_each_model_keeps_its_own_attention_patches(pair):
    """DyMoS on the late model only: the switch runs it on the late steps exactly as a chained sampler does."""
    from motion_dials.nodes.dymos import DyMoSMotionSlider

    early = pair[0]
    late = DyMoSMotionSlider.execute(pair[1], 2.0, 1.0, "uniform", 1).result[0]  # tau 1: active on every step
    switched, chained = switched_and_chained(early, late)
    torch.testing.assert_close(switched, chained, rtol=0, atol=1e-5)
    without_slider = sample_tiny(CASE, switch(early, pair[1], boundary_between(early, SPLIT, STEPS)), STEPS)
    assert (switched - without_slider).abs().max() > 1e-4
