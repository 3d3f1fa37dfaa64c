"""A small client for a ComfyUI server's HTTP and websocket API: queue a prompt and wait for it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import websocket


class PromptRejected(Exception):
    """/prompt answered 400: ``body`` holds ComfyUI's ``error`` and ``node_errors``."""

    def __init__(self, body: dict):
        super().__init__(json.dumps(body, indent=1)[:4000])
        self.body = body


class PromptFailed(Exception):
    pass


def queue_prompt(server, workflow: dict, client_id: str) -> str:
    request = urllib.request.Request(
        server.url + "/prompt", data=json.dumps({"prompt": workflow, "client_id": client_id}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["prompt_id"]
    except urllib.error.HTTPError as error:
        if error.code == 400:
            raise PromptRejected(json.loads(error.read())) from None
        raise


def run_prompt(server, workflow: dict, timeout: float = 300.0) -> dict:
    """Queue ``workflow``, wait for it on the websocket, and return its outputs from /history."""
    client_id = uuid.uuid4().hex
    socket = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=timeout)
    try:
        prompt_id = queue_prompt(server, workflow, client_id)
        while True:
            message = socket.recv()
            if not isinstance(message, str):
                continue  # binary previews
            event = json.loads(message)
            data = event.get("data", {})
            if data.get("prompt_id") != prompt_id:
                continue
            if event["type"] == "execution_error":
                raise PromptFailed(f"{data.get('node_type')} (node {data.get('node_id')}): "
                                   f"{data.get('exception_message')}")
            if event["type"] == "executing" and data.get("node") is None:
                break
    finally:
        socket.close()
    entry = server.get_json(f"/history/{prompt_id}")[prompt_id]
    if entry["status"]["status_str"] != "success":
        raise PromptFailed(json.dumps(entry["status"]))
    return entry["outputs"]
