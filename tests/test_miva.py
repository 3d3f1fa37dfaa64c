"""MIVA adapters on the tiny Wan 2.1 T2V: exactness against a plain reference, stacking, file handling."""

import contextlib
import copy
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sampling import boundary_between, load_tiny, sample_tiny
from tiny_models import ADAPTERS, adapter_info, random_adapter_tensors

from motion_dials.models.miva import (
    Adapter,
    AdapterFormatError,
    convert_authors_layout,
    load_adapter,
    read_training_output,
    save_adapter,
)
from motion_dials.nodes.dymos import DyMoSMotionSlider
from motion_dials.nodes.edg import EDGTimestepSwitch
from motion_dials.nodes.miva import (
    MIVAApply,
    MIVAConvert,
    MIVALoader,
    MIVAStack,
    StackRow,
    apply_stack,
    resolve_model_file,
)
from motion_dials.nodes.patcher_core import FORWARD_KEY, PATCH_KEY, effects_of

CASE = "wan2.1_t2v"
STEPS = 3
HORSE, WATERFALL = ADAPTERS  # horse has an implicit-prompt MLP, waterfall does not


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_tiny(CASE)


def adapter(tiny, *, seed=None, zero_outputs=False, **info_changes) -> Adapter:
    info = adapter_info(tiny, **info_changes)
    tensors = random_adapter_tensors(info, tiny.seed if seed is None else seed, zero_outputs)
    return Adapter.from_tensors(tiny.file_name, info, tensors)


def stack(*rows) -> tuple:
    return tuple(StackRow(a, weight, enabled) for a, weight, enabled in rows)


def weights_fingerprint(model) -> float:
    return float(sum(p.double().sum() for p in model.model.diffusion_model.state_dict().values()))


# The plain reference of the MIVA paper's Wan block (method section), as the authors' Wan code wires it,
# on one Wan block, written from
# the formulas, in float64, every frame's cross-frame attention in its own loop.

def rms_norm(x, gain, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def rope(x, pe, heads):
    pairs = x.reshape(*x.shape[:2], heads, -1, 1, 2)
    return (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(x.shape)


def attention(q, k, v, heads, bias=None):
    """softmax(q k^T / sqrt(D) + bias) v per head, [B, Lq, d] x [B, Lk, d], bias [Lq, Lk] or None."""
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    weights = torch.softmax(logits if bias is None else logits + bias.to(logits), dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


def time_embedding(state, timesteps):
    half = 128  # Wan's freq_dim 256
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64) / half)
    angles = torch.outer(timesteps.double(), freqs)
    sinusoid = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    hidden = F.linear(sinusoid, state["time_embedding.0.weight"], state["time_embedding.0.bias"])
    return F.linear(F.silu(hidden), state["time_embedding.2.weight"], state["time_embedding.2.bias"])


def double(value):
    return None if value is None else value.detach().double()


def projection(x, weights):
    """An adapter's d -> d map: low-rank factors or a full matrix, and its bias."""
    if weights.weight is not None:
        out = x @ double(weights.weight).T
    else:
        out = x @ double(weights.down).T @ double(weights.up).T
    return out if weights.bias is None else out + double(weights.bias)


def dymos_bias(frames, per_frame, strength):
    """DyMoS (uniform schedule, one reference frame): -strength on the logits of frames >= 1 for frame 0's keys."""
    bias = torch.zeros(frames * per_frame, frames * per_frame, dtype=torch.float64)
    bias[per_frame:, :per_frame] = -strength
    return bias


def reference_block(state, i, x, vec, pe, context, rows, t_emb, frames, heads, sa_bias=None, cfa_biases=None,
                    prompt_gates=None):
    """Wan block i with MIVA rows [(BlockAdapter, weight, prompt_query_bias)], float64 in, float64 out.

    ``sa_bias`` [N, N] on the self-attention logits (DyMoS, M-MIVA), ``cfa_biases[r]`` [T, 2T] on row r's
    cross-frame ones, ``prompt_gates[r]`` [N] multiplying row r's implicit-prompt output (M-MIVA).
    """
    p = lambda name: state[f"blocks.{i}.{name}"]  # noqa: E731
    lin = lambda t, name: F.linear(t, p(f"{name}.weight"), p(f"{name}.bias"))  # noqa: E731
    norm = lambda t: F.layer_norm(t, t.shape[-1:], eps=1e-6)  # noqa: E731
    x, vec, pe, context, t_emb = (t.double() for t in (x, vec, pe, context, t_emb))
    e = (p("modulation").unsqueeze(0) + vec).unbind(2)
    # 1. the base self-attention, unchanged
    xs = norm(x) * (1 + e[1]) + e[0]
    q = rope(rms_norm(lin(xs, "self_attn.q"), p("self_attn.norm_q.weight")), pe, heads)
    k = rope(rms_norm(lin(xs, "self_attn.k"), p("self_attn.norm_k.weight")), pe, heads)
    x = x + lin(attention(q, k, lin(xs, "self_attn.v"), heads, sa_bias), "self_attn.o") * e[2]

    # 2. the cross-frame attention on this stream: the block's own k, v, norm_k on it, no RoPE
    keys = rms_norm(lin(x, "self_attn.k"), p("self_attn.norm_k.weight"))
    values = lin(x, "self_attn.v")
    per_frame = x.shape[1] // frames
    frame = lambda t, f: t[:, f * per_frame:(f + 1) * per_frame]  # noqa: E731
    residual = torch.zeros_like(x)
    for r, (block_adapter, weight, _) in enumerate(rows):
        cfa = block_adapter.cfa
        query = projection(x, cfa.query) if cfa.query.weight is not None else lin(x, "self_attn.q") + projection(
            x, cfa.query)
        query = rms_norm(query, double(cfa.norm_q))
        lam = torch.softmax(F.linear(F.silu(t_emb), double(cfa.weighting_weight), double(cfa.weighting_bias)) / 0.2,
                            dim=-1)[:, :1, None]
        outputs = []
        for f in range(frames):
            previous = max(f - 1, 0)
            frame_keys = torch.cat([frame(keys, 0), frame(keys, previous)], dim=1)
            frame_values = torch.cat([lam * frame(values, 0), (1 - lam) * frame(values, previous)], dim=1)
            outputs.append(attention(frame(query, f), frame_keys, frame_values, heads,
                                     None if cfa_biases is None else cfa_biases[r]))
        residual = residual + weight * projection(torch.cat(outputs, dim=1), cfa.output)
    x = x + residual  # before the cross-attention

    # 3. the cross-attention, or the implicit prompts in place of the whole module, added directly
    xc = F.layer_norm(x, x.shape[-1:], p("norm3.weight"), p("norm3.bias"), eps=1e-6)
    gates = prompt_gates or [None] * len(rows)
    prompts = [(a.prompt, w, query_bias, g) for (a, w, query_bias), g in zip(rows, gates, strict=True)
               if a.prompt is not None]
    if prompts:
        for prompt, weight, query_bias, gate in prompts:
            projected = F.linear(xc, p("cross_attn.q.weight"), p("cross_attn.q.bias") if query_bias else None)
            qc = rms_norm(projected, p("cross_attn.norm_q.weight"))
            hidden = F.linear(qc, double(prompt.down_weight), double(prompt.down_bias))
            hidden = F.layer_norm(hidden, hidden.shape[-1:], double(prompt.norm_weight), double(prompt.norm_bias),
                                  eps=1e-5)
            out = weight * F.linear(F.gelu(hidden), double(prompt.up_weight), double(prompt.up_bias))
            x = x + (out if gate is None else out * gate.double()[None, :, None])
    else:
        qc = rms_norm(lin(xc, "cross_attn.q"), p("cross_attn.norm_q.weight"))
        kc = rms_norm(lin(context, "cross_attn.k"), p("cross_attn.norm_k.weight"))
        x = x + lin(attention(qc, kc, lin(context, "cross_attn.v"), heads), "cross_attn.o")
    # 4. the feed-forward, unchanged
    y = lin(F.gelu(lin(norm(x) * (1 + e[4]) + e[3], "ffn.0"), approximate="tanh"), "ffn.2")
    return x + y * e[5]


@contextlib.contextmanager
def record_blocks(patched):
    """While inside: each block call of ``patched`` (index, inputs, output, sigmas)."""
    log = []
    patch = patched.model_options["transformer_options"][PATCH_KEY]

    def recorder(index):
        def record(_module, args, kwargs, output):
            options = kwargs["transformer_options"]
            if options.get(PATCH_KEY) is patch:
                state = options.get(FORWARD_KEY)
                log.append((index, {"img": args[0], "vec": kwargs["e"], "pe": kwargs["freqs"],
                                    "txt": kwargs["context"]}, output.clone(),
                            None if state is None else state.sigmas.clone()))
        return record

    hooks = [block.register_forward_hook(recorder(index), with_kwargs=True)
             for index, block in enumerate(patched.model.diffusion_model.blocks)]
    try:
        yield log
    finally:
        for hook in hooks:
            hook.remove()


def float64_state(model) -> dict:
    return {k: v.double() for k, v in model.model.diffusion_model.state_dict().items()}


def reference_model(model, rows, frames, dymos_strength=0.0):
    """The bare model with every block replaced (ComfyUI's block replacement) by the float64 reference."""
    state = float64_state(model)
    model_sampling = model.get_model_object("model_sampling")
    heads = model.model.diffusion_model.num_heads
    reference = model.clone()

    def replacement(index):
        def block(args, extra):
            x = args["img"]
            t_emb = time_embedding(state, model_sampling.timestep(args["transformer_options"]["sigmas"]).double())
            sa_bias = dymos_bias(frames, x.shape[1] // frames, dymos_strength) if dymos_strength else None
            out = reference_block(state, index, x, args["vec"], args["pe"], args["txt"],
                                  [(a.blocks[index], w, a.info.prompt_query_bias) for a, w in rows], t_emb, frames,
                                  heads, sa_bias)
            return {"img": out.to(x.dtype)}
        return block

    for index in range(len(model.model.diffusion_model.blocks)):
        reference.set_model_patch_replace(replacement(index), "dit", "double_block", index)
    return reference


FULL_FORMS = dict(query_rank=0, output_rank=0, output_bias=True, prompt_query_bias=False)
REFERENCE_CASES = {
    "one adapter with an implicit prompt": lambda: [(adapter(HORSE), 0.8)],
    "one adapter, text cross-attention kept": lambda: [(adapter(WATERFALL), 1.3)],
    "a weighted stack of two": lambda: [(adapter(HORSE), 0.6), (adapter(WATERFALL), -0.7)],
    "two implicit prompts, full-matrix forms": lambda: [(adapter(HORSE), 0.5),
                                                        (adapter(HORSE, seed=78, **FULL_FORMS), 0.5)],
}


def compare_with_reference(model, rows, dymos_strength=0.0):
    """Every block's output (the reference on the block's own recorded input) and the sampled video, through
    several timesteps, against the float64 reference."""
    patched = apply_stack(model, stack(*((a, w, True) for a, w in rows)))
    if dymos_strength:
        patched = DyMoSMotionSlider.execute(patched, dymos_strength, 1.0, "uniform", 1).result[0]
    frames = 3  # latent frames of the tiny sample; patch size (1, 2, 2)
    state, model_sampling = float64_state(model), model.get_model_object("model_sampling")
    heads = model.model.diffusion_model.num_heads
    with record_blocks(patched) as log:
        video = sample_tiny(CASE, patched, STEPS)
    assert len(log) == STEPS * 2
    for index, args, out, sigmas in log:
        t_emb = time_embedding(state, model_sampling.timestep(sigmas).double())
        x = args["img"]
        sa_bias = dymos_bias(frames, x.shape[1] // frames, dymos_strength) if dymos_strength else None
        expected = reference_block(state, index, x, args["vec"], args["pe"], args["txt"],
                                   [(a.blocks[index], w, a.info.prompt_query_bias) for a, w in rows], t_emb, frames,
                                   heads, sa_bias)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert len({round(float(sigmas[0]), 6) for *_, sigmas in log}) == STEPS
    expected_video = sample_tiny(CASE, reference_model(model, rows, frames, dymos_strength), STEPS)
    torch.testing.assert_close(video, expected_video, rtol=1e-5, atol=1e-5 * float(expected_video.abs().max()))
    return video


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_patched_model_equals_the_corrected_reference_at_every_block_and_the_output(model, case):
    video = compare_with_reference(model, REFERENCE_CASES[case]())
    assert not torch.allclose(video, sample_tiny(CASE, model, STEPS), atol=1e-4), "the adapters changed nothing"


def test_miva_with_dymos_on_the_same_model_equals_the_reference_with_both(model):
    compare_with_reference(model, [(adapter(HORSE), 0.7), (adapter(WATERFALL), 0.4)], dymos_strength=1.5)


def test_zero_output_projections_weight_zero_and_off_rows_leave_the_video_bit_identical(model):
    unpatched = sample_tiny(CASE, model, STEPS)
    silent = apply_stack(model, stack((adapter(WATERFALL, zero_outputs=True), 1.0, True)))
    assert effects_of(silent), "a zero-output adapter is still applied"
    assert torch.equal(sample_tiny(CASE, silent, STEPS), unpatched)
    for weight, enabled in ((0.0, True), (1.0, False)):
        assert apply_stack(model, stack((adapter(HORSE), weight, enabled))) is model
    mixed = apply_stack(model, stack((adapter(HORSE), 0.0, True), (adapter(WATERFALL), 1.0, False),
                                     (adapter(WATERFALL, zero_outputs=True), 1.0, True)))
    assert torch.equal(sample_tiny(CASE, mixed, STEPS), unpatched)


def stream_seen_by_cross_attention(model) -> torch.Tensor:
    """Block 0's stream as its cross-attention's norm3 takes it, in one sampling step."""
    seen = []
    hook = model.model.diffusion_model.blocks[0].norm3.register_forward_hook(
        lambda _module, args, _output: seen.append(args[0].clone()))
    try:
        sample_tiny(CASE, model, 1)
    finally:
        hook.remove()
    return seen[0]


def first_block_change(model, rows) -> torch.Tensor:
    """What the cross-frame attention adds to block 0's stream before its cross-attention (block 0's input and
    self-attention are the same in every run)."""
    return stream_seen_by_cross_attention(apply_stack(model, stack(*rows))) - stream_seen_by_cross_attention(model)


def test_two_adapters_add_their_weighted_residuals_and_weights_act_linearly(model):
    a, b = adapter(WATERFALL), adapter(WATERFALL, seed=77)
    alone_a = first_block_change(model, [(a, 1.0, True)])
    alone_b = first_block_change(model, [(b, 1.0, True)])
    both = first_block_change(model, [(a, 0.7, True), (b, -1.3, True)])
    torch.testing.assert_close(both, 0.7 * alone_a - 1.3 * alone_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first_block_change(model, [(a, 2.0, True)]), 2.0 * alone_a, atol=1e-5, rtol=1e-4)
    assert alone_a.abs().max() > 1e-3 and alone_b.abs().max() > 1e-3


def test_implicit_prompts_of_a_stack_are_their_weighted_sum(model):
    horse, horse2 = adapter(HORSE), adapter(HORSE, seed=78)
    effect = effects_of(apply_stack(model, stack((horse, 0.5, True), (horse2, 1.5, True))))[0]
    alone = [effects_of(apply_stack(model, stack((a, 1.0, True))))[0] for a in (horse, horse2)]
    assert effect.replaces_cross_attention and not effects_of(apply_stack(
        model, stack((adapter(WATERFALL), 1.0, True))))[0].replaces_cross_attention

    class Ctx:
        block_index = 1

    module = model.model.diffusion_model.blocks[1].cross_attn
    normed = torch.randn(2, 48, 256)
    call = lambda e: e.replace_cross_attention(Ctx, normed, module)  # noqa: E731
    torch.testing.assert_close(call(effect), 0.5 * call(alone[0]) + 1.5 * call(alone[1]), atol=1e-5, rtol=1e-5)


def test_miva_composes_with_dymos_and_the_edg_switch_and_leaves_the_input_alone(model):
    options_before, weights_before = copy.deepcopy(model.model_options), weights_fingerprint(model)
    unpatched = sample_tiny(CASE, model, STEPS)
    miva = MIVAApply.execute(model, stack((adapter(HORSE), 1.0, True))).result[0]
    with_miva = sample_tiny(CASE, miva, STEPS)
    both = DyMoSMotionSlider.execute(miva, 2.0, 0.5, "uniform", 1).result[0]
    assert [type(e).__name__ for e in effects_of(both)] == ["MivaEffect", "DyMoSEffect"]
    with_both = sample_tiny(CASE, both, STEPS)
    assert torch.isfinite(with_both).all()
    assert not torch.allclose(with_both, with_miva) and not torch.allclose(with_miva, unpatched)

    # the switch: MIVA on the early side only; after the boundary the late (plain) model answers
    switched = EDGTimestepSwitch.execute(miva, model, boundary_between(model, 2, STEPS), "hard switch", 0.1).result[0]
    result = sample_tiny(CASE, switched, STEPS)
    assert torch.isfinite(result).all()
    assert not torch.allclose(result, with_miva) and not torch.allclose(result, unpatched)

    assert model.model_options == options_before and weights_fingerprint(model) == weights_before
    assert torch.equal(sample_tiny(CASE, model, STEPS), unpatched)


# Files: our format, the authors' layout, and bad input.

THEIR_NAMES = {  # the authors' diffsynth Wan code: DiTBlock.i2v_adapter (I2VAdapter) and cross_attn (Simple_CA)
    "cfa.norm_q": "i2v_adapter.norm_q.weight",
    "cfa.weighting.weight": "i2v_adapter.weight_module.linear.weight",
    "cfa.weighting.bias": "i2v_adapter.weight_module.linear.bias",
    "prompt.down.weight": "cross_attn.CA2.weight", "prompt.down.bias": "cross_attn.CA2.bias",
    "prompt.norm.weight": "cross_attn.CA_norm.weight", "prompt.norm.bias": "cross_attn.CA_norm.bias",
    "prompt.up.weight": "cross_attn.CA3.weight", "prompt.up.bias": "cross_attn.CA3.bias",
}
THEIR_PROJECTIONS = {"cfa.q": "i2v_adapter.q", "cfa.o": "i2v_adapter.o", "mask.q": "i2v_adapter.q_m",
                     "mask.o": "i2v_adapter.o_m"}


def authors_layout(tensors: dict, info, lora_alpha=None) -> dict:
    """Our tensors under the authors' names (low-rank ones as PEFT's LoRA factors, B scaled back by rank / alpha),
    with frozen copies of the base that a training output may carry."""
    state = {}
    for name, tensor in tensors.items():
        i, rest = re.match(r"blocks\.(\d+)\.(.*)", name).groups()
        prefix = f"model.diffusion_model.blocks.{i}."
        if rest in THEIR_NAMES:
            state[prefix + THEIR_NAMES[rest]] = tensor
            continue
        ours, part = rest.rsplit(".", 1)
        theirs = prefix + THEIR_PROJECTIONS[ours]
        rank = tensors[f"blocks.{i}.{ours}.down"].shape[0] if part in ("down", "up") else None
        if part == "down":
            state[f"{theirs}.lora_A.default.weight"] = tensor
        elif part == "up":
            state[f"{theirs}.lora_B.default.weight"] = tensor * (rank / (lora_alpha or rank))
        else:
            state[f"{theirs}.{part}"] = tensor
    for i in range(info.blocks):
        state[f"model.diffusion_model.blocks.{i}.i2v_adapter.k.weight"] = torch.zeros(info.dim, info.dim)
        state[f"model.diffusion_model.blocks.{i}.i2v_adapter.norm_k.weight"] = torch.ones(info.dim)
        state[f"model.diffusion_model.blocks.{i}.cross_attn.q.weight"] = torch.zeros(info.dim, info.dim)
        if info.query_rank:
            state[f"model.diffusion_model.blocks.{i}.i2v_adapter.q.base_layer.weight"] = torch.zeros(info.dim, info.dim)
    return state


CONVERTER_CASES = {
    "LoRA-factored, implicit prompt": (dict(), 16.0),
    "full matrices with biases, mask stream": (dict(query_rank=0, output_rank=0, output_bias=True, mask_stream=True,
                                                    prompt_bias=False, prompt_query_bias=False), None),
}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("case", list(CONVERTER_CASES))
def test_the_authors_layout_converts_to_the_same_tensors(tmp_path, suffix, case):
    changes, lora_alpha = CONVERTER_CASES[case]
    info = adapter_info(HORSE, **changes)
    tensors = random_adapter_tensors(info, 5)
    ours = tmp_path / "ours.safetensors"
    save_adapter(ours, info, tensors)
    theirs = tmp_path / f"training_output{suffix}"
    state = authors_layout(tensors, info, lora_alpha)
    torch.save(state, theirs) if suffix == ".pt" else save_file(state, str(theirs))
    converted_info, converted = convert_authors_layout(read_training_output(theirs), base=info.base,
                                                       motion=info.motion, subject=info.subject, heads=info.heads,
                                                       lora_alpha=lora_alpha)
    assert converted_info == info
    loaded = load_adapter(ours)
    assert loaded.info == info
    for name, tensor in tensors.items():
        torch.testing.assert_close(converted[name], tensor, rtol=1e-3, atol=1e-6, msg=name)  # fp16 subnormals halved
    assert torch.equal(loaded.blocks[1].prompt.up_weight, tensors["blocks.1.prompt.up.weight"])


def test_version_1_files_and_unsupported_training_outputs_are_refused_with_the_reason(tmp_path):
    info = adapter_info(HORSE)
    tensors = random_adapter_tensors(info, 5)
    old = tmp_path / "version_1.safetensors"
    save_file(tensors, str(old), metadata=dict(info.to_metadata(), format_version="1"))
    with pytest.raises(AdapterFormatError, match="version 1 MIVA adapter.*Convert the training output again"):
        load_adapter(old)
    state = authors_layout(tensors, info)
    for extra, phrase in (("blocks.0.cross_attn.CA4.weight", "extra output projection"),
                          ("blocks.0.cross_attn_b.CA2.weight", "background implicit prompt"),
                          ("blocks.0.i2v_adapter.mystery.weight", "does not know")):
        with pytest.raises(AdapterFormatError, match=phrase):
            convert_authors_layout(dict(state, **{extra: torch.zeros(2)}), base=info.base, motion="m", subject="s",
                                   heads=info.heads)
    without_query = {k: v for k, v in state.items() if "i2v_adapter.q.lora" not in k}
    with pytest.raises(AdapterFormatError, match="query and output must both have been trained"):
        convert_authors_layout(without_query, base=info.base, motion="m", subject="s", heads=info.heads)


def test_convert_node_and_command_write_a_loadable_adapter(tiny_models, tmp_path):
    info = adapter_info(WATERFALL)
    tensors = random_adapter_tensors(info, 6)
    source = tiny_models / "miva" / "test_training_output.pt"
    torch.save(authors_layout(tensors, info), source)
    target = tiny_models / "miva" / "test_converted.safetensors"
    try:
        MIVAConvert.execute("test_training_output.pt", "waterfall", "waterfall", info.base, info.heads,
                            "test_converted")
        loaded = load_adapter(target)
        assert loaded.info == info
        assert torch.equal(loaded.blocks[0].cfa.output.up, tensors["blocks.0.cfa.o.up"])

        from motion_dials.models.miva import main
        command_target = tmp_path / "by_command.safetensors"
        main(["convert", str(source), str(command_target), "--motion", "waterfall", "--subject", "waterfall",
              "--heads", str(info.heads)])
        assert load_adapter(command_target).info == info
    finally:
        source.unlink(missing_ok=True)
        target.unlink(missing_ok=True)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/motion_dials_pickle_ran",))


def bad_files(tmp_path):
    """name -> (path, the phrase its error must contain)"""
    info = adapter_info(HORSE)
    tensors = random_adapter_tensors(info, 5)
    good = tmp_path / "good.safetensors"
    save_adapter(good, info, tensors)
    data = good.read_bytes()
    files = {}
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    files["truncated"] = (truncated, "damaged or incomplete")
    wrong_shape = dict(tensors, **{"blocks.0.cfa.q.down": torch.zeros(3, info.dim)})
    path = tmp_path / "wrong_shape.safetensors"
    save_file(wrong_shape, str(path), metadata=info.to_metadata())
    files["wrong shape"] = (path, "blocks.0.cfa.q.down has shape (3, 256)")
    path = tmp_path / "no_metadata.safetensors"
    save_file(tensors, str(path))
    files["missing metadata"] = (path, "not a Motion Dials MIVA adapter")
    metadata = info.to_metadata()
    del metadata["subject"]
    path = tmp_path / "partial_metadata.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    files["partial metadata"] = (path, "lacks the metadata subject")
    return files


def test_bad_files_give_clear_errors(tmp_path):
    for path, phrase in bad_files(tmp_path).values():
        with pytest.raises(AdapterFormatError, match=re.escape(phrase)):
            load_adapter(path)


def test_a_pickle_that_runs_code_is_refused_without_running(tmp_path):
    marker = "/tmp/motion_dials_pickle_ran"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.pt"
    torch.save({"blocks.0.x": RunsCode()}, path)
    with pytest.raises(AdapterFormatError, match="never runs code"):
        read_training_output(path)
    assert not os.path.exists(marker)


def test_wrong_family_or_width_is_a_clear_error_and_patches_nothing(model, tiny_models):
    options_before = copy.deepcopy(model.model_options)
    too_wide = adapter(HORSE, dim=512, heads=4)
    with pytest.raises(ValueError, match="width 512, 4 heads, 2 blocks.*width 256, 2 heads, 2 blocks"):
        MIVAApply.execute(model, stack((adapter(WATERFALL), 1.0, True), (too_wide, 1.0, True)))
    hunyuan = load_tiny("hunyuan15_i2v")
    with pytest.raises(ValueError, match="needs a Wan model; this model is HunyuanVideo 1.5"):
        MIVAApply.execute(hunyuan, stack((adapter(WATERFALL), 1.0, True)))
    with pytest.raises(ValueError, match="needs a Wan model"):
        MIVALoader.execute(HORSE.file_name, 1.0, None, hunyuan)
    assert model.model_options == options_before and effects_of(model) == ()


def test_loader_and_stack_read_from_the_miva_folder_and_refuse_names_outside_it(model, tiny_models):
    loaded = MIVALoader.execute(HORSE.file_name, 0.5, None, model)
    (row,) = loaded.result[0]
    assert (row.adapter.info.motion, row.weight) == ("horse running", 0.5)
    shown = loaded.ui.as_dict()["text"][0]
    assert "motion: horse running" in shown and "subject: horse" in shown
    chained = MIVAStack.execute(loaded.result[0], adapter_1=WATERFALL.file_name, weight_1=0.25, enabled_1=False,
                                adapter_2="None").result[0]
    assert [(r.adapter.info.motion, r.weight, r.enabled) for r in chained] == [
        ("horse running", 0.5, True), ("waterfall", 0.25, False)]
    for name in ("../diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors", "/etc/passwd", "a/../../b.safetensors"):
        with pytest.raises(ValueError, match="not a plain name inside models/miva"):
            resolve_model_file(name)
    with pytest.raises(FileNotFoundError, match="missing.safetensors' was not found in .*miva"):
        resolve_model_file("missing.safetensors")
    with pytest.raises(ValueError, match="MIVA Loader: adapter_name 'missing.safetensors' is not a file in .*miva"):
        MIVALoader.execute("missing.safetensors", 1.0)


def test_a_clone_made_while_another_patched_clone_is_loaded_still_replaces_the_cross_attention(model):
    from motion_dials.nodes.patcher_core import CrossAttentionReplacement

    rows = stack((adapter(HORSE), 1.0, True))
    first = apply_stack(model, rows)
    first_video = sample_tiny(CASE, first, STEPS)  # first stays loaded: its replacements sit in the shared modules
    second = apply_stack(model, rows)
    patches = [p for key, p in second.object_patches.items() if key.endswith("cross_attn")]
    assert len(patches) == 2 and not any(isinstance(p.original, CrossAttentionReplacement) for p in patches)
    assert torch.equal(sample_tiny(CASE, second, STEPS), first_video)
    assert not torch.allclose(sample_tiny(CASE, model, STEPS), first_video)
