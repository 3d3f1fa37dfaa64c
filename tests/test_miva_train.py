"""MIVA Train on the tiny Wan 2.1 T2V and the tiny Wan VAE, with tiny synthetic clips written by PyAV."""

import fractions
import json
import os
import subprocess
import sys

import av
import folder_paths
import numpy as np
import pytest
import torch
from host import COMFYUI_PATH, REPO, write_clip
from sampling import load_tiny

from motion_dials.models.miva import Adapter, AdapterInfo, initial_tensors, load_adapter
from motion_dials.models.miva_training import (
    LatentCache,
    Run,
    Schedule,
    noisy_input,
    state_path,
    state_sidecar,
    timestep_weights,
    velocity_loss,
)
from motion_dials.nodes.miva import FOLDER, MIVAApply, MIVALoader, StackRow
from motion_dials.nodes.miva_train import (
    MIVAClips,
    MIVATrain,
    Trainer,
    fit,
    model_forward,
    read_clips,
    train,
    training_mode,
    training_model,
    video_clips,
)
from motion_dials.nodes.patcher_core import held_calls

T2V = "wan2.1_t2v_1.3B_fp16.safetensors"
I2V = "wan2.1_i2v_480p_14B_fp16.safetensors"
SIZE, FRAMES = 32, 5
# The loss test, on 2 latent frames of 4 x 4 (4 tokens a frame). Measured on the tiny random base (evaluation loss
# from 1.17): lr 5e-3, rank 64: 0.71 at 200 steps, 0.51 at 400, 0.40 at 600; rank 32 falls slower (0.68 at 400);
# lr 1e-2 at rank 64 is noisy (1.01 at 100, 0.53 at 500); lr 1e-2 at rank 128 and lr 2e-2 at rank 64 stall near
# 1.05, the loss of a zero prediction.
LR, RANK, TRAIN_STEPS = 5e-3, 64, 400


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("input")
    clips = root / "horse"
    clips.mkdir()
    for i in range(2):
        write_clip(clips / f"clip{i}.mp4", FRAMES + 2, seed=i)
    short = root / "short"
    short.mkdir()
    write_clip(short / "short.mp4", 3, seed=5)
    broken = root / "broken"
    broken.mkdir()
    (broken / "broken.mp4").write_bytes(b"not a video at all")
    previous = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(root))
    yield root
    folder_paths.set_input_directory(previous)


@pytest.fixture
def miva_folder(tmp_path):
    """A models/miva of this test, first in the registry (where MIVA Train writes), removed afterwards."""
    folder = tmp_path / "miva"
    folder.mkdir()
    folder_paths.add_model_folder_path(FOLDER, str(folder), is_default=True)
    yield folder
    folder_paths.folder_names_and_paths[FOLDER][0].remove(str(folder))


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_tiny("wan2.1_t2v")


@pytest.fixture(scope="module")
def vae(tiny_models):
    import nodes

    return nodes.VAELoader().load_vae("wan_2.1_vae.safetensors")[0]


def info_for(model, rank=4, prompt_rank=4):
    dm = model.model.diffusion_model
    return AdapterInfo(base="wan2.1-t2v-1.3b", motion="horse running", subject="horse", dim=dm.dim,
                       heads=dm.num_heads, blocks=len(dm.blocks), query_rank=rank, output_rank=rank,
                       output_bias=False, prompt_rank=prompt_rank, prompt_bias=True, prompt_query_bias=True,
                       mask_stream=False)


def state_of(model) -> dict:
    return {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}


SETTINGS = dict(motion="horse running", subject="horse", frames=FRAMES, width=SIZE, height=SIZE, learning_rate=1e-3,
                cfa_rank=4, prompt_rank=4, seed=3, gradient_checkpointing=False, precision="fp32",
                checkpoint_interval=0, resume=True, overwrite=False)


# MIVA Train's widget values for a run of seconds
NODE_ARGS = dict(clips="horse", motion="horse running", subject="horse", frames=FRAMES, width=SIZE, height=SIZE,
                 steps=2, learning_rate=1e-3, cfa_rank=4, prompt_rank=4, seed=0, gradient_checkpointing=False,
                 precision="fp32", checkpoint_interval=0, resume=True, file_name="bad.safetensors", overwrite=False)


def nonzero_outputs(tensors: dict, seed: int = 9) -> dict:
    """Initial tensors with the zero output parts drawn, so every parameter gets a gradient."""
    generator = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=generator) * 0.05 if not v.abs().sum() else v) for k, v in
            tensors.items()}


def test_schedule_is_the_models_own_and_the_weights_are_diffsynths(model):
    sampling = model.get_model_object("model_sampling")
    schedule = Schedule.of(sampling)
    assert len(schedule.sigmas) == 1000 and float(schedule.sigmas[0]) == 1.0
    assert float(schedule.sigmas[500]) == pytest.approx(float(sampling.percent_to_sigma(0.5)))
    shift = sampling.shift
    s = 0.5
    assert float(schedule.sigmas[500]) == pytest.approx(shift * s / (1 + (shift - 1) * s))  # the model's shift
    t = schedule.timesteps.double()
    expected = torch.exp(-2 * ((t - 500) / 1000) ** 2)
    expected = (expected - expected.min()) / (expected - expected.min()).mean()
    torch.testing.assert_close(schedule.weights.double(), expected, rtol=1e-6, atol=1e-6)
    assert float(timestep_weights(t).mean()) == pytest.approx(1.0)


def test_frame_0_is_clean_in_the_input_and_out_of_the_loss(model):
    sampling = model.get_model_object("model_sampling")
    generator = torch.Generator().manual_seed(0)
    latent, noise = torch.randn(1, 16, 3, 4, 4, generator=generator), torch.randn(1, 16, 3, 4, 4, generator=generator)
    sigma = torch.tensor([0.7])
    x = noisy_input(sampling, sigma, noise, latent)
    assert torch.equal(x[:, :, 0], latent[:, :, 0])
    torch.testing.assert_close(x[:, :, 1:], 0.7 * noise[:, :, 1:] + 0.3 * latent[:, :, 1:])
    prediction = torch.randn(1, 16, 3, 4, 4, generator=generator)
    changed_latent, changed_noise = latent.clone(), noise.clone()
    changed_latent[:, :, 0] += 5.0
    changed_noise[:, :, 0] -= 3.0
    changed_prediction = prediction.clone()
    changed_prediction[:, :, 0] = 100.0
    assert torch.equal(velocity_loss(prediction, noise, latent, 1.0),
                       velocity_loss(changed_prediction, changed_noise, changed_latent, 1.0))
    assert velocity_loss(prediction, noise, latent, 1.0) > 0


def test_training_forward_equals_miva_apply_and_checkpointing_changes_nothing(model):
    """The sampler's call of MIVA Apply's model (ComfyUI's KSampler, CFG 1) and the training call, on one input."""
    import nodes

    info = info_for(model)
    tensors = nonzero_outputs(initial_tensors(info, model.model.diffusion_model, torch.Generator().manual_seed(1)))
    with training_mode():
        trainer = Trainer(training_model(model, None), info, torch.float32, False)
        run = Run.start(tensors, 1e-3, 0, trainer.device)
    adapter_row = StackRow(Adapter.from_tensors("same", info, {k: p.detach().clone() for k, p in run.params.items()}),
                           1.0, True)
    applied = MIVAApply.execute(model, (adapter_row,)).result[0]
    seen = []

    def record(_module, args, kwargs, output):
        seen.append((args[0].clone(), kwargs["transformer_options"]["sigmas"].clone(), output.clone()))

    hook = model.model.diffusion_model.register_forward_hook(record, with_kwargs=True)
    try:
        positive = [[torch.zeros(1, 1, model.model.diffusion_model.text_embedding[0].in_features), {}]]
        latent = {"samples": torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(2))}
        nodes.common_ksampler(applied, 5, 1, 1.0, "euler", "simple", positive, positive, latent, denoise=1.0)
    finally:
        hook.remove()
    (x, sigma, expected), = seen
    results, grads = [], []
    for checkpointing in (False, True):
        with training_mode():
            trainer.checkpointing = checkpointing
            patched = trainer.patched(run.params)
            for p in run.params.values():
                p.grad = None
            with held_calls():
                out = model_forward(patched, x.clone(), sigma.clone(), trainer.context, checkpointing)
                out.pow(2).mean().backward()
        results.append(out.detach())
        grads.append({k: p.grad.clone() for k, p in run.params.items()})
    torch.testing.assert_close(results[0], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(results[0], results[1])
    assert all(float(g.abs().sum()) > 0 for g in grads[0].values() if g.numel() > 1)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_training_moves_only_the_adapter_and_the_loss_falls(model, vae, input_dir, miva_folder):
    before = state_of(model)
    clips = read_clips("horse", FRAMES, SIZE, SIZE)
    info = info_for(model, RANK, RANK)
    with training_mode():
        trainer = Trainer(training_model(model, None), info, torch.float32, False)
        copy_before = state_of(trainer.model)
        cache = LatentCache(clips, FRAMES, lambda p: vae.encode(p))
        schedule = Schedule.of(trainer.model_sampling)
        run = Run.start(initial_tensors(info, model.model.diffusion_model, torch.Generator().manual_seed(0)), LR, 0,
                        trainer.device)
        start = {k: v.detach().clone() for k, v in run.params.items()}
        def evaluate(params) -> float:
            patched = trainer.patched(params)
            generator = torch.Generator().manual_seed(77)
            total = 0.0
            for clip in range(2):
                for index in (300, 600):
                    latent = cache.latent(clip, 0, False)
                    noise = torch.randn(latent.shape, generator=generator)
                    sigma = schedule.sigmas[index:index + 1]
                    x = noisy_input(trainer.model_sampling, sigma, noise, latent)
                    with torch.no_grad(), held_calls():
                        total += float(velocity_loss(model_forward(patched, x, sigma, trainer.context, False), noise,
                                                     latent, 1.0))
            return total / 4

        first = evaluate(run.params)
        for _ in range(TRAIN_STEPS):
            trainer.step(run, cache, schedule)
        last = evaluate(run.params)
    assert last < 0.5 * first, (first, last)
    changed = [k for k in start if not torch.equal(start[k], run.params[k].detach())]
    assert changed, "the adapter trained"
    after = state_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "the loaded model is bit-identical"
    assert all(torch.equal(copy_before[k], v) for k, v in state_of(trainer.model).items()), "the base stays frozen"
    assert all(not p.requires_grad for p in trainer.model.model.diffusion_model.parameters())


def test_two_n_steps_equal_n_steps_checkpoint_and_n_resumed(model, vae, input_dir, miva_folder):
    clips = read_clips("horse", FRAMES, SIZE, SIZE)
    settings = {**SETTINGS, "checkpoint_interval": 3}
    whole, losses_whole = train(model, vae, clips, steps=6, target=miva_folder / "whole.safetensors", **settings)
    half_target = miva_folder / "half.safetensors"
    train(model, vae, clips, steps=3, target=half_target, **settings)
    assert state_path(half_target).exists() and json.loads(
        state_sidecar(state_path(half_target)).read_text())["step"] == 3
    resumed, losses_resumed = train(model, vae, clips, steps=6, target=half_target, **{**settings, "overwrite": False})
    assert losses_whole == losses_resumed
    a, b = load_adapter(miva_folder / "whole.safetensors"), load_adapter(half_target)
    from safetensors.torch import load_file

    ta, tb = load_file(str(miva_folder / "whole.safetensors")), load_file(str(half_target))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.info.details["steps"] == b.info.details["steps"] == "6"


def test_node_saves_an_adapter_the_loader_reads_with_its_metadata(model, vae, input_dir, miva_folder):
    stack, curve = MIVATrain.execute(**{**NODE_ARGS, "model": model, "vae": vae, "steps": 4, "seed": 1,
                                        "gradient_checkpointing": True, "file_name": "trained.safetensors"}).result
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    (row,) = stack
    assert row.adapter.info.details["clips"] == "2" and row.adapter.info.details["resolution"] == f"{SIZE}x{SIZE}"
    out = MIVALoader.execute("trained.safetensors", 1.0, model=model)
    text = out.ui.as_dict()["text"][0]
    for fact in ("motion: horse running", "subject: horse", "steps 4", "clips 2", f"resolution {SIZE}x{SIZE}"):
        assert fact in text, text
    info = load_adapter(miva_folder / "trained.safetensors").info
    assert info.prompt_rank == 4 and info.query_rank == 4 and info.motion == "horse running"


def test_clip_videos_give_the_folders_clips_and_replace_the_folder(model, vae, input_dir, miva_folder):
    """Videos through MIVA Clips (the list core Load Video (from Folder) gives) decode to the folder's clips, and
    MIVA Train trains on them in place of its folder."""
    from comfy_api.latest import InputImpl
    from comfy_api.latest import Types as types

    videos = [InputImpl.VideoFromFile(str(path)) for path in sorted((input_dir / "horse").iterdir())]
    from_videos, from_folder = video_clips(videos, FRAMES, SIZE, SIZE), read_clips("horse", FRAMES, SIZE, SIZE)
    assert [c.name for c in from_videos] == [c.name for c in from_folder] == ["clip0.mp4", "clip1.mp4"]
    for a, b in zip(from_videos, from_folder, strict=True):
        assert a.frames.shape == b.frames.shape == (FRAMES + 2, SIZE, SIZE, 3)
        assert torch.equal(a.frames, b.frames)
    # decoded frame by frame at the training size: the same as the whole clip decoded, then scaled
    with av.open(str(input_dir / "horse" / "clip0.mp4")) as container:
        full = torch.from_numpy(np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]))
    assert torch.equal(read_clips("horse", FRAMES, SIZE // 2, SIZE // 4)[0].frames,
                       fit(full.float() / 255.0, SIZE // 2, SIZE // 4))
    # a video made of frames (Create Video) is taken as the host gives its frames, at the training size
    made = InputImpl.VideoFromComponents(types.VideoComponents(images=from_folder[0].frames.flip(2),
                                                                frame_rate=fractions.Fraction(8)))
    (clip,) = video_clips([made], FRAMES, SIZE // 2, SIZE // 2)
    assert clip.name == "video 1" and clip.frames.shape == (FRAMES + 2, SIZE // 2, SIZE // 2, 3)
    torch.testing.assert_close(clip.frames, torch.nn.functional.avg_pool2d(
        from_folder[0].frames.flip(2).movedim(-1, 1), 2).movedim(1, -1), rtol=0, atol=0.02)

    (clip_videos,) = (out := MIVAClips.execute(videos=videos)).result
    assert out.ui["text"] == ("2 clips: clip0.mp4, clip1.mp4",)
    # the folder named in clips holds a too-short clip: connected videos replace it
    (row,), _ = MIVATrain.execute(**{**NODE_ARGS, "model": model, "vae": vae, "clips": "short",
                                     "clip_videos": clip_videos, "file_name": "videos.safetensors"}).result
    assert row.adapter.info.details["clips"] == "2"
    assert load_adapter(miva_folder / "videos.safetensors").info.details["clip_names"] == "clip0.mp4,clip1.mp4"
    assert MIVATrain.validate_inputs(**{**NODE_ARGS, "clips": "no such folder", "clip_videos": None}) is True
    assert "clips 'no such folder' is not one of its choices" in MIVATrain.validate_inputs(
        **{**NODE_ARGS, "clips": "no such folder"})
    (short,) = MIVAClips.execute(videos=[InputImpl.VideoFromFile(str(input_dir / "short" / "short.mp4"))]).result
    with pytest.raises(ValueError, match=r"MIVA Train: the clip short\.mp4 has 3 frames, fewer than frames \(5\)"):
        MIVATrain.execute(**{**NODE_ARGS, "model": model, "vae": vae, "clip_videos": short,
                             "file_name": "short.safetensors"})
    assert not (miva_folder / "short.safetensors").exists()
    with pytest.raises(ValueError, match=r"MIVA Clips: videos item 1 is a Tensor, not a VIDEO"):
        MIVAClips.execute(videos=[torch.zeros(1, 8, 8, 3)])


@pytest.mark.parametrize("case, pattern", [
    ("short clip", r"MIVA Train: the clip short\.mp4 has 3 frames, fewer than frames \(5\)"),
    ("unreadable video", r"MIVA Train: the clip broken\.mp4 cannot be read as a video"),
    ("image-to-video model", r"MIVA Train: model is a Wan image-to-video variant"),
    ("resolution", r"MIVA Train: the resolution 40 x 32 does not fit the Wan VAE"),
    ("frames", r"frames is 6; the Wan VAE takes 4k \+ 1 frames"),
    ("existing output", r"MIVA Train: exists\.safetensors already exists"),
    ("not a video model", r"MIVA Train: model must be a Wan 2.1 T2V model"),
])
def test_bad_inputs_fail_before_training_with_the_reason(model, vae, input_dir, miva_folder, monkeypatch, case,
                                                         pattern):
    import nodes

    started = []
    monkeypatch.setattr(Run, "train_step", lambda *a, **k: started.append(1))
    args = dict(NODE_ARGS, model=model, vae=vae)
    if case == "short clip":
        args["clips"] = "short"
    elif case == "unreadable video":
        args["clips"] = "broken"
    elif case == "image-to-video model":
        args["model"] = nodes.UNETLoader().load_unet(I2V, "default")[0]
    elif case == "resolution":
        args["width"] = 40
    elif case == "frames":
        args["frames"] = 6
    elif case == "existing output":
        (miva_folder / "exists.safetensors").write_bytes(b"x")
        args["file_name"] = "exists.safetensors"
    elif case == "not a video model":
        args["model"] = nodes.UNETLoader().load_unet("hunyuan_video_t2v_720p_bf16.safetensors", "default")[0]
    with pytest.raises((ValueError, FileExistsError), match=pattern):
        MIVATrain.execute(**args)
    assert not started
    assert not (miva_folder / "bad.safetensors").exists()


# --- the command: python <pack>/nodes/miva_train.py (or -m motion_dials.nodes.miva_train) ----------------------------

def run_command(tmp_path, tiny_models, *args):
    """The command in a fresh process on the tiny models, ComfyUI given by --comfyui, models/miva in tmp_path."""
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(f"tiny:\n    base_path: {tiny_models}\n    diffusion_models: diffusion_models\n    vae: vae\n"
                      f"output:\n    base_path: {tmp_path}\n    is_default: true\n    miva: miva\n")
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    command = [sys.executable, str(REPO / "nodes" / "miva_train.py"), "--comfyui", str(COMFYUI_PATH),
               "--extra-model-paths-config", str(config), *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


COMMAND = ("--model", T2V, "--vae", "wan_2.1_vae.safetensors", "--motion", "horse running", "--subject", "horse",
           "--steps", "2", "--frames", str(FRAMES), "--width", str(SIZE), "--height", str(SIZE), "--cfa-rank", "4",
           "--prompt-rank", "4", "--learning-rate", "1e-3", "--seed", "3", "--checkpoint-interval", "0")


def test_command_trains_and_saves_an_adapter_that_loads(tmp_path, tiny_models):
    clips = tmp_path / "my clips"
    clips.mkdir()
    for i in range(2):
        write_clip(clips / f"clip{i}.mp4", FRAMES + 2, seed=i)
    done = run_command(tmp_path, tiny_models, *COMMAND, "--clips", str(clips), "--file-name", "cli.safetensors")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert any(line.startswith("step 1/2, loss ") and line.endswith(" left") for line in lines), done.stdout
    assert any(line.startswith("step 2/2, loss ") for line in lines), done.stdout
    target = tmp_path / "miva" / "cli.safetensors"
    assert lines[-1] == str(target)
    info = load_adapter(target).info
    assert info.motion == "horse running" and info.subject == "horse" and info.prompt_rank == 4
    assert info.details["steps"] == "2" and info.details["clips"] == "2"
    assert info.details["resolution"] == f"{SIZE}x{SIZE}"


@pytest.mark.parametrize("case, pattern", [
    ("missing clips", r"MIVA Train: clips '.*nowhere' is not a folder"),
    ("image-to-video model", r"MIVA Train: model is a Wan image-to-video variant"),
])
def test_command_bad_input_exits_2_with_the_nodes_message(tmp_path, tiny_models, case, pattern):
    import re

    clips = tmp_path / "clips"
    clips.mkdir()
    write_clip(clips / "clip.mp4", FRAMES + 2, seed=0)
    args = [*COMMAND, "--clips", str(tmp_path / "nowhere" if case == "missing clips" else clips)]
    if case == "image-to-video model":
        args[1] = I2V
    done = run_command(tmp_path, tiny_models, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert re.search(pattern, done.stderr), done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "miva").exists() or not any((tmp_path / "miva").iterdir())
