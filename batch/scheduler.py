"""Spreading jobs over servers: each server is one worker with a few prompts queued; a lost server's jobs move on."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import aiohttp
from tqdm import tqdm

from .client import BadAnswer, ComfyClient, PromptFailed, PromptRejected, ServerLost, output_items
from .files import OutputFolder, OutsideOutput, WriteFailed, local_paths
from .manifest import DONE, FAILED, Manifest
from .workflow import Job

# Two prompts per server: the next one is already waiting in the server's queue when the current one ends,
# and no more than one job is stranded there should the server drop out.
DEFAULT_JOBS_PER_SERVER = 2


class Batch:
    """Runs ``jobs`` on ``servers``, recording each outcome in ``manifest`` and its files under ``output_dir``.

    A file that cannot be written (a full disk) stops the batch: ``run`` raises WriteFailed, the prompts still on
    the servers taken off.
    """

    def __init__(self, jobs: list[Job], servers: list[str], manifest: Manifest, output_dir: Path, *,
                 images: list[Path] = (), jobs_per_server: int = DEFAULT_JOBS_PER_SERVER):
        self.servers = servers
        self.manifest = manifest
        self.output = OutputFolder(output_dir)
        self.images = images
        self.jobs_per_server = jobs_per_server
        self.waiting: asyncio.Queue[Job] = asyncio.Queue()
        for job in jobs:
            self.waiting.put_nowait(job)
        self.unfinished = len(jobs)
        self.all_finished = asyncio.Event()
        if not jobs:
            self.all_finished.set()
        self.steps: dict[str, str] = {}  # server -> step progress of its running prompt
        self.bar = tqdm(total=len(jobs), unit="job", dynamic_ncols=True)

    def log(self, message: str):
        tqdm.write(message, file=sys.stderr)  # beside the bar, keeping stdout for the summary

    async def run(self) -> bool:
        """True when every job finished (done or failed); False when the servers ran out first."""
        if self.all_finished.is_set():  # nothing to run: no server is contacted
            self.bar.close()
            return True
        workers = [asyncio.create_task(self._serve(url)) for url in self.servers]
        servers_gone = asyncio.gather(*workers)
        finished = asyncio.create_task(self.all_finished.wait())
        try:
            await asyncio.wait([finished, servers_gone], return_when=asyncio.FIRST_COMPLETED)
            if servers_gone.done():
                servers_gone.result()  # a worker's error (a full disk, or unexpected) surfaces here, not silently
        finally:
            # Each worker by itself: a gather that failed has let go of its others, and they must withdraw too.
            for task in (finished, *workers):
                task.cancel()
            await asyncio.gather(finished, servers_gone, *workers, return_exceptions=True)
            self.bar.close()
        return self.all_finished.is_set()

    async def _serve(self, url: str):
        try:
            async with ComfyClient(url, on_progress=lambda progress: self._show_step(url, progress)) as client:
                for image in self.images:
                    await client.upload_image(image)
                slots = [asyncio.create_task(self._work(client)) for _ in range(self.jobs_per_server)]
                try:
                    # A slot ends only by losing the server: then the other slot must let go of its job too.
                    await asyncio.wait(slots, return_when=asyncio.FIRST_EXCEPTION)
                finally:
                    for slot in slots:
                        slot.cancel()
                    results = await asyncio.gather(*slots, return_exceptions=True)
                for result in results:
                    if not isinstance(result, asyncio.CancelledError):
                        raise result
        except ServerLost as error:
            self.log(f"lost {url} ({error}); its unfinished jobs go to the other servers")
        except (BadAnswer, aiohttp.ClientResponseError) as error:  # an image upload: this server cannot run the jobs
            self.log(f"cannot use {url} ({error}); its jobs go to the other servers")
        finally:
            self.steps.pop(url, None)

    async def _work(self, client: ComfyClient):
        while True:
            job = await self.waiting.get()
            entry = self.manifest.entries[job.id]
            try:
                outputs = await client.run(job.prompt)
                await self._download(client, job, outputs, entry)
                entry.update(status=DONE, server=client.url, error=None)
            except (ServerLost, asyncio.CancelledError) as interruption:
                if isinstance(interruption, ServerLost):
                    entry.setdefault("lost_on", []).append(client.url)
                self.waiting.put_nowait(job)
                raise
            except WriteFailed as error:
                # Not done, so a rerun retries it; the jobs after it would fail alike, so the batch stops.
                entry.update(status=FAILED, server=client.url, error=str(error))
                raise
            except PromptRejected as rejection:
                self._fail(entry, client.url, f"rejected by validation:\n{rejection}")
            except (PromptFailed, BadAnswer, OutsideOutput, aiohttp.ClientResponseError) as error:
                self._fail(entry, client.url, f"failed: {error}")
            self._finish_one()

    async def _download(self, client: ComfyClient, job: Job, outputs: dict, entry: dict):
        """The job's files into its folder, each listed in ``entry`` once written."""
        entry["files"] = []
        items = output_items(outputs)
        for item, relative in zip(items, local_paths(items), strict=True):
            await client.download(item, self.output, PurePosixPath(job.id[:12], relative))
            entry["files"].append(f"{job.id[:12]}/{relative.as_posix()}")

    def _fail(self, entry: dict, url: str, message: str):
        entry.update(status=FAILED, server=url, error=message)
        parameters = ", ".join(f"{name}={value}" for name, value in entry["parameters"].items()) or "the workflow"
        self.log(f"job {entry['id'][:12]} ({parameters}) on {url} {message}")

    def _finish_one(self):
        self.manifest.save()
        self.bar.update(1)
        self.unfinished -= 1
        if self.unfinished == 0:
            self.all_finished.set()

    def _show_step(self, url: str, progress):
        self.steps[url] = f"{progress.value}/{progress.max}"
        self.bar.set_postfix_str(" ".join(f"{urlsplit(url).netloc} step {step}" for url, step in self.steps.items()))
