"""`make demo`: the DyMoS slider acting, through ComfyUI's HTTP API, on the tiny models.

Starts the real ComfyUI server, posts the Wan 2.1 I2V DyMoS workflow from workflows/ (made runnable on
the tiny models) for strength in {-1, 0, 1, 2}, saves the videos under output/, and prints for each
strength the mean share of attention that generated frames give to the reference frame, measured by
the Reference Attention Share node in the same graph. The share must fall as the strength rises.
"""

from __future__ import annotations

import json
import shutil
import sys

from .host import REPO, Server
from .server_client import run_prompt
from .tiny_graph import shrink_api, tinyify_api

STRENGTHS = (-1.0, 0.0, 1.0, 2.0)
WORKFLOW = REPO / "workflows" / "dymos_wan21_i2v.api.json"
OUTPUT = REPO / "output"


def nodes_of_type(workflow: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in workflow.items() if node["class_type"] == class_type]


def with_share_probe(workflow: dict) -> dict:
    """Add a Reference Attention Share node fed exactly like the graph's sampler."""
    sampler_id = nodes_of_type(workflow, "KSampler")[0]
    sampler = workflow[sampler_id]["inputs"]
    workflow = dict(workflow)
    workflow["share"] = {
        "class_type": "MotionDialsReferenceAttentionShare",
        "inputs": {key: sampler[key] for key in ("model", "positive", "negative", "latent_image", "seed", "steps",
                                                 "cfg", "sampler_name", "scheduler")} | {"reference_frames": 1},
        "_meta": {"title": "Reference Attention Share"},
    }
    return workflow


def main() -> int:
    base = with_share_probe(shrink_api(tinyify_api(json.loads(WORKFLOW.read_text()))))
    slider_id = nodes_of_type(base, "DyMoSMotionSlider")[0]
    OUTPUT.mkdir(exist_ok=True)
    rows = []
    with Server() as server:
        server.upload_image(REPO / "workflows" / "example.png")
        for strength in STRENGTHS:
            workflow = json.loads(json.dumps(base))
            workflow[slider_id]["inputs"]["strength"] = strength
            for save_id in nodes_of_type(workflow, "SaveAnimatedWEBP") + nodes_of_type(workflow, "SaveVideo"):
                workflow[save_id]["inputs"]["filename_prefix"] = f"dymos_demo/strength_{strength:+.1f}"
            outputs = run_prompt(server, workflow)
            share = float(outputs["share"]["text"][0].split()[-1])
            files = [server.fetch_output(item, OUTPUT) for node_id, node_out in outputs.items()
                     for key in ("images", "gifs", "videos") for item in node_out.get(key, [])]
            rows.append((strength, share, files))

    print("\nDyMoS on the tiny Wan 2.1 I2V, through the HTTP API:")
    print(f"{'strength':>9}  {'reference share':>15}  output")
    for strength, share, files in rows:
        print(f"{strength:>9.1f}  {share:>15.4f}  {', '.join(str(f.relative_to(REPO)) for f in files)}")
    shares = [share for _, share, _ in rows]
    falling = all(later < earlier for earlier, later in zip(shares, shares[1:], strict=False))
    print("The reference share falls as the strength rises." if falling else
          "UNEXPECTED: the reference share does not fall as the strength rises.")
    return 0 if falling else 1


if __name__ == "__main__":
    shutil.rmtree(OUTPUT / "dymos_demo", ignore_errors=True)
    sys.exit(main())
