"""motion-dials-batch / `python -m batch`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import aiohttp

from .client import BadAnswer, ComfyClient, ServerLost, uploaded_name
from .files import WriteFailed
from .manifest import DONE, Manifest
from .report import write_contact_sheet, write_index
from .scheduler import DEFAULT_JOBS_PER_SERVER, Batch
from .workflow import Sweep, WorkflowError, expand_jobs, is_ui_format, parse_sweep, ui_to_api

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
EXAMPLES = """examples:
  %(prog)s workflow.api.json --set "DyMoS Motion Slider.strength=0,0.5,1" --set "KSampler.seed=range(0,4)"
  %(prog)s workflow.json --images stills/ --image-node "Start image" --server http://gpu1:8188 --server http://gpu2:8188
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="motion-dials-batch", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Queue a sweep of a ComfyUI workflow on one or more servers and collect the results.")
    parser.add_argument("workflow", type=Path, help="the workflow, API format or as saved by the web UI")
    parser.add_argument("--set", dest="sweeps", action="append", default=[], metavar="NODE.INPUT=VALUES",
                        help="sweep an input; NODE is a node id, title or class; VALUES: 'a,b,c', "
                             "'range(start,stop[,step])' or a JSON list (repeatable)")
    parser.add_argument("--zip", action="store_true",
                        help="pair the sweeps' values in order instead of trying every combination")
    parser.add_argument("--images", type=Path, metavar="DIR", help="sweep over the images in DIR")
    parser.add_argument("--image-node", default="LoadImage", metavar="NODE",
                        help="the LoadImage node that --images feeds (id, title or class; default: %(default)s)")
    parser.add_argument("--server", dest="servers", action="append", metavar="URL",
                        help="a ComfyUI server (repeatable; default http://127.0.0.1:8188)")
    parser.add_argument("--output", type=Path, default=Path("batch_output"),
                        help="folder for the results, manifest.json, contact_sheet.png and index.html "
                             "(default: %(default)s)")
    parser.add_argument("--jobs-per-server", type=int, default=DEFAULT_JOBS_PER_SERVER,
                        help="prompts kept queued on each server (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.jobs_per_server < 1:
        parser.error("--jobs-per-server must be at least 1")
    args.servers = args.servers or ["http://127.0.0.1:8188"]
    return args


def image_files(folder: Path) -> list[Path]:
    images = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise WorkflowError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return images


async def fetch_object_info(servers: list[str]) -> dict:
    """/object_info from the first server that answers: the UI format needs it to name widget values."""
    for url in servers:
        try:
            async with ComfyClient(url) as client:
                object_info = await client.get_json("/object_info")
        except ServerLost:
            continue
        if not isinstance(object_info, dict):
            raise BadAnswer(f"{url}/object_info is not an object")
        return object_info
    raise WorkflowError(f"no server answered ({', '.join(servers)}): cannot convert the UI-format workflow")


def load_workflow(path: Path, servers: list[str]) -> dict:
    workflow = json.loads(path.read_text())
    if is_ui_format(workflow):
        object_info = asyncio.run(fetch_object_info(servers))
        try:
            workflow = ui_to_api(workflow, object_info)
        except (KeyError, TypeError, AttributeError, IndexError) as error:
            # the server's /object_info is not shaped as ComfyUI's is
            raise WorkflowError(f"cannot convert {path.name} with the server's /object_info ({error!r}); save "
                                "the workflow in API format instead") from None
    return workflow


def run_batch(args: argparse.Namespace, manifest: Manifest, jobs: list, images: list[Path]) -> bool:
    """Runs the jobs the manifest does not show done; True when every job finished (done or failed)."""
    manifest.save()
    to_run = [job for job in jobs if not manifest.is_done(job.id)]
    if len(to_run) < len(jobs):
        print(f"{len(jobs) - len(to_run)} of {len(jobs)} jobs already done (in {manifest.path}): skipped")
    batch = Batch(to_run, args.servers, manifest, args.output, images=images, jobs_per_server=args.jobs_per_server)
    return asyncio.run(batch.run())


def saved(manifest: Manifest) -> str:
    """The manifest saved once more, after the batch stopped early: what the next run will find."""
    try:
        manifest.save()
    except WriteFailed:
        return f"{manifest.path} could not be updated and keeps its earlier state"
    return f"{manifest.path} written"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        workflow = load_workflow(args.workflow, args.servers)
        sweeps = [parse_sweep(text) for text in args.sweeps]
        images = image_files(args.images) if args.images else []
        if images:
            sweeps.append(Sweep(args.image_node, "image", [uploaded_name(image) for image in images],
                                labels=[image.name for image in images]))
        jobs = expand_jobs(workflow, sweeps, zipped=args.zip)
        args.output.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(args.output / "manifest.json")
    except (WorkflowError, BadAnswer, aiohttp.ClientResponseError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    entries = [manifest.add(job) for job in jobs]
    try:
        complete = run_batch(args, manifest, jobs, images)
        manifest.save()
        write_contact_sheet(args.output, entries)
        write_index(args.output, entries)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {saved(manifest)}; run the same command again to resume", file=sys.stderr)
        return 130
    except WriteFailed as error:  # one line, as a full disk is not the tool's bug
        print(f"error: {error}; {saved(manifest)}; run again to resume", file=sys.stderr)
        return 1
    done = sum(entry["status"] == DONE for entry in entries)
    print(f"{done} of {len(entries)} jobs done; results, manifest.json, contact_sheet.png and index.html "
          f"in {args.output}")
    if not complete:
        print("error: every server dropped out before the batch finished; run again to resume", file=sys.stderr)
    return 0 if done == len(entries) else 1
