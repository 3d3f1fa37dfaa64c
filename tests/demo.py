"""`make demo`: every dial acting, through ComfyUI's HTTP API, on the tiny models, ending in one page.

Starts the real ComfyUI server and posts the shipped workflows (made runnable on the tiny models): DyMoS for
strength in {-1, 0, 1, 2}, the EDG switch and merge, MIVA with one and two adapters, M-MIVA with a masked subject.
To each graph it adds a Motion Score node on the decoded frames and, where the graph has a KSampler, Reference
Attention Share and Attention Inspector nodes fed like it. It prints the numbers, writes the page
`output/motion_dials_demo.png` (for each run: the first and last frame, the flow of the last frame pair, the
attention heatmap, the numbers) and checks that DyMoS's reference share falls as the strength rises. The tiny
models have random weights: the frames are noise, the attention numbers move.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from .host import REPO, Server
from .server_client import run_prompt
from .tiny_graph import shrink_api, tinyify_api

OUTPUT = REPO / "output"
DEMO_OUTPUT = OUTPUT / "motion_dials_demo"
PAGE = OUTPUT / "motion_dials_demo.png"
STRENGTHS = (-1.0, 0.0, 1.0, 2.0)
# (feature, what the run shows, shipped workflow, {(node class, input): value})
RUNS = (
    *(("DyMoS", f"strength {s:+.0f}", "dymos_wan21_i2v", {("DyMoSMotionSlider", "strength"): s}) for s in STRENGTHS),
    ("EDG", "Wan 2.2 experts, one sampler, switch at 0.9", "edg_switch_wan22_i2v", {}),
    ("EDG", "merged dynamic -> consistency, switch at 0.5", "edg_wan21_i2v", {}),
    ("MIVA", "one adapter (horse running)", "miva_wan21_one_adapter", {}),
    ("MIVA", "two adapters, 0.5 each", "miva_wan21_two_adapters", {}),
    ("M-MIVA", "masked horse + background waterfall", "mmiva_wan21_subject_and_background", {}),
)
THUMB = 112
ROW_HEIGHT, TEXT_WIDTH = THUMB + 16, 430


def nodes_of_type(workflow: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in workflow.items() if node["class_type"] == class_type]


def with_diagnostics(workflow: dict) -> dict:
    """The graph plus Motion Score (and a frame preview) on its decoded frames, and Reference Attention Share fed
    like its KSampler, if it has one."""
    workflow = dict(workflow)
    decode = nodes_of_type(workflow, "VAEDecode")[0]
    workflow["motion"] = {"class_type": "MotionDialsMotionScore", "inputs": {"frames": [decode, 0], "max_side": 256}}
    workflow["frames"] = {"class_type": "PreviewImage", "inputs": {"images": [decode, 0]}}
    workflow["flow"] = {"class_type": "PreviewImage", "inputs": {"images": ["motion", 2]}}
    samplers = nodes_of_type(workflow, "KSampler")
    if samplers:
        sampler = workflow[samplers[0]]["inputs"]
        fed_like_the_sampler = {key: sampler[key] for key in ("model", "positive", "negative", "latent_image", "seed",
                                                              "steps", "cfg", "sampler_name", "scheduler")}
        workflow["share"] = {"class_type": "MotionDialsReferenceAttentionShare",
                             "inputs": fed_like_the_sampler | {"reference_frames": 1}}
        workflow["inspector"] = {"class_type": "MotionDialsAttentionInspector", "inputs": fed_like_the_sampler | {
            "reference_frames": 1, "fraction": 0.1, "blocks": "all", "heads": "all"}}
        workflow["heatmap"] = {"class_type": "PreviewImage", "inputs": {"images": ["inspector", 1]}}
    return workflow


def prepared(name: str, changes: dict, run_index: int) -> dict:
    workflow = with_diagnostics(shrink_api(tinyify_api(json.loads((REPO / "workflows" / f"{name}.api.json")
                                                                  .read_text()))))
    for (class_type, key), value in changes.items():
        for node_id in nodes_of_type(workflow, class_type):
            workflow[node_id]["inputs"][key] = value
    for save_id in nodes_of_type(workflow, "SaveAnimatedWEBP"):
        workflow[save_id]["inputs"]["filename_prefix"] = f"motion_dials_demo/{run_index:02d}_{name}"
    return workflow


def first_number(text: str, label: str) -> float:
    return float(re.search(label + r"\D*?(-?[0-9.]+)", text).group(1))


def run(server, index: int, feature: str, label: str, name: str, changes: dict) -> dict:
    outputs = run_prompt(server, prepared(name, changes, index))
    motion_text = outputs["motion"]["text"][0]
    frames = [server.fetch_output(item, DEMO_OUTPUT / "frames" / f"{index:02d}")
              for item in outputs["frames"]["images"]]
    flows = [server.fetch_output(item, DEMO_OUTPUT / "flow" / f"{index:02d}") for item in outputs["flow"]["images"]]
    heatmaps = [server.fetch_output(item, DEMO_OUTPUT / "attention" / f"{index:02d}")
                for item in outputs.get("heatmap", {}).get("images", [])]
    for node_id, node_out in outputs.items():  # the videos themselves, and any other picture the graph shows
        if node_id not in ("frames", "flow", "heatmap"):
            for item in node_out.get("images", []):
                server.fetch_output(item, OUTPUT)
    return {"feature": feature, "label": label, "workflow": name,
            "share": first_number(outputs["share"]["text"][0], "reference share") if "share" in outputs else None,
            "mean_flow": first_number(motion_text, "mean flow"), "top_flow": first_number(motion_text, "top 5% flow"),
            "frames": frames, "flows": flows, "heatmaps": heatmaps}


def thumbnail(path: Path) -> Image.Image:
    """The picture at THUMB pixels on its longer side; small ones enlarged by whole pixels, not blurred."""
    image = Image.open(path).convert("RGB")
    scale = THUMB / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)),
                        Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def page(rows: list[dict]) -> Image.Image:
    """One row per run: the numbers, the first and last frame, the flow of the last frame pair, and the
    frame-to-frame attention of the first 10 % of denoising where the graph has a KSampler."""
    sheet = Image.new("RGB", (TEXT_WIDTH + 4 * (THUMB + 8) + 8, 40 + ROW_HEIGHT * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 8), "Motion Dials through the HTTP API on tiny random-weight models: first frame, last frame, "
              "flow of the last frame pair, frame-to-frame attention (rows: query frames).", fill="black")
    draw.text((8, 22), "Random weights barely move the frames; the attention numbers show the dials acting.",
              fill=(110, 110, 110))
    for i, row in enumerate(rows):
        top = 40 + i * ROW_HEIGHT
        draw.line((0, top - 4, sheet.width, top - 4), fill=(220, 220, 220))
        share = "" if row["share"] is None else f"reference share {row['share']:.3f}   "
        lines = [f"{row['feature']}: {row['label']}", f"workflow {row['workflow']}",
                 share + f"motion: mean {row['mean_flow']:.4f} px, top 5% {row['top_flow']:.4f} px"]
        for j, line in enumerate(lines):
            draw.text((8, top + 8 + 18 * j), line, fill="black" if j != 1 else (110, 110, 110))
        for j, path in enumerate((row["frames"][0], row["frames"][-1], row["flows"][-1], *row["heatmaps"][:1])):
            sheet.paste(thumbnail(path), (TEXT_WIDTH + 8 + j * (THUMB + 8), top))
    return sheet


def main() -> int:
    shutil.rmtree(DEMO_OUTPUT, ignore_errors=True)
    DEMO_OUTPUT.mkdir(parents=True)
    with Server() as server:
        server.upload_image(REPO / "workflows" / "example.png")
        rows = [run(server, index, *spec) for index, spec in enumerate(RUNS)]
    page(rows).save(PAGE)

    print("\nMotion Dials on the tiny models, through the HTTP API:")
    print(f"{'feature':<8} {'run':<46} {'reference share':>15} {'mean flow':>10} {'top 5 %':>8}")
    for row in rows:
        share = "" if row["share"] is None else f"{row['share']:.4f}"
        print(f"{row['feature']:<8} {row['label']:<46} {share:>15} {row['mean_flow']:>9.4f}  {row['top_flow']:>7.4f}")
    print(f"The page: {PAGE.relative_to(REPO)}; videos and frames under {DEMO_OUTPUT.relative_to(REPO)}/")
    shares = [row["share"] for row in rows if row["feature"] == "DyMoS"]
    falling = all(later < earlier for earlier, later in zip(shares, shares[1:], strict=False))
    print("DyMoS: the reference share falls as the strength rises." if falling else
          "UNEXPECTED: DyMoS's reference share does not fall as the strength rises.")
    return 0 if falling else 1


if __name__ == "__main__":
    sys.exit(main())
