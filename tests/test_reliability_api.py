"""Bad values through the API: every widget value of every pack node is checked at /prompt, the same on each host,
with a message naming the node, the input and the fix; values that would cost without bound are refused cheaply.

Part one asks each node's own check for every input of its schema (so a node added later is covered too); part two
sends the probe's cases to a real ComfyUI server and expects them refused at /prompt, before anything runs.
"""

import json
import logging
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from comfy_api.latest import io
from host import REPO, Server
from sampling import conditioning, load_tiny, sample_tiny
from server_client import PromptRejected, queue_prompt
from test_server import node_of, tiny_workflow

from motion_dials.nodes import NODES
from motion_dials.nodes.diagnostics import AttentionInspector
from motion_dials.nodes.dymos import DyMoSMotionSlider
from motion_dials.nodes.image_to_video import MIVAImageToVideoLatent
from motion_dials.nodes.input_checks import title_of
from motion_dials.nodes.motion_score import MotionScore
from motion_dials.nodes.subject_mask import SubjectMask

NON_NUMBERS = [float("nan"), float("inf"), float("-inf")]


def schema_inputs(kind):
    return [pytest.param(cls, spec, id=f"{cls.define_schema().node_id}.{spec.id}")
            for cls in NODES for spec in cls.define_schema().inputs if isinstance(spec, kind)]


def title(cls) -> str:
    return title_of(cls.define_schema())


def test_every_node_accepts_its_own_defaults(tiny_models):
    for cls in NODES:
        defaults = {spec.id: spec.default for spec in cls.define_schema().inputs
                    if getattr(spec, "default", None) is not None}
        assert cls.validate_inputs(**defaults) is True, cls


@pytest.mark.parametrize("cls,spec", schema_inputs(io.Float.Input))
def test_every_float_input_refuses_nan_and_infinity(cls, spec, tiny_models):
    for value in NON_NUMBERS:
        problem = cls.validate_inputs(**{spec.id: value})
        assert isinstance(problem, str) and problem.startswith(f"{title(cls)}: {spec.id} is "), problem
        assert ("NaN" in problem) if math.isnan(value) else ("infinity" in problem), problem
        assert "set a number" in problem
        with pytest.raises(ValueError, match=f"{spec.id} is"):
            cls.check_inputs(**{spec.id: value})  # the same check for a value that arrives through a link


@pytest.mark.parametrize("cls,spec", schema_inputs((io.Float.Input, io.Int.Input)))
def test_every_number_input_refuses_values_outside_its_range(cls, spec, tiny_models):
    for bound, step in ((spec.min, -1), (spec.max, 1)):
        if bound is not None:
            problem = cls.validate_inputs(**{spec.id: bound + step})
            assert f"{title(cls)}: {spec.id} is" in problem and "outside its range" in problem, problem
    assert "not a number" in cls.validate_inputs(**{spec.id: "1"})


@pytest.mark.parametrize("cls,spec", schema_inputs(io.Combo.Input))
def test_every_combo_input_refuses_unknown_choices(cls, spec, tiny_models):
    for value in ("no such choice", 5, "missing.safetensors"):
        problem = cls.validate_inputs(**{spec.id: value})
        assert isinstance(problem, str) and problem.startswith(f"{title(cls)}: {spec.id} {value!r} "), problem


@pytest.mark.parametrize("cls,spec", schema_inputs(io.Boolean.Input))
def test_every_boolean_input_takes_real_booleans_only(cls, spec, tiny_models):
    assert cls.validate_inputs(**{spec.id: False}) is True
    for value in ("false", "true", 0, 1):
        assert "takes true or false" in cls.validate_inputs(**{spec.id: value})


def file_inputs():
    return [pytest.param(cls, name, folder, id=f"{cls.define_schema().node_id}.{name}")
            for cls in NODES for name, folder in cls.model_file_inputs.items()]


@pytest.fixture
def linked_out(tiny_models, tmp_path):
    """A link in each pack model folder to a file outside it; removed afterwards."""
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"not a model")
    links = []
    for folder in ("miva", "grounding-dino", "sam2"):
        link = tiny_models / folder / "linked_out.safetensors"
        link.symlink_to(outside)
        links.append(link)
    yield links[0].name
    for link in links:
        link.unlink()


@pytest.mark.parametrize("cls,name,folder", file_inputs())
def test_model_file_inputs_take_only_files_inside_their_folders(cls, name, folder, linked_out, tiny_models):
    for value, phrase in (("../diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors", "no '..'"),
                          ("/etc/passwd", "no absolute path"), ("missing.safetensors", "is not a file in"),
                          (linked_out, "outside the"), (7, "not a file name")):
        problem = cls.validate_inputs(**{name: value})
        assert isinstance(problem, str) and f"{title(cls)}: {name} {value!r}" in problem and phrase in problem, \
            problem


# ------------------------------------------------------------------------------- cost bounded before any work

BLOW_UPS = r"""
import json, resource, sys, time
sys.path.insert(0, "tests")
from host import import_host
import_host()
import torch
from safetensors.torch import save_file
from motion_dials.models.miva import AdapterFormatError, convert_authors_layout, load_adapter
from motion_dials.nodes.diagnostics import parse_indices
from tiny_models import ADAPTERS, adapter_info, random_adapter_tensors

info = adapter_info(ADAPTERS[0])
tensors = random_adapter_tensors(info, 3)
folder = sys.argv[1]
for name, blocks in (("billion", str(10**9)), ("range", "0-10000000")):
    save_file(tensors, f"{folder}/{name}.safetensors", metadata=dict(info.to_metadata(), blocks=blocks))
cases = {
    "metadata blocks=10**9": lambda: load_adapter(f"{folder}/billion.safetensors"),
    "metadata blocks='0-10000000'": lambda: load_adapter(f"{folder}/range.safetensors"),
    "training output block 10**9": lambda: convert_authors_layout(
        {"blocks.1000000000.self_attn.i2v_adapter.q.down.weight": torch.zeros(2, 8)}, base="wan2.1-t2v-1.3b",
        motion="m", subject="s", heads=2),
    "inspector blocks '0-10000000'": lambda: parse_indices("0-10000000", "blocks", 30),
    "inspector heads '0-10000000'": lambda: parse_indices("0, 5-10000000", "heads", 12),
}
for name, case in cases.items():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        case()
        message = "ACCEPTED"
    except (AdapterFormatError, ValueError) as error:
        message = str(error)
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"case": name, "seconds": seconds, "grown_kib": grown, "message": message}))
"""


def test_declared_sizes_and_ranges_are_refused_before_anything_is_allocated(tiny_models, tmp_path):
    # In a fresh process, so the peak memory before each case is that of the imports, not of earlier tests.
    result = subprocess.run([sys.executable, "-c", BLOW_UPS, str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=os.environ)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = {line["case"]: line for line in map(json.loads, result.stdout.splitlines())}
    assert len(outcomes) == 5, outcomes
    expected = {"metadata blocks=10**9": "declares 1000000000 blocks",
                "metadata blocks='0-10000000'": "malformed metadata",
                "training output block 10**9": "with gaps",
                "inspector blocks '0-10000000'": "blocks 10000000 does not exist: the model has 30",
                "inspector heads '0-10000000'": "heads 10000000 does not exist: the model has 12"}
    for name, phrase in expected.items():
        outcome = outcomes[name]
        assert phrase in outcome["message"], outcome
        assert outcome["seconds"] < 0.1, outcome
        assert outcome["grown_kib"] < 4 * 1024, outcome  # no allocation above a few MB


# ------------------------------------------------------------------------------- values known only at run time


def test_dymos_warns_when_reference_frames_leave_no_generated_frame(tiny_models, caplog):
    model = load_tiny("wan2.1_i2v")
    frames = conditioning("wan2.1_i2v")[2]["samples"].shape[2]
    patched = DyMoSMotionSlider.execute(model, 2.0, 1.0, "uniform", frames).result[0]
    with caplog.at_level(logging.WARNING, logger="motion_dials"):
        result = sample_tiny("wan2.1_i2v", patched, 2)
    assert f"reference_frames is {frames}, but the latent has {frames} latent frames" in caplog.text
    assert torch.equal(result, sample_tiny("wan2.1_i2v", model, 2)), "the slider indeed did nothing"


def test_attention_inspector_checks_heads_against_the_model_before_sampling(tiny_models, monkeypatch):
    import motion_dials.nodes.diagnostics as diagnostics

    monkeypatch.setattr(diagnostics, "sample_with_probe", lambda *args: pytest.fail("sampling started"))
    model = load_tiny("wan2.1_i2v")
    heads = model.get_model_object("diffusion_model").num_heads
    positive, negative, latent = conditioning("wan2.1_i2v")
    with pytest.raises(ValueError, match=f"heads {heads} does not exist: the model has {heads}"):
        AttentionInspector.execute(model, positive, negative, latent, 0, 4, 2.0, "euler", "simple", 1, 0.1, "all",
                                   f"0-{heads}")


IMAGE_NODES = {
    "Subject Mask": lambda image: SubjectMask.execute(image, None, None, "horse", 0.3, 0.25, "best box"),
    "MIVA Image To Video Latent": lambda image: MIVAImageToVideoLatent.execute(None, image, 64, 64, 5, 1),
    "Motion Score": lambda image: MotionScore.execute(image),
}


@pytest.mark.parametrize("node", IMAGE_NODES)
@pytest.mark.parametrize("image,phrase", [
    (torch.zeros(0, 32, 32, 3), "is an empty IMAGE batch"),
    (torch.zeros(32, 32, 3), "must be an IMAGE [batch, height, width, 3]; it got a tensor of shape [32, 32, 3]"),
    (torch.zeros(1, 32, 32, 2), "must be an IMAGE"),
], ids=["empty batch", "[H, W, 3]", "two channels"])
def test_image_inputs_that_are_no_image_batch_are_named(tiny_models, node, image, phrase):
    with pytest.raises(ValueError) as error:
        IMAGE_NODES[node](image)
    assert str(error.value).startswith(f"{node}: ") and phrase in str(error.value), error.value


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve a name or to connect a socket anywhere but loopback, recorded and refused."""
    attempts = []

    def refuse(what):
        def guard(*args, **kwargs):
            attempts.append((what, args[1:] if what == "connect" else args[:1]))
            raise OSError(f"network refused by the test: {what} {args[1:] or args}")
        return guard

    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family == socket.AF_UNIX or (isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1")):
            return real_connect(sock, address)
        return refuse("connect")(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return attempts


def test_the_nodes_open_no_network_connection(tiny_models, no_network):
    from tiny_models import ADAPTERS
    from tiny_segmenters import GROUNDING_DINO_FILE, SAM2_PT_FILE

    import motion_dials.nodes.subject_mask as subject_mask
    from motion_dials.nodes.edg import EDGMerge
    from motion_dials.nodes.miva import MIVAApply, MIVALoader, _load_cached

    for cache in (subject_mask._load_dino, subject_mask._load_sam2, _load_cached):
        cache.cache_clear()  # so the files are read here, under the guard
    dino = subject_mask.GroundingDINOLoader.execute(GROUNDING_DINO_FILE, "cpu", "fp32").result[0]
    sam = subject_mask.SAM2Loader.execute(SAM2_PT_FILE, "cpu", "fp32").result[0]
    mask = SubjectMask.execute(torch.rand(1, 40, 56, 3), dino, sam, "horse", 0.0, 0.25, "best box").result[0]
    model = load_tiny("wan2.1_i2v")
    stack = MIVALoader.execute(ADAPTERS[0].file_name, 1.0, None, None, mask).result[0]
    patched = DyMoSMotionSlider.execute(MIVAApply.execute(load_tiny("wan2.1_t2v"), stack).result[0], 1.0, 1.0,
                                        "uniform", 1).result[0]
    sample_tiny("wan2.1_t2v", patched, 1)
    merged = EDGMerge.execute(model, load_tiny("wan2.1_i2v"), 0.25, 0.75, 1.0, 0.25, 0.7, 0)
    sample_tiny("wan2.1_i2v", merged.result[0], 1)
    assert no_network == []


# ----------------------------------------------------------------------------------- through a real server


@pytest.fixture(scope="module")
def server(tiny_models):
    with Server() as running:
        running.upload_image(REPO / "workflows" / "example.png")
        yield running


def with_inspector(workflow: dict) -> dict:
    """The workflow with an Attention Inspector wired like its KSampler, after the DyMoS slider, as its only output
    (ComfyUI runs the valid outputs of a prompt and only reports the invalid ones)."""
    del workflow[node_of(workflow, "SaveAnimatedWEBP")]
    sampler = workflow[node_of(workflow, "KSampler")]["inputs"]
    workflow["900"] = {"class_type": "MotionDialsAttentionInspector", "inputs": {
        **{key: sampler[key] for key in ("positive", "negative", "latent_image", "seed", "steps", "cfg",
                                         "sampler_name", "scheduler")},
        "model": [node_of(workflow, "DyMoSMotionSlider"), 0], "reference_frames": 1, "fraction": 0.1,
        "blocks": "all", "heads": "all"}}
    return workflow


# (workflow, node class, input, value, phrase the refusal must hold)
API_CASES = [
    ("dymos_wan21_i2v", "DyMoSMotionSlider", "strength", float("nan"), "strength is NaN"),
    ("dymos_wan21_i2v", "DyMoSMotionSlider", "strength", 10.0, "strength is 10, outside its range"),
    ("dymos_wan21_i2v", "DyMoSMotionSlider", "tau", float("inf"), "tau is infinity"),
    ("dymos_wan21_i2v", "DyMoSMotionSlider", "tau", -0.1, "tau is -0.1, outside its range"),
    ("dymos_wan21_i2v", "DyMoSMotionSlider", "frame_schedule", "cubic", "'cubic' is not one of its choices"),
    ("dymos_wan21_i2v", "DyMoSMotionSlider", "reference_frames", 0, "reference_frames is 0, outside its range"),
    ("edg_switch_wan22_i2v", "EDGTimestepSwitch", "boundary", float("nan"), "boundary is NaN"),
    ("edg_switch_wan22_i2v", "EDGTimestepSwitch", "mode", "soft", "'soft' is not one of its choices"),
    ("edg_switch_wan22_i2v", "EDGTimestepSwitch", "window", float("-inf"), "window is minus infinity"),
    ("miva_wan21_one_adapter", "MIVALoader", "weight", float("nan"), "weight is NaN"),
    ("miva_wan21_one_adapter", "MIVALoader", "adapter_name", 5, "adapter_name 5 is not a file name"),
    ("miva_wan21_one_adapter", "MIVALoader", "adapter_name", "../vae/x.safetensors", "no '..'"),
    ("miva_wan21_one_adapter", "MIVALoader", "adapter_name", "/etc/passwd", "no absolute path"),
    ("miva_wan21_one_adapter", "MIVALoader", "adapter_name", "linked_out.safetensors", "outside the 'miva'"),
    ("miva_wan21_one_adapter", "MIVANoise", "cutoff", float("nan"), "cutoff is NaN"),
    ("miva_wan21_one_adapter", "MIVANoise", "shared_noise", float("inf"), "shared_noise is infinity"),
    ("miva_wan21_one_adapter", "MIVANoise", "dct_init", "false", "dct_init is 'false'; it takes true or false"),
    ("miva_wan21_two_adapters", "MIVAStack", "weight_1", float("nan"), "weight_1 is NaN"),
    ("miva_wan21_two_adapters", "MIVAStack", "enabled_1", "false", "enabled_1 is 'false'; it takes true or false"),
    ("miva_wan21_two_adapters", "MIVAStack", "enabled_2", 0, "enabled_2 is 0; it takes true or false"),
    ("miva_wan21_two_adapters", "MIVAStack", "adapter_2", "nope.safetensors", "'nope.safetensors' is not a file"),
    ("mmiva_wan21_one_subject", "MotionDialsSubjectMask", "box_threshold", float("nan"), "box_threshold is NaN"),
    ("mmiva_wan21_one_subject", "MotionDialsSubjectMask", "mode", "all", "'all' is not one of its choices"),
    ("mmiva_wan21_one_subject", "MotionDialsSAM2Loader", "device", "tpu", "'tpu' is not one of its choices"),
    ("mmiva_wan21_one_subject", "MotionDialsSAM2Loader", "precision", "fp64", "'fp64' is not one of its choices"),
    ("mmiva_wan21_one_subject", "MotionDialsGroundingDINOLoader", "model_name", "../../x.pth", "no '..'"),
    ("inspector", "MotionDialsAttentionInspector", "fraction", float("nan"), "fraction is NaN"),
    ("inspector", "MotionDialsAttentionInspector", "blocks", "0-x", "blocks must be 'all' or a list"),
    ("inspector", "MotionDialsAttentionInspector", "heads", "7-3", "runs backwards"),
    ("inspector", "MotionDialsAttentionInspector", "sampler_name", "warp", "'warp' is not one of its choices"),
]


@pytest.mark.parametrize("name,class_type,field,value,phrase", API_CASES,
                         ids=[f"{case[1]}.{case[2]}={case[3]!r}" for case in API_CASES])
def test_bad_values_are_refused_at_prompt_naming_node_and_input(server, linked_out, name, class_type, field, value,
                                                                 phrase):
    workflow = with_inspector(tiny_workflow("dymos_wan21_i2v")) if name == "inspector" else tiny_workflow(name)
    node_id = node_of(workflow, class_type)
    workflow[node_id]["inputs"][field] = value
    history_before = server.get_json("/history")
    with pytest.raises(PromptRejected) as rejected:
        queue_prompt(server, workflow, "reliability")
    errors = rejected.value.body["node_errors"][node_id]["errors"]
    texts = [f"{error['message']}: {error['details']}" for error in errors]
    assert any(phrase in text for text in texts), texts
    assert any(field in text for text in texts if phrase in text), texts
    assert server.get_json("/history") == history_before, "nothing ran"


def test_the_same_workflows_pass_with_good_values(server, linked_out):
    workflows = [tiny_workflow(name) for name in ("dymos_wan21_i2v", "edg_switch_wan22_i2v", "miva_wan21_one_adapter",
                                                  "miva_wan21_two_adapters", "mmiva_wan21_one_subject")]
    workflows.append(with_inspector(tiny_workflow("dymos_wan21_i2v")))
    off = tiny_workflow("miva_wan21_two_adapters")
    off[node_of(off, "MIVAStack")]["inputs"]["enabled_1"] = False
    workflows.append(off)
    try:
        for workflow in workflows:
            assert queue_prompt(server, workflow, "reliability")  # accepted: a prompt id, no 400
    finally:
        server.post_json("/queue", {"clear": True})
        server.post_json("/interrupt", {})
