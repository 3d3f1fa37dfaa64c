"""One ComfyUI server through its HTTP and websocket API (aiohttp): upload, queue, follow, fetch."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import aiohttp

from .files import OutputFolder

UPLOAD_SUBFOLDER = "motion_dials_batch"


class ServerLost(Exception):
    """The server stopped answering (refused connection, closed websocket): its jobs go to other servers."""


class PromptRejected(Exception):
    """/prompt answered 400: the prompt failed validation; ``body`` holds ``error`` and ``node_errors``."""

    def __init__(self, body):
        super().__init__(describe_rejection(body))
        self.body = body


class PromptFailed(Exception):
    """The prompt ran and failed (``execution_error``) or was interrupted."""


class BadAnswer(Exception):
    """The server answered what ComfyUI never sends (not JSON, keys missing, wrong types): that job fails."""


def describe_rejection(body) -> str:
    """ComfyUI's validation answer as lines of node id, class, input name and reason."""
    try:
        return _rejection_lines(body)
    except (AttributeError, TypeError):  # not shaped as ComfyUI's: shown as it came
        return f"prompt rejected: {json.dumps(body)[:500]}"


def _rejection_lines(body: dict) -> str:
    error = body.get("error", {})
    lines = [f"{error.get('message', 'prompt rejected')}" + (f": {error['details']}" if error.get("details") else "")]
    for node_id, node_error in body.get("node_errors", {}).items():
        for problem in node_error.get("errors", []):
            input_name = problem.get("extra_info", {}).get("input_name", "?")
            reason = ": ".join(part for part in (problem.get("message"), problem.get("details")) if part)
            lines.append(f"  node {node_id} ({node_error.get('class_type', '?')}) input {input_name!r}: {reason}")
    return "\n".join(lines)


def uploaded_name(image: Path) -> str:
    """The LoadImage value of a local image once uploaded: named by its content, so a prompt's hash is too."""
    digest = hashlib.sha256(image.read_bytes()).hexdigest()[:12]
    return f"{UPLOAD_SUBFOLDER}/{image.stem}_{digest}{image.suffix}"


@dataclass
class Progress:
    prompt_id: str
    node: str | None
    value: int
    max: int


class ComfyClient:
    """A session with one server: one websocket (one client id) over which its prompts are followed."""

    def __init__(self, url: str, on_progress=None):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.on_progress = on_progress or (lambda progress: None)
        self._session: aiohttp.ClientSession | None = None
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task | None = None
        # Outcomes by prompt id: a prompt can finish before its waiter registers, so both sides meet here.
        self._outcomes: dict[str, asyncio.Future] = {}
        self._unfinished: set[str] = set()  # prompt ids queued by this client and not yet ended
        self._errors: dict[str, str] = {}  # why a prompt failed, told before it ends

    async def __aenter__(self) -> ComfyClient:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        try:
            ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
            self._socket = await self._session.ws_connect(ws_url, heartbeat=30)
        except BaseException as error:
            await self._session.close()  # also when cancelled while connecting
            if isinstance(error, (aiohttp.ClientError, OSError)):
                raise ServerLost(str(error)) from error
            raise
        self._reader = asyncio.create_task(self._read_messages())
        return self

    async def __aexit__(self, exc_type, exc, traceback):
        try:
            # Leaving on any error (cancelled, a full disk...): nobody will collect these prompts' outputs.
            if exc_type is not None and self._unfinished and not self._reader.done():
                await self._withdraw()
        finally:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            await self._socket.close()
            await self._session.close()

    async def _withdraw(self):
        """Take this client's prompts off the server (the batch was stopped): a rerun queues them again."""
        prompt_ids = sorted(self._unfinished)
        with contextlib.suppress(ServerLost):
            await self._request("POST", "/queue", json={"delete": prompt_ids})
            for prompt_id in prompt_ids:  # /interrupt stops a prompt only if it is the one running
                await self._request("POST", "/interrupt", json={"prompt_id": prompt_id})

    def _outcome(self, prompt_id: str) -> asyncio.Future:
        return self._outcomes.setdefault(prompt_id, asyncio.get_running_loop().create_future())

    async def _read_messages(self):
        try:
            async for message in self._socket:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue  # binary previews
                try:
                    event = json.loads(message.data)
                except ValueError:
                    continue  # a broken message says nothing about our prompts; their end comes in another
                data = event.get("data") if isinstance(event, dict) else None
                prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
                if not isinstance(prompt_id, str):
                    continue
                kind = event.get("type")
                if kind == "progress":
                    self.on_progress(Progress(prompt_id, data.get("node"), data.get("value"), data.get("max")))
                elif kind == "execution_error":
                    self._errors[prompt_id] = (f"node {data.get('node_id')} ({data.get('node_type')}): "
                                               f"{data.get('exception_message')}")
                elif kind == "execution_interrupted":
                    self._errors[prompt_id] = f"interrupted at node {data.get('node_id')}"
                elif kind == "executing" and data.get("node") is None:
                    # The last word on a prompt, success or not, sent once the server has filed it in /history.
                    self._settle(prompt_id, self._errors.pop(prompt_id, None))
        finally:
            lost = ServerLost("the websocket closed")
            for outcome in self._outcomes.values():
                if not outcome.done():
                    outcome.set_exception(lost)

    def _settle(self, prompt_id: str, error: str | None):
        self._unfinished.discard(prompt_id)
        outcome = self._outcome(prompt_id)
        if outcome.done():  # told twice before its waiter took the first word
            return
        if error:
            outcome.set_exception(PromptFailed(error))
        else:
            outcome.set_result(None)

    async def _request(self, method: str, path: str, **kwargs) -> aiohttp.ClientResponse:
        if self._reader.done():
            raise ServerLost("the websocket closed")
        try:
            response = await self._session.request(method, self.url + path, **kwargs)
            await response.read()
            return response
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as error:
            raise ServerLost(str(error)) from error

    async def _json(self, response: aiohttp.ClientResponse, path: str):
        try:
            return await response.json(content_type=None)
        except ValueError as error:  # not JSON, or not text at all
            raise BadAnswer(f"{path} answered something other than JSON ({error}): "
                            f"{(await response.read())[:100]!r}") from error

    async def get_json(self, path: str):
        response = await self._request("GET", path)
        response.raise_for_status()
        return await self._json(response, path)

    async def upload_image(self, image: Path) -> str:
        subfolder, name = uploaded_name(image).split("/")
        form = aiohttp.FormData()
        form.add_field("image", image.read_bytes(), filename=name)
        form.add_field("subfolder", subfolder)
        form.add_field("overwrite", "true")  # the name holds the content's hash: same name, same file
        response = await self._request("POST", "/upload/image", data=form)
        response.raise_for_status()
        answer = await self._json(response, "/upload/image")
        if not (isinstance(answer, dict) and isinstance(answer.get("subfolder"), str)
                and isinstance(answer.get("name"), str)):
            raise BadAnswer(f"/upload/image answered without a subfolder and name: {json.dumps(answer)[:200]}")
        return f"{answer['subfolder']}/{answer['name']}"

    async def queue_prompt(self, prompt: dict) -> str:
        response = await self._request("POST", "/prompt", json={"prompt": prompt, "client_id": self.client_id})
        if response.status == 400:
            raise PromptRejected(await self._json(response, "/prompt"))
        response.raise_for_status()
        answer = await self._json(response, "/prompt")
        if not (isinstance(answer, dict) and isinstance(answer.get("prompt_id"), str)):
            raise BadAnswer(f"/prompt answered without a prompt_id: {json.dumps(answer)[:200]}")
        return answer["prompt_id"]

    async def run(self, prompt: dict) -> dict:
        """Queue ``prompt``, wait until it ran, and return its outputs from /history."""
        prompt_id = await self.queue_prompt(prompt)
        outcome = self._outcome(prompt_id)
        if not outcome.done():  # a fully cached prompt can end before /prompt's answer is read
            self._unfinished.add(prompt_id)
        try:
            await outcome
        finally:
            del self._outcomes[prompt_id]
        path = f"/history/{prompt_id}"
        history = await self.get_json(path)
        entry = history.get(prompt_id) if isinstance(history, dict) else None
        if not isinstance(entry, dict):
            raise BadAnswer(f"{path} does not hold the prompt: {json.dumps(history)[:200]}")
        status = entry.get("status", {})
        if not isinstance(status, dict):
            raise BadAnswer(f"{path}: its status is not an object: {json.dumps(status)[:200]}")
        if status.get("status_str") != "success":
            raise PromptFailed(f"status {status.get('status_str')!r}: {json.dumps(status.get('messages', []))[:500]}")
        if not isinstance(entry.get("outputs"), dict):
            raise BadAnswer(f"{path}: its outputs are not an object: {json.dumps(entry.get('outputs'))[:200]}")
        return entry["outputs"]

    async def download(self, item: dict, folder: OutputFolder, relative: PurePosixPath) -> Path:
        """One output file ({filename, subfolder, type} from /history) through /view, written at ``relative``."""
        # The server's own names go back to it as they came: only the local path is ours to make safe.
        params = {key: item.get(key, "") for key in ("filename", "subfolder", "type")}
        response = await self._request("GET", "/view", params=params)
        response.raise_for_status()
        return folder.write(relative, await response.read())


def _is_name(value) -> bool:
    """A text that can travel in a URL: lone surrogates (which JSON can carry) cannot be encoded."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def output_items(outputs: dict) -> list[dict]:
    """Every file a prompt's output nodes saved (images, animated images, videos...)."""
    items = []
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            raise BadAnswer(f"the outputs of node {node_id} are not an object: {json.dumps(node_outputs)[:200]}")
        for listed in node_outputs.values():
            if not isinstance(listed, list):
                continue
            for item in listed:
                if not (isinstance(item, dict) and "filename" in item):
                    continue  # other UI values ("animated", texts)
                if not all(_is_name(item.get(key, "")) for key in ("filename", "subfolder", "type")):
                    raise BadAnswer(f"node {node_id} saved a file without a usable name: {json.dumps(item)[:200]}")
                items.append(item)
    return items
