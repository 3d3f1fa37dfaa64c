"""The pack in a real ComfyUI server (`main.py --cpu` on a loopback port), driven through its HTTP API."""

import json

import pytest
from host import REPO, TINY_MODELS, TINY_TRAINING, Server, clips_as_videos, tiny_training
from server_client import PromptFailed, run_prompt
from tiny_graph import shrink_api, tinyify_api

WORKFLOWS = REPO / "workflows"
TRAINING_CLIPS = "horse_running"  # the clips folder the training workflow names, in the server's input folder


def tiny_workflow(name: str) -> dict:
    return shrink_api(tinyify_api(json.loads((WORKFLOWS / f"{name}.api.json").read_text())))


def node_of(workflow: dict, class_type: str) -> str:
    return next(node_id for node_id, node in workflow.items() if node["class_type"] == class_type)


@pytest.fixture(scope="module")
def server(tiny_models):
    with Server() as running:
        running.upload_image(WORKFLOWS / "example.png")
        running.write_clips(TRAINING_CLIPS)
        yield running


def test_object_info_lists_the_slider_with_tooltips(server):
    info = server.get_json("/object_info/DyMoSMotionSlider")["DyMoSMotionSlider"]
    assert info["category"] == "Motion Dials"
    assert info["display_name"] == "DyMoS Motion Slider"
    required, optional = info["input"]["required"], info["input"].get("optional", {})
    assert set(required) == {"model", "strength", "tau", "frame_schedule"}
    assert set(optional) == {"reference_frames"}
    strength = required["strength"][1]
    assert (strength["default"], strength["min"], strength["max"], strength["display"]) == (1.0, -4.0, 4.0, "slider")
    assert required["tau"][1]["default"] == 0.2
    assert required["frame_schedule"][1]["options"] == ["uniform", "linear", "log"]
    for spec in [*required.values(), *optional.values()]:
        assert spec[1]["tooltip"], f"every input has a tooltip: {spec}"
    assert "Wan 2.2 I2V A14B strength 0.6" in strength["tooltip"]


SHIPPED_ON_TINY_MODELS = ["dymos_wan21_i2v", "dymos_wan22_i2v", "edg_wan21_i2v", "edg_switch_wan22_i2v",
                          "miva_wan21_one_adapter", "miva_wan21_two_adapters", "miva_dymos_wan21",
                          "mmiva_wan21_one_subject", "mmiva_wan21_subject_and_background"]


@pytest.mark.parametrize("name", SHIPPED_ON_TINY_MODELS)
def test_shipped_workflow_runs_through_the_api(server, name, tmp_path):
    outputs = run_prompt(server, tiny_workflow(name))
    saved = [item for node_out in outputs.values() for item in node_out.get("images", [])]
    assert saved, f"the workflow saved nothing: {outputs}"
    for item in saved:
        assert server.fetch_output(item, tmp_path).stat().st_size > 0


def test_training_workflow_trains_an_adapter_into_the_servers_miva_folder_and_samples_with_it(server, tmp_path):
    shipped = json.loads((WORKFLOWS / "miva_train_wan21.api.json").read_text())
    train = node_of(shipped, "MIVATrain")
    settings = shipped[train]["inputs"]
    # the shipped workflow keeps the user's settings; only the test run is made small
    assert (settings["steps"], settings["width"], settings["height"], settings["frames"]) == (8000, 832, 480, 17)
    assert settings["clips"] == TRAINING_CLIPS and settings["model"] == [node_of(shipped, "UNETLoader"), 0]
    workflow = tiny_training(tiny_workflow("miva_train_wan21"), "miva_server_train_test.safetensors")
    assert workflow[node_of(workflow, "MIVAApply")]["inputs"]["stack"] == [train, 0]
    outputs = run_prompt(server, workflow)

    target = server.miva_dir / "miva_server_train_test.safetensors"
    assert target.is_file() and not (TINY_MODELS / "miva" / target.name).exists()
    from motion_dials.models.miva import load_adapter

    adapter = load_adapter(target)
    assert (adapter.info.motion, adapter.info.subject) == ("horse running", "horse")
    assert adapter.info.query_rank == TINY_TRAINING["cfa_rank"]
    assert adapter.info.details["steps"] == str(TINY_TRAINING["steps"])
    assert adapter.info.details["clips"] == "2" and adapter.info.details["resolution"] == "32x32"
    (text,) = outputs[train]["text"]
    assert text.startswith(f"wrote {target.name}") and "motion: horse running" in text and "loss: first" in text
    # the loss curve, on the node and in the Preview Image; the video sampled with the trained adapter
    for node in (train, node_of(workflow, "PreviewImage")):
        (item,) = outputs[node]["images"]
        curve = server.fetch_output(item, tmp_path)
        assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curve.stat().st_size > 1000
    (video,) = outputs[node_of(workflow, "SaveAnimatedWEBP")]["images"]
    assert server.fetch_output(video, tmp_path).stat().st_size > 0


def test_training_takes_its_clips_as_videos_from_core_load_video_nodes_through_miva_clips(server):
    """Core video loaders into MIVA Clips into MIVA Train's clip_videos, in place of its folder (whose value is then
    not checked)."""
    from motion_dials.models.miva import load_adapter

    workflow = tiny_training(tiny_workflow("miva_train_wan21"), "miva_server_videos_test.safetensors")
    names, clips = clips_as_videos(workflow, server, TRAINING_CLIPS)
    outputs = run_prompt(server, workflow)
    adapter = load_adapter(server.miva_dir / "miva_server_videos_test.safetensors")
    assert adapter.info.details["clip_names"] == ",".join(names)
    assert outputs[clips]["text"] == [f"{len(names)} clip{'s' * (len(names) > 1)}: " + ", ".join(names)]
    assert outputs[node_of(workflow, "MIVATrain")]["text"][0].startswith("wrote miva_server_videos_test.safetensors")


def test_unsupported_model_fails_with_a_message_naming_the_supported_families(server):
    workflow = tiny_workflow("dymos_wan21_i2v")
    workflow[node_of(workflow, "UNETLoader")]["inputs"]["unet_name"] = "hunyuan_video_t2v_720p_bf16.safetensors"
    with pytest.raises(PromptFailed, match=r"DyMoSMotionSlider.*supports Wan 2\.1 / 2\.2.*HunyuanVideo 1\.5"):
        run_prompt(server, workflow)


PACK_NODES = ("DyMoSMotionSlider", "EDGMerge", "EDGTimestepSwitch", "MotionDialsModelMergeExtrapolate",
              "MotionDialsDareAddDifference", "MotionDialsReferenceAttentionShare", "MIVALoader", "MIVAStack",
              "MIVAApply", "MIVAConvert", "MIVATrain", "MIVAClips", "MIVAImageToVideoLatent", "MIVANoise", "MIVAAdaIN",
              "MotionDialsGroundingDINOLoader", "MotionDialsSAM2Loader", "MotionDialsSubjectMask",
              "MotionDialsMotionScore", "MotionDialsAttentionInspector", "MotionDialsAttentionDistance")


@pytest.mark.parametrize("node", PACK_NODES)
def test_every_node_sits_in_the_pack_category_with_a_tooltip_on_every_input(server, node):
    info = server.get_json(f"/object_info/{node}")[node]
    assert info["category"].startswith("Motion Dials")
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert inputs
    for name, spec in inputs.items():
        assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"


def test_subject_mask_loaders_list_the_files_of_folders_added_by_extra_model_paths(server):
    # write_extra_model_paths adds the tiny grounding-dino, sam2 and bert-base-uncased folders by these keys
    dino = server.get_json("/object_info/MotionDialsGroundingDINOLoader")["MotionDialsGroundingDINOLoader"]
    assert dino["input"]["required"]["model_name"][1]["options"] == ["groundingdino_tiny_random.pth"]
    sam = server.get_json("/object_info/MotionDialsSAM2Loader")["MotionDialsSAM2Loader"]
    assert sam["input"]["required"]["model_name"][1]["options"] == [
        "sam2.1_hiera_tiny_random.pt", "sam2_hiera_tiny_random.safetensors"]  # configs (.yaml, .cfg.py) not listed
    mask = server.get_json("/object_info/MotionDialsSubjectMask")["MotionDialsSubjectMask"]
    assert mask["category"] == "Motion Dials/M-MIVA" and mask["output"] == ["MASK", "IMAGE"]
    assert mask["input"]["required"]["box_threshold"][1]["default"] == 0.35


def test_subject_mask_runs_through_the_api_and_says_when_nothing_is_found(server, tmp_path):
    workflow = {
        "image": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "dino": {"class_type": "MotionDialsGroundingDINOLoader",
                 "inputs": {"model_name": "groundingdino_tiny_random.pth", "device": "auto", "precision": "fp32"}},
        "sam": {"class_type": "MotionDialsSAM2Loader",
                "inputs": {"model_name": "sam2.1_hiera_tiny_random.pt", "device": "auto", "precision": "fp16"}},
        "mask": {"class_type": "MotionDialsSubjectMask",
                 "inputs": {"image": ["image", 0], "grounding_dino": ["dino", 0], "sam2": ["sam", 0], "prompt": "horse",
                            "box_threshold": 0.0, "text_threshold": 0.25, "mode": "union"}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["mask", 1], "filename_prefix": "subject_mask"}},
        "save_mask": {"class_type": "SaveImage", "inputs": {"images": ["as_image", 0], "filename_prefix": "mask"}},
        "as_image": {"class_type": "MaskToImage", "inputs": {"mask": ["mask", 0]}},
    }
    outputs = run_prompt(server, workflow)
    assert outputs["mask"]["text"][0].startswith("prompt: horse (union") and " at (" in outputs["mask"]["text"][0]
    for node in ("save", "save_mask"):
        (item,) = outputs[node]["images"]
        assert server.fetch_output(item, tmp_path).stat().st_size > 0
    workflow["mask"]["inputs"]["box_threshold"] = 1.0
    outputs = run_prompt(server, workflow)
    assert "WARNING: no 'horse' found in image 1" in outputs["mask"]["text"][0]
    assert "no 'horse' found" in server.log()


def test_switching_between_incompatible_models_fails_before_sampling_with_the_reason(server):
    workflow = tiny_workflow("edg_switch_wan22_i2v")
    late_loader = next(node_id for node_id, node in workflow.items() if node["class_type"] == "UNETLoader"
                       and "low_noise" in node["inputs"]["unet_name"])
    workflow[late_loader]["inputs"]["unet_name"] = "wan2.1_t2v_1.3B_fp16.safetensors"
    with pytest.raises(PromptFailed, match=r"EDGTimestepSwitch.*architecture setting 'in_dim'"):
        run_prompt(server, workflow)
