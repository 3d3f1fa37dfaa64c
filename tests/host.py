"""The ComfyUI host, for tests, the demo and the benchmarks: in-process or as a real server.

ComfyUI's top-level modules (``nodes``, ``utils``, ``tests``) share names with
folders of this repo, so the host goes first on ``sys.path``, the repo root
comes off it, and the pack is imported as the package ``motion_dials``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `make` sets all three for the host it runs on; the defaults are the environment `make setup` prepares first.
HOST_NAME = os.environ.get("MOTION_DIALS_HOST", "033")
COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH", REPO / ".host" / HOST_NAME / "ComfyUI")).resolve()
TINY_MODELS = Path(os.environ.get("MOTION_DIALS_TINY_MODELS", REPO / ".host" / HOST_NAME / "tiny_models")).resolve()
FIXTURE_NODES = REPO / "tests" / "host_fixture"
PACK_NAME = "motion_dials"


def import_host():
    """Make ComfyUI importable in this process and import the pack as ``motion_dials``."""
    if not (COMFYUI_PATH / "main.py").exists():
        raise RuntimeError(f"No ComfyUI at {COMFYUI_PATH}: run `make setup` or set COMFYUI_PATH.")
    repo_entries = {str(REPO), "", "."}
    sys.path[:] = [p for p in sys.path if p not in repo_entries and Path(p or ".").resolve() != REPO]
    if str(COMFYUI_PATH) not in sys.path:
        sys.path.insert(0, str(COMFYUI_PATH))
    import comfy.cli_args
    import torch

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # what `main.py --cpu` sets; read when model_management is imported
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_NAME]


def register_tiny_models():
    """Point ComfyUI's model folders at the generated tiny models (in this process)."""
    import folder_paths

    for kind in ("diffusion_models", "vae", "text_encoders", "clip_vision", "miva", "grounding-dino", "sam2",
                 "bert-base-uncased"):
        folder = TINY_MODELS / kind
        if folder.is_dir():
            folder_paths.add_model_folder_path(kind, str(folder), is_default=True)


def write_extra_model_paths(directory: Path, miva_output: Path | None = None) -> Path:
    """An extra_model_paths.yaml that adds the tiny models and the test-fixture node to a server; with
    ``miva_output``, that folder first among the ``miva`` folders (where MIVA Train writes), so that a server's
    training never writes into the shared tiny models."""
    config = directory / "extra_model_paths.yaml"
    outputs = ("motion_dials_test_outputs:\n"
               "    is_default: true\n"
               f"    miva: {miva_output}\n") if miva_output is not None else ""
    config.write_text(
        "motion_dials_tests:\n"
        f"    base_path: {TINY_MODELS}\n"
        "    diffusion_models: diffusion_models\n"
        "    vae: vae\n"
        "    miva: miva\n"
        "    grounding-dino: grounding-dino\n"
        "    sam2: sam2\n"
        "    bert-base-uncased: bert-base-uncased\n"
        f"    custom_nodes: {FIXTURE_NODES}\n"
        + outputs
    )
    return config


def write_clip(path: Path, frames: int, seed: int, size: int = 32) -> Path:
    """A moving square on a coloured background, as an H.264 mp4 of ``frames`` frames (PyAV)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    colour, background = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for f in range(frames):
            image = np.empty((size, size, 3), np.uint8)
            image[:] = background
            x = (3 * f) % (size - 8)
            image[8:16, x:x + 8] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# MIVA Train's settings for a run of seconds on the tiny models (the shipped workflow keeps the user's: 8000 steps
# at 832 x 480, 17 frames); the clips of Server.write_clips fit them.
TINY_TRAINING = {"steps": 2, "width": 32, "height": 32, "frames": 5, "cfa_rank": 4, "prompt_rank": 4,
                 "checkpoint_interval": 0, "precision": "fp32"}


def tiny_training(workflow: dict, file_name: str, clips: str | None = None) -> dict:
    """An API workflow with its MIVA Train nodes set to TINY_TRAINING, writing ``file_name`` (a fresh run)."""
    for node in workflow.values():
        if node["class_type"] == "MIVATrain":
            node["inputs"].update(TINY_TRAINING, file_name=file_name, resume=False, overwrite=True)
            if clips is not None:
                node["inputs"]["clips"] = clips
    return workflow


def clips_as_videos(workflow: dict, server: Server, folder: str) -> tuple[list[str], str]:
    """An API workflow whose MIVA Train takes its clips from core video loaders through MIVA Clips (two nodes added
    under the next free numeric ids) rather than its folder, which is set to a name that is none: the list of Load
    Video (from Folder) on ``folder`` where the host has that node, else one Load Video of a clip written into the
    input folder. The clip names MIVA Train will see, and MIVA Clips' node id."""
    loader, clips = (str(max(int(node_id) for node_id in workflow) + offset) for offset in (1, 2))
    if "LoadVideoDataSetFromFolder" in server.get_json("/object_info"):
        workflow[loader] = {"class_type": "LoadVideoDataSetFromFolder", "inputs": {"folder": folder}}
        names = sorted(path.name for path in (server.workdir / "input" / folder).iterdir())
    else:
        write_clip(server.workdir / "input" / "one_training_clip.mp4", 7, seed=4)
        workflow[loader] = {"class_type": "LoadVideo", "inputs": {"file": "one_training_clip.mp4"}}
        names = ["one_training_clip.mp4"]
    workflow[clips] = {"class_type": "MIVAClips", "inputs": {"videos": [loader, 0]}}
    for node in workflow.values():
        if node["class_type"] == "MIVATrain":
            node["inputs"].update(clips="not a folder", clip_videos=[clips, 0])
    return names, clips


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A real ComfyUI server (``main.py --cpu``) on a free loopback port, with this pack loaded."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args
        self.workdir = Path(tempfile.mkdtemp(prefix="motion-dials-server-"))
        self.log_path = self.workdir / "server.log"
        self.miva_dir = self.workdir / "models" / "miva"  # the first miva folder: where the server's MIVA Train writes
        self.process = None

    def start(self, timeout: float = 180.0) -> Server:
        self.miva_dir.mkdir(parents=True, exist_ok=True)
        config = write_extra_model_paths(self.workdir, self.miva_dir)
        for sub in ("output", "input", "temp", "user"):
            (self.workdir / sub).mkdir(exist_ok=True)
        command = [
            sys.executable, str(COMFYUI_PATH / "main.py"), "--cpu", "--listen", "127.0.0.1",
            "--port", str(self.port), "--extra-model-paths-config", str(config),
            "--output-directory", str(self.workdir / "output"), "--input-directory", str(self.workdir / "input"),
            "--temp-directory", str(self.workdir / "temp"), "--user-directory", str(self.workdir / "user"),
            "--disable-auto-launch", *self.extra_args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen(
            command, cwd=COMFYUI_PATH, stdout=self.log_file, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.log()}")
            with contextlib.suppress(OSError):
                self.get_json("/system_stats")
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post_json(self, path: str, body: dict) -> int:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status

    def upload_image(self, path: Path) -> str:
        """Put an image into the server's input folder, as the web UI's upload does."""
        destination = self.workdir / "input" / path.name
        shutil.copyfile(path, destination)
        return path.name

    def write_clips(self, folder: str, count: int = 2, frames: int = 7, size: int = 32) -> Path:
        """``count`` tiny training clips (mp4s of a moving square) in ``input/<folder>/``, for MIVA Train."""
        destination = self.workdir / "input" / folder
        destination.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            write_clip(destination / f"clip{i}.mp4", frames, seed=i, size=size)
        return destination

    def fetch_output(self, item: dict, destination: Path) -> Path:
        """Download one output file ({filename, subfolder, type} from /history) through /view."""
        query = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
        target = destination / item.get("subfolder", "") / item["filename"]
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=60) as response:
            target.write_bytes(response.read())
        return target

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if getattr(self, "log_file", None):
            self.log_file.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc):
        self.stop()
