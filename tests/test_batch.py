"""motion-dials-batch (`python -m batch`) against two real ComfyUI servers on loopback, with the tiny models."""

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from host import REPO, Server
from PIL import Image
from test_server import node_of, tiny_workflow
from tiny_graph import shrink_api
from workflow_formats import api_to_ui


def batch_module(name: str):
    """A module of the batch package, imported from the repo (its root is kept off sys.path for the host)."""
    if "batch" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "batch", REPO / "batch" / "__init__.py", submodule_search_locations=[str(REPO / "batch")])
        sys.modules["batch"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["batch"])
    return importlib.import_module(f"batch.{name}")


@pytest.fixture(scope="module")
def servers(tiny_models):
    pair = [Server(), Server()]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(Server.start, pair))
        for server in pair:
            server.upload_image(REPO / "workflows" / "example.png")  # what the workflow loads without --images
        yield pair
    finally:
        for server in pair:
            server.stop()


@pytest.fixture(scope="module")
def workflow_file(tmp_path_factory):
    # Even smaller than the server tests' graph: a prompt takes a few seconds with two servers on two cores.
    path = tmp_path_factory.mktemp("workflow") / "tiny.api.json"
    path.write_text(json.dumps(shrink_api(tiny_workflow("dymos_wan21_i2v"), size=32, length=5, steps=2)))
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    shutil.copyfile(REPO / "workflows" / "example.png", folder / "example.png")
    return folder


def run_batch(*args, output, servers) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "batch", *map(str, args), "--output", str(output)]
    command += [part for server in servers for part in ("--server", server.url)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)


def manifest_jobs(output) -> list[dict]:
    return json.loads((output / "manifest.json").read_text())["jobs"]


def history_size(servers) -> int:
    return sum(len(server.get_json("/history")) for server in servers)


SWEEP = ("--set", "DyMoS Motion Slider.strength=0,1", "--set", "12.seed=range(0,2)")


@pytest.fixture(scope="module")
def first_batch(servers, workflow_file, image_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("batch")
    args = (workflow_file, *SWEEP, "--images", image_folder, "--image-node", "Start image")
    return args, output, run_batch(*args, output=output, servers=servers)


def test_a_sweep_is_spread_over_both_servers_and_collected(first_batch, servers):
    _, output, finished = first_batch
    assert finished.returncode == 0, finished.stderr
    jobs = manifest_jobs(output)
    assert sorted((job["parameters"]["DyMoS Motion Slider.strength"], job["parameters"]["12.seed"]) for job in jobs) \
        == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {job["status"] for job in jobs} == {"done"}
    assert {job["server"] for job in jobs} == {server.url for server in servers}, "each server ran some jobs"
    assert all(job["parameters"]["Start image.image"] == "example.png" for job in jobs)
    for job in jobs:
        (saved,) = job["files"]
        with Image.open(output / saved) as video:
            assert video.format == "WEBP" and video.n_frames == 5
    with Image.open(output / "contact_sheet.png") as sheet:
        assert sheet.width >= 2 * 256 and sheet.height >= 2 * 256  # a 2 x 2 grid of 256 px cells
    assert "DyMoS Motion Slider.strength=1" in (output / "index.html").read_text()
    uploaded = [path for server in servers for path in (server.workdir / "input" / "motion_dials_batch").iterdir()]
    assert len(uploaded) == 2 and all(path.read_bytes() == (REPO / "workflows/example.png").read_bytes()
                                      for path in uploaded), "the image reached both servers by /upload/image"


def test_a_rerun_skips_the_jobs_the_manifest_shows_done(first_batch, servers):
    args, output, _ = first_batch
    queued_before = history_size(servers)
    rerun = run_batch(*args, output=output, servers=servers)
    assert rerun.returncode == 0, rerun.stderr
    assert "4 of 4 jobs already done" in rerun.stdout
    assert history_size(servers) == queued_before, "nothing was queued again"


def test_a_validation_error_names_node_class_input_and_reason_and_the_batch_goes_on(first_batch, servers):
    args, output, _ = first_batch
    workflow, *_ = args
    rejected = run_batch(workflow, "--set", "DyMoS Motion Slider.strength=10,0", "--set", "12.seed=7",
                         output=output, servers=servers)
    assert rejected.returncode == 1
    slider = node_of(json.loads(workflow.read_text()), "DyMoSMotionSlider")
    assert f"node {slider} (DyMoSMotionSlider) input 'strength':" in rejected.stderr
    assert "strength is 10, outside its range" in rejected.stderr
    by_strength = {job["parameters"]["DyMoS Motion Slider.strength"]: job for job in manifest_jobs(output)
                   if job["parameters"].get("12.seed") == 7}
    assert by_strength[10]["status"] == "failed" and "strength is 10, outside its range" in by_strength[10]["error"]
    assert by_strength[0]["status"] == "done" and by_strength[0]["files"], "the other job still ran"


def test_a_server_that_drops_out_hands_its_unfinished_jobs_to_the_other(servers, workflow_file, tmp_path):
    survivor = servers[0]
    with Server() as victim:
        victim.upload_image(REPO / "workflows" / "example.png")
        output = tmp_path / "batch"
        command = [sys.executable, "-m", "batch", str(workflow_file), "--set", "12.seed=range(100,106)",
                   "--output", str(output), "--server", victim.url, "--server", survivor.url]
        batch = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not any(job.get("server") == victim.url and job["status"] == "done"
                      for job in (manifest_jobs(output) if (output / "manifest.json").exists() else [])):
            assert batch.poll() is None and time.monotonic() < deadline, "the victim never finished a job"
            time.sleep(0.1)
        victim.process.kill()  # a server gone without notice, with a prompt of the batch still on it
        stdout, stderr = batch.communicate(timeout=180)
    assert batch.returncode == 0, stderr
    assert f"lost {victim.url}" in stderr
    jobs = manifest_jobs(output)
    assert len(jobs) == 6 and {job["status"] for job in jobs} == {"done"}
    assert any(job["server"] == victim.url for job in jobs)
    moved = [job for job in jobs if victim.url in job.get("lost_on", [])]
    assert moved and all(job["server"] == survivor.url for job in moved), "the lost prompts finished elsewhere"


def test_a_ui_format_workflow_converts_to_the_same_api_prompt(servers, workflow_file):
    workflow = batch_module("workflow")
    api = json.loads(workflow_file.read_text())
    object_info = servers[0].get_json("/object_info")
    ui = api_to_ui(api, object_info)
    assert workflow.is_ui_format(ui) and not workflow.is_ui_format(api)
    assert workflow.ui_to_api(ui, object_info) == api

    # Bypassing the slider hands the sampler the slider's own input model; a muted node is left out.
    slider, sampler = node_of(api, "DyMoSMotionSlider"), node_of(api, "KSampler")
    ui_nodes = {str(node["id"]): node for node in ui["nodes"]}
    ui_nodes[slider]["mode"] = workflow.MODE_BYPASSED
    ui_nodes[node_of(api, "SaveAnimatedWEBP")]["mode"] = workflow.MODE_MUTED
    converted = workflow.ui_to_api(ui, object_info)
    assert slider not in converted and node_of(api, "SaveAnimatedWEBP") not in converted
    assert converted[sampler]["inputs"]["model"] == api[slider]["inputs"]["model"]
