"""motion-dials-batch (`python -m batch`) against a fake ComfyUI server that answers what a hostile or broken one
might: names that lead out of --output, answers that are not ComfyUI's, files that do not fit on the disk."""

import asyncio
import functools
import io
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from aiohttp import web
from host import REPO
from PIL import Image
from test_batch import batch_module

WORKFLOW = {
    "1": {"class_type": "FakeSampler", "inputs": {"seed": 0}, "_meta": {"title": "Sampler"}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Start image"}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ComfyUI"}},
}
SUCCESS = {"status_str": "success", "completed": True, "messages": []}
# A folder under /tmp that no case may create (the absolute names below point into it).
ELSEWHERE = f"motion-dials-{uuid.uuid4().hex}"


def item(filename, subfolder="", kind="output") -> dict:
    return {"filename": filename, "subfolder": subfolder, "type": kind}


def served_bytes(query) -> bytes:
    """What /view serves unless told otherwise: the file's own names, so that no two files hold the same bytes."""
    return json.dumps([query.get("type"), query.get("subfolder"), query.get("filename")]).encode()


def history(prompt_id: str, **entry) -> web.Response:
    """A /history answer for ``prompt_id``: a successful prompt, with ``entry``'s keys replaced."""
    return web.json_response({prompt_id: {"status": SUCCESS, "outputs": {"9": {"images": [item("a.png")]}}, **entry}})


class FakeComfy:
    """Just enough of ComfyUI's HTTP and websocket API for the batch tool, on a loopback port, in a thread.

    Every prompt saves ``items``. ``answers`` replaces an answer: "prompt", "history" or "upload", a function of
    the prompt id (the file's name for "upload") giving the web.Response. ``noise`` goes down the websocket before
    a prompt's own messages ("{prompt_id}" filled in); ``view`` makes a file's bytes from its /view query.
    Prompts end once ``hold`` of them are queued and ``ready()`` holds, and only the first ``finish``: the others
    stay queued, as on a busy server. What /view, /queue and /interrupt were asked is kept in ``views`` and ``posted``.
    """

    def __init__(self, items=None, *, answers=None, noise=(), view=served_bytes, hold=1, ready=lambda: True,
                 finish=None, object_info=None):
        self.items = items or [item("ComfyUI_00001_.png")]
        self.object_info = object_info or {}
        self.answers, self.noise, self.view = answers or {}, noise, view
        self.hold, self.ready, self.finish = hold, ready, finish
        self.prompt_ids: list[str] = []
        self.views: list[dict] = []
        self.posted: list[tuple[str, object]] = []
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self._endings: list[asyncio.Task] = []
        self._loop = asyncio.new_event_loop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def __enter__(self):
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        assert started.wait(10), "the fake server did not start"
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self, started: threading.Event):
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.add_routes([
            web.get("/ws", self._websocket), web.post("/prompt", self._prompt),
            web.get("/history/{prompt_id}", self._history), web.get("/view", self._view),
            web.post("/queue", self._post), web.post("/interrupt", self._post),
            web.get("/object_info", self._object_info), web.post("/upload/image", self._upload),
        ])
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", 0).start())
        self._port = self._runner.addresses[0][1]
        self._enough_queued = asyncio.Event()
        started.set()
        self._loop.run_forever()
        self._loop.close()

    async def _stop(self):
        for ending in self._endings:
            ending.cancel()
        await asyncio.gather(*self._endings, return_exceptions=True)
        await self._runner.cleanup()

    async def _websocket(self, request):
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._sockets[request.query["clientId"]] = socket
        async for _ in socket:
            pass
        return socket

    async def _prompt(self, request):
        body = await request.json()
        prompt_id = uuid.uuid4().hex
        self.prompt_ids.append(prompt_id)
        if len(self.prompt_ids) >= self.hold:
            self._enough_queued.set()
        if self.finish is None or len(self.prompt_ids) <= self.finish:
            self._endings.append(asyncio.create_task(self._end(prompt_id, body["client_id"])))
        if "prompt" in self.answers:
            return self.answers["prompt"](prompt_id)
        return web.json_response({"prompt_id": prompt_id, "number": len(self.prompt_ids), "node_errors": {}})

    async def _end(self, prompt_id: str, client_id: str):
        await self._enough_queued.wait()
        while not self.ready():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # after /prompt's answer, as the client has it with a real server's queue
        socket = self._sockets[client_id]
        for message in self.noise:
            await socket.send_str(message.replace("{prompt_id}", prompt_id))
        for kind, data in (("executing", {"node": "9"}), ("progress", {"node": "9", "value": 1, "max": 1}),
                           ("executing", {"node": None})):
            await socket.send_json({"type": kind, "data": {**data, "prompt_id": prompt_id}})

    async def _history(self, request):
        prompt_id = request.match_info["prompt_id"]
        if "history" in self.answers:
            return self.answers["history"](prompt_id)
        return web.json_response({prompt_id: {"status": SUCCESS, "outputs": {"9": {"images": self.items}}}})

    async def _view(self, request):
        self.views.append(dict(request.query))
        return web.Response(body=self.view(request.query))

    async def _post(self, request):
        self.posted.append((request.path, await request.json()))
        return web.Response()

    async def _object_info(self, request):
        return web.json_response(self.object_info)

    async def _upload(self, request):
        form = await request.post()
        if "upload" in self.answers:
            return self.answers["upload"](form["image"].filename)
        return web.json_response({"name": form["image"].filename, "subfolder": form["subfolder"], "type": "input"})


@pytest.fixture(scope="module")
def workflow_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("workflow") / "fake.api.json"
    path.write_text(json.dumps(WORKFLOW))
    return path


def limit_file_size(limit: int):
    """In the child: files stop growing at ``limit`` bytes, a write beyond failing with EFBIG as on a full disk."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the first such write


def run_batch(workflow: Path, output: Path, servers: list[FakeComfy], *args, file_size_limit=None):
    command = [sys.executable, "-m", "batch", str(workflow), *map(str, args), "--output", str(output)]
    command += [part for server in servers for part in ("--server", server.url)]
    preexec = None if file_size_limit is None else functools.partial(limit_file_size, file_size_limit)
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=preexec)
    assert "Traceback" not in finished.stderr, finished.stderr
    return finished


def manifest_jobs(output: Path) -> list[dict]:
    return json.loads((output / "manifest.json").read_text())["jobs"]


def job_folder(seed: int) -> str:
    workflow = batch_module("workflow")
    (job,) = workflow.expand_jobs(WORKFLOW, [workflow.parse_sweep(f"Sampler.seed={seed}")])
    return job.id[:12]


def entries_under(folder: Path) -> list[str]:
    """Every file, folder and link under ``folder``, relative, without following links."""
    found = []
    for directory, folders, files in os.walk(folder):
        found += [Path(directory, name).relative_to(folder).as_posix() for name in folders + files]
    return sorted(found)


NAME_CASES = {
    "dotdot-filename": ([item("../../escape.png")], ["escape.png"]),
    "absolute-filename": ([item(f"/tmp/{ELSEWHERE}/abs.png")], [f"tmp/{ELSEWHERE}/abs.png"]),
    "dotdot-subfolder": ([item("x.png", "../..")], ["x.png"]),
    "absolute-subfolder": ([item("y.png", f"/tmp/{ELSEWHERE}")], [f"tmp/{ELSEWHERE}/y.png"]),
    "backslashes": ([item("..\\..\\x.png")], ["x.png"]),
    "windows-drive": ([item("evil.png", "C:\\Windows")], ["C_/Windows/evil.png"]),
    "control-characters": ([item("a\x00b\x1f\x7f.png", "sub\ndir")], ["sub_dir/a_b__.png"]),
    "dot-and-empty-parts": ([item(".//z.png", "./.././/")], ["z.png"]),
    "nothing-left": ([item("..", "..")], ["unnamed"]),
    "windows-device-names": ([item("NUL.png", "con")], ["_con/_NUL.png"]),
    "huge-names": ([item("n" * 1000 + ".png", "d" * 300)], ["d" * 200 + "/" + "n" * 196 + ".png"]),
    "same-name-two-subfolders": ([item("same.png", "a"), item("same.png", "b")], ["a/same.png", "b/same.png"]),
    "same-name-two-types": ([item("same.png"), item("same.png", kind="temp")], ["same.png", "same-2.png"]),
    "names-differing-in-case": ([item("Frame.png"), item("frame.png")], ["Frame.png", "frame-2.png"]),
    "names-made-alike": ([item("../k.png"), item("k.png")], ["k.png", "k-2.png"]),
    "a-file-named-as-a-subfolder": ([item("x"), item("y.png", "x")], ["x", "y.png"]),
}


@pytest.mark.parametrize(("items", "expected"), NAME_CASES.values(), ids=NAME_CASES)
def test_server_names_become_distinct_local_paths_inside_the_job_folder(workflow_file, tmp_path, items, expected):
    output = tmp_path / "two" / "deep" / "output"  # room above it for "../.." to land in, were it followed
    with FakeComfy(items) as server:
        finished = run_batch(workflow_file, output, [server], "--set", "Sampler.seed=1")
    assert finished.returncode == 0, finished.stderr
    (job,) = manifest_jobs(output)
    folder = job_folder(1)
    assert job["status"] == "done"
    assert job["files"] == [f"{folder}/{name}" for name in expected]
    for name, served in zip(expected, items, strict=True):
        assert (output / folder / name).read_bytes() == served_bytes(served), f"{name} holds its own file"
    assert server.views == items, "/view is asked for the server's names as they came"
    written = {"manifest.json", "contact_sheet.png", "index.html", *job["files"]}
    assert {path for path in entries_under(tmp_path) if Path(tmp_path, path).is_file()} \
        == {f"two/deep/output/{name}" for name in written}, "nothing written outside --output"
    assert not Path("/tmp", ELSEWHERE).exists()


SYMLINK_CASES = {
    # What the output folder holds before the run (a link to the outside), what the server saved, the job's end.
    "link-at-the-file": ("{job}/ComfyUI_00001_.png", "outside/target.png", item("ComfyUI_00001_.png"), "done"),
    "link-as-the-subfolder": ("{job}/sub", "outside", item("x.png", "sub"), "failed"),
    "link-above-the-subfolder": ("{job}/sub", "outside", item("x.png", "sub/deeper"), "failed"),
    "link-as-the-job-folder": ("{job}", "outside", item("ComfyUI_00001_.png"), "failed"),
}


@pytest.mark.parametrize(("link", "target", "saved", "status"), SYMLINK_CASES.values(), ids=SYMLINK_CASES)
def test_a_symlink_in_the_output_folder_is_never_written_through(workflow_file, tmp_path, link, target, saved,
                                                                  status):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.png").write_bytes(b"original")
    output = tmp_path / "output"
    planted = output / link.format(job=job_folder(1))
    planted.parent.mkdir(parents=True)
    planted.symlink_to(tmp_path / target)
    with FakeComfy([saved]) as server:
        finished = run_batch(workflow_file, output, [server], "--set", "Sampler.seed=1")
    assert entries_under(outside) == ["target.png"] and (outside / "target.png").read_bytes() == b"original"
    (job,) = manifest_jobs(output)
    assert job["status"] == status, job
    if status == "done":
        assert finished.returncode == 0, finished.stderr
        assert not planted.is_symlink() and planted.read_bytes() == served_bytes(saved), "the link was replaced"
    else:
        assert finished.returncode == 1
        assert "refused to write" in job["error"] and "outside" in job["error"]
        assert job["files"] == []


def no_outputs(prompt_id):
    return web.json_response({prompt_id: {"status": SUCCESS}})


ANSWER_CASES = {
    # The fake server's answers, the job's end, what its error says.
    "history-html": ({"answers": {"history": lambda _: web.Response(text="<h1>busy</h1>", content_type="text/html")}},
                     "failed", "something other than JSON"),
    "history-truncated-json": ({"answers": {"history": lambda _: web.Response(
        text='{"abc', content_type="application/json")}}, "failed", "something other than JSON"),
    "history-without-the-prompt": ({"answers": {"history": lambda _: web.json_response({})}},
                                   "failed", "does not hold the prompt"),
    "history-a-list": ({"answers": {"history": lambda _: web.json_response([1])}}, "failed", "does not hold"),
    "status-a-text": ({"answers": {"history": lambda prompt_id: history(prompt_id, status="ok")}},
                      "failed", "status is not an object"),
    "status-error": ({"answers": {"history": lambda prompt_id: history(prompt_id, status={"status_str": "error"})}},
                     "failed", "status 'error'"),
    "outputs-missing": ({"answers": {"history": no_outputs}}, "failed", "outputs are not an object"),
    "outputs-a-list": ({"answers": {"history": lambda prompt_id: history(prompt_id, outputs=[item("a.png")])}},
                       "failed", "outputs are not an object"),
    "node-outputs-a-text": ({"answers": {"history": lambda prompt_id: history(prompt_id, outputs={"9": "a.png"})}},
                            "failed", "outputs of node 9 are not an object"),
    "filename-a-number": ({"items": [item(7)]}, "failed", "without a usable name"),
    "subfolder-null": ({"items": [item("a.png", None)]}, "failed", "without a usable name"),
    "filename-a-lone-surrogate": ({"items": [item("\ud800.png")]}, "failed", "without a usable name"),
    "prompt-answer-without-an-id": ({"answers": {"prompt": lambda _: web.json_response({"number": 1})}},
                                    "failed", "without a prompt_id"),
    "prompt-answer-not-json": ({"answers": {"prompt": lambda _: web.Response(text="ok")}},
                               "failed", "something other than JSON"),
    "rejection-of-another-shape": ({"answers": {"prompt": lambda _: web.json_response(
        {"error": "no", "node_errors": []}, status=400)}}, "failed", 'prompt rejected: {"error": "no"'),
    "websocket-noise": ({"noise": [
        "not json", "[1, 2]", '{"type": "progress", "data": [1]}', '{"type": "progress", "data": {"prompt_id": [1]}}',
        '{"type": "progress", "data": {"prompt_id": "{prompt_id}"}}',
        '{"type": "executing", "data": {"node": null, "prompt_id": "{prompt_id}"}}',  # its end, told twice
    ]}, "done", None),
}


@pytest.mark.parametrize(("fake", "status", "message"), ANSWER_CASES.values(), ids=ANSWER_CASES)
def test_an_answer_comfyui_never_sends_fails_its_job_with_a_message(workflow_file, tmp_path, fake, status, message):
    output = tmp_path / "output"
    with FakeComfy(**fake) as server:
        finished = run_batch(workflow_file, output, [server], "--set", "Sampler.seed=1")
    (job,) = manifest_jobs(output)
    assert job["status"] == status, job
    if status == "done":
        assert finished.returncode == 0, finished.stderr
        assert [(output / name).read_bytes() for name in job["files"]] == [served_bytes(server.items[0])]
    else:
        assert finished.returncode == 1
        assert message in job["error"] and message in finished.stderr
        assert job["files"] == []


def test_a_server_that_answers_an_upload_with_nonsense_is_left_for_the_others(workflow_file, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (4, 4)).save(images / "still.png")
    output = tmp_path / "output"
    with FakeComfy(answers={"upload": lambda _: web.Response(text="<h1>no</h1>")}) as server:
        finished = run_batch(workflow_file, output, [server], "--images", images, "--image-node", "Start image")
    assert finished.returncode == 1
    assert f"cannot use {server.url} (/upload/image answered something other than JSON" in finished.stderr
    assert "every server dropped out" in finished.stderr
    assert server.prompt_ids == []
    assert [job["status"] for job in manifest_jobs(output)] == ["pending"]


def noisy_png(size: int) -> bytes:
    encoded = io.BytesIO()
    Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(encoded, format="PNG")
    return encoded.getvalue()


LARGE = os.urandom(256 * 1024)
SMALL_IMAGE = noisy_png(64)  # some 12 KiB, and a noisy contact sheet of some 150 KiB
FAULT_CASES = {
    # The child's file-size limit, what /view serves, how many prompts end, the file that fails, the jobs' ends,
    # what the output folder holds afterwards (job folders as <job>), whether the queued prompt is taken off.
    "a-download": (64 * 1024, LARGE, 1, "ComfyUI_00001_.png", ["failed", "pending"], ["<job>", "manifest.json"],
                   True),
    "the-first-manifest": (100, LARGE, None, "manifest.json", None, [], False),
    "the-contact-sheet": (48 * 1024, SMALL_IMAGE, None, "contact_sheet.png", ["done", "done"],
                          ["<job>", "<job>", "<job>/ComfyUI_00001_.png", "<job>/ComfyUI_00001_.png", "manifest.json"],
                          False),
}


def with_jobs_as_placeholders(names: list[str]) -> list[str]:
    jobs = {job_folder(1), job_folder(2)}
    return sorted("/".join("<job>" if part in jobs else part for part in name.split("/")) for name in names)


@pytest.mark.parametrize(("limit", "served", "finish", "failing", "statuses", "left", "withdrawn"),
                         FAULT_CASES.values(), ids=FAULT_CASES)
def test_a_write_fault_stops_the_batch_in_one_line_and_a_rerun_finishes_it(
        workflow_file, tmp_path, limit, served, finish, failing, statuses, left, withdrawn):
    output = tmp_path / "output"
    sweep = ("--set", "Sampler.seed=1,2")
    with FakeComfy(view=lambda _: served, hold=2, finish=finish) as server:
        stopped = run_batch(workflow_file, output, [server], *sweep, file_size_limit=limit)
    assert stopped.returncode == 1
    lines = stopped.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stopped.stderr
    assert errors[0].startswith("error: cannot write /") and f"/{failing}: File too large; " in errors[0]
    assert errors[0].endswith("; run again to resume")
    assert with_jobs_as_placeholders(entries_under(output)) == left, "no partial file left behind"
    if statuses is None:
        assert not (output / "manifest.json").exists()
    else:
        jobs = manifest_jobs(output)
        assert sorted(job["status"] for job in jobs) == statuses
        assert all("File too large" in job["error"] for job in jobs if job["status"] == "failed")
    if withdrawn:
        still_queued = server.prompt_ids[1]
        assert server.posted == [("/queue", {"delete": [still_queued]}), ("/interrupt", {"prompt_id": still_queued})]
    else:
        assert server.posted == []

    with FakeComfy(view=lambda _: served) as server:
        rerun = run_batch(workflow_file, output, [server], *sweep)
    assert rerun.returncode == 0, rerun.stderr
    jobs = manifest_jobs(output)
    assert [job["status"] for job in jobs] == ["done", "done"]
    assert all((output / name).read_bytes() == served for job in jobs for name in job["files"])
    assert (output / "contact_sheet.png").is_file() and (output / "index.html").is_file()
    assert not [name for name in entries_under(output) if name.endswith(".part")]


def test_a_write_fault_takes_the_batch_off_every_server(workflow_file, tmp_path):
    output = tmp_path / "output"
    with FakeComfy(finish=0) as other, \
            FakeComfy(view=lambda _: LARGE, hold=2, ready=lambda: len(other.prompt_ids) == 2, finish=1) as faulting:
        stopped = run_batch(workflow_file, output, [faulting, other], "--set", "Sampler.seed=range(1,5)",
                            file_size_limit=64 * 1024)
    assert stopped.returncode == 1
    assert stopped.stderr.splitlines()[-1].startswith("error: cannot write ")
    assert sorted(job["status"] for job in manifest_jobs(output)) == ["failed", "pending", "pending", "pending"]
    for server, queued in ((faulting, faulting.prompt_ids[1:]), (other, sorted(other.prompt_ids))):
        assert server.posted == [("/queue", {"delete": queued}),
                                 *(("/interrupt", {"prompt_id": prompt_id}) for prompt_id in queued)]


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", '{"jobs": [{"no id": 1}]}', '{"jobs": 5}'])
def test_a_damaged_manifest_is_one_line_naming_it_before_any_server_is_asked(workflow_file, tmp_path, damage):
    output = tmp_path / "out"
    output.mkdir()
    (output / "manifest.json").write_text(damage)
    finished = run_batch(workflow_file, output, [], "--server", "http://127.0.0.1:9")  # nothing listens there
    assert finished.returncode == 2
    (line,) = finished.stderr.strip().splitlines()
    assert line.startswith("error: ") and "manifest.json is damaged" in line and "start this batch over" in line
    assert (output / "manifest.json").read_text() == damage, "left as it was"


def test_a_ui_workflow_the_servers_object_info_cannot_convert_is_one_line(tmp_path):
    ui = {"nodes": [{"id": 1, "type": "KSampler", "mode": 0, "inputs": [], "widgets_values": [1, 2]}], "links": []}
    workflow = tmp_path / "ui.json"
    workflow.write_text(json.dumps(ui))
    with FakeComfy(object_info={"KSampler": {"input": 5}}) as server:
        finished = run_batch(workflow, tmp_path / "out", [server])
    assert finished.returncode == 2
    (line,) = finished.stderr.strip().splitlines()
    assert line.startswith("error: cannot convert ui.json with the server's /object_info"), line
