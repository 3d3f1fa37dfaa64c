"""M-MIVA subject masks on the tiny random-weight GroundingDINO and SAM 2: loaders, the Subject Mask node, errors."""

import logging
import os
import shutil

import folder_paths
import pytest
import torch
from comfy.model_patcher import ModelPatcher
from tiny_models import ADAPTERS
from tiny_segmenters import GROUNDING_DINO_FILE, SAM2_PT_FILE, SAM2_SAFETENSORS_FILE

from motion_dials.models import segmentation
from motion_dials.models.segmentation import ModelFileError
from motion_dials.nodes.miva import MIVALoader
from motion_dials.nodes.subject_mask import BERT_FOLDER, DINO_FOLDER, SAM2_FOLDER, GroundingDINOLoader, SAM2Loader
from motion_dials.nodes.subject_mask import SubjectMask as Node

HORSE = ADAPTERS[0]


@pytest.fixture(scope="module")
def loaded(tiny_models):
    dino = GroundingDINOLoader.execute(GROUNDING_DINO_FILE, "cpu", "fp32")
    sam = SAM2Loader.execute(SAM2_PT_FILE, "cpu", "fp32")
    return dino, sam


@pytest.fixture(scope="module")
def dino(loaded):
    return loaded[0].result[0]


@pytest.fixture(scope="module")
def sam(loaded):
    return loaded[1].result[0]


def image(batch=1, height=40, width=56, seed=0):
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


def run(dino, sam, picture, prompt="horse", box_threshold=0.35, text_threshold=0.25, mode="best box", stack=None):
    out = Node.execute(picture, dino, sam, prompt, box_threshold, text_threshold, mode, stack)
    mask, preview = out.result
    return mask, preview, out.ui.as_dict()["text"][0]


def test_loaders_read_the_tiny_files_through_folder_paths(loaded, dino, sam, tiny_models):
    dino_out, sam_out = loaded
    assert folder_paths.get_full_path(DINO_FOLDER, GROUNDING_DINO_FILE) == str(tiny_models / DINO_FOLDER /
                                                                                GROUNDING_DINO_FILE)
    assert str(tiny_models / BERT_FOLDER) in folder_paths.get_folder_paths(BERT_FOLDER)
    # the config next to the weights wins over the package's; BERT comes from the registered folder
    assert dino.model.motion_dials_config["config"] == "groundingdino_tiny_random.cfg.py"
    assert dino.model.motion_dials_config["text_encoder_type"] == str(tiny_models / BERT_FOLDER)
    assert dino.model.bert.config.hidden_size == 32 and dino.model.transformer.d_model == 256
    text = dino_out.ui.as_dict()["text"][0]
    assert "groundingdino_tiny_random.cfg.py" in text and "device cpu, fp32" in text
    assert sam.model.image_size == 64 and "sam2.1_hiera_tiny_random.yaml" in sam_out.ui.as_dict()["text"][0]
    for wrapped in (dino, sam):
        assert isinstance(wrapped.patcher, ModelPatcher) and wrapped.patcher.load_device.type == "cpu"
    # the weights are the file's, not the packages' fresh initialisation
    saved = torch.load(tiny_models / SAM2_FOLDER / SAM2_PT_FILE, weights_only=True)["model"]
    assert torch.equal(sam.model.state_dict()["sam_mask_decoder.iou_token.weight"],
                       saved["sam_mask_decoder.iou_token.weight"])
    saved = torch.load(tiny_models / DINO_FOLDER / GROUNDING_DINO_FILE, weights_only=True)["model"]
    for key in ("bert.encoder.layer.0.attention.self.query.weight", "transformer.decoder.norm.weight"):
        assert torch.equal(dino.model.state_dict()[key], saved[key])
    # cached between runs: the same objects again
    assert GroundingDINOLoader.execute(GROUNDING_DINO_FILE, "cpu", "fp32").result[0] is dino
    # the safetensors copy (bare state dict, SAM 2.0 layout) loads too
    other = SAM2Loader.execute(SAM2_SAFETENSORS_FILE, "cpu", "fp32").result[0]
    assert other.model.motion_dials_config["config"] == "sam2_hiera_tiny_random.yaml"


def test_subject_mask_runs_end_to_end_on_a_batch(dino, sam):
    picture = image(batch=2)
    mask, preview, text = run(dino, sam, picture, box_threshold=0.0)
    assert mask.shape == (2, 40, 56) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert preview.shape == (2, 40, 56, 3) and 0.0 <= float(preview.min()) and float(preview.max()) <= 1.0
    # the preview is the image where neither the mask nor a box is, and differs where the mask is
    assert not torch.equal(preview, picture)
    tinted = mask.bool()
    if tinted.any():
        assert not torch.allclose(preview[tinted], picture[tinted])
    assert text.startswith("prompt: horse (best box") and "image 1: horse" in text and "image 2: horse" in text


def test_best_box_is_the_top_box_and_union_is_every_box_over_the_threshold(dino, sam):
    picture = image(seed=3)[0]
    found = segmentation.detect(dino.model, picture, "horse", 0.0, 0.25)
    assert len(found) == 16  # every query of the tiny model passes a threshold of 0
    assert torch.all(found.scores[:-1] >= found.scores[1:]), "best first"
    best, _, _ = run(dino, sam, picture[None], box_threshold=0.0, mode="best box")
    union, _, text = run(dino, sam, picture[None], box_threshold=0.0, mode="union")
    assert torch.equal(best[0].bool(), segmentation.segment(sam.model, picture, found.boxes[:1])[0])
    assert torch.equal(union[0].bool(), segmentation.segment(sam.model, picture, found.boxes).any(dim=0))
    assert bool((union >= best).all()) and union.sum() > best.sum()
    assert text.count("horse 0.") == 16 and text.count(" at (") == 16  # every box is listed
    # a threshold in the middle keeps exactly the boxes scoring above it
    threshold = float(found.scores.median())
    mask, used = segmentation.subject_mask(dino.model, sam.model, picture, "horse", threshold, 0.25, union=True)
    assert len(used) == int((found.scores > threshold).sum()) and 0 < len(used) < 16
    assert torch.equal(used.boxes, found.boxes[: len(used)])
    assert torch.equal(mask.bool(), segmentation.segment(sam.model, picture, used.boxes).any(dim=0))


def test_nothing_found_gives_an_empty_mask_and_a_warning(dino, sam, caplog):
    picture = image(batch=2, seed=5)
    with caplog.at_level(logging.WARNING):
        mask, preview, text = run(dino, sam, picture, box_threshold=1.0, mode="union")
    assert mask.shape == (2, 40, 56) and not mask.any()
    assert torch.equal(preview, picture)  # no box, no tint
    assert "WARNING: no 'horse' found in image 1" in text and "image 2" in text and "mask is empty" in text
    assert any("no 'horse' found" in record.getMessage() for record in caplog.records)


def test_the_prompt_defaults_to_the_subject_of_the_miva_stack(dino, sam, tiny_models):
    stack = MIVALoader.execute(HORSE.file_name, 1.0).result[0]
    assert stack[0].adapter.info.subject == "horse"
    mask, _, text = run(dino, sam, image(), prompt="  ", box_threshold=0.0, stack=stack)
    assert text.startswith("prompt: horse") and mask.any()
    _, _, text = run(dino, sam, image(), prompt="cat", box_threshold=0.0, stack=stack)
    assert text.startswith("prompt: cat")  # a typed prompt wins
    with pytest.raises(ValueError, match="needs a prompt"):
        run(dino, sam, image(), prompt="")


def test_rgba_and_grayscale_images_work(dino, sam):
    rgb = image(seed=7)
    reference, _, _ = run(dino, sam, rgb, box_threshold=0.0)
    rgba = torch.cat([rgb, torch.rand(1, 40, 56, 1)], dim=-1)
    mask, preview, _ = run(dino, sam, rgba, box_threshold=0.0)
    assert torch.equal(mask, reference) and preview.shape == (1, 40, 56, 3)
    gray = rgb[..., :1]
    mask, preview, _ = run(dino, sam, gray, box_threshold=0.0)
    expected, _, _ = run(dino, sam, gray.expand(-1, -1, -1, 3).contiguous(), box_threshold=0.0)
    assert torch.equal(mask, expected) and mask.shape == (1, 40, 56) and preview.shape == (1, 40, 56, 3)


def test_a_missing_weights_file_names_the_file_the_folders_and_where_it_is_published(tiny_models):
    with pytest.raises(FileNotFoundError) as error:
        GroundingDINOLoader.execute("groundingdino_swint_ogc.pth", "cpu", "fp32")
    message = str(error.value)
    assert "'groundingdino_swint_ogc.pth' were not found" in message
    assert str(tiny_models / DINO_FOLDER) in message and "huggingface.co/ShilongLiu/GroundingDINO" in message
    with pytest.raises(FileNotFoundError) as error:
        SAM2Loader.execute("sam2.1_hiera_large.pt", "cpu", "fp32")
    message = str(error.value)
    assert "'sam2.1_hiera_large.pt' were not found" in message and str(tiny_models / SAM2_FOLDER) in message
    assert "facebookresearch/sam2" in message and "sam2.1_hiera_small.pt" in message
    with pytest.raises(FileNotFoundError, match="not found"):
        SAM2Loader.execute("../grounding-dino/" + GROUNDING_DINO_FILE, "cpu", "fp32")


def test_a_missing_bert_folder_names_the_folders_searched_and_the_files(tiny_models, tmp_path, monkeypatch):
    empty, partial = tmp_path / "empty", tmp_path / "partial"
    empty.mkdir()
    partial.mkdir()
    shutil.copy(tiny_models / BERT_FOLDER / "config.json", partial)
    paths = [str(tmp_path / "absent"), str(empty), str(partial)]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, BERT_FOLDER, (paths, set()))
    with pytest.raises(FileNotFoundError) as error:
        GroundingDINOLoader.execute(GROUNDING_DINO_FILE, "cpu", "fp32")
    message = str(error.value)
    assert "config.json, vocab.txt" in message and "google-bert/bert-base-uncased" in message
    assert f"{tmp_path / 'absent'} (not there)" in message
    assert f"{empty} (missing config.json, vocab.txt)" in message and f"{partial} (missing vocab.txt)" in message


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/motion_dials_sam2_pickle_ran",))


def test_a_pickle_that_runs_code_is_refused_without_running(tiny_models, tmp_path, monkeypatch):
    marker = "/tmp/motion_dials_sam2_pickle_ran"
    if os.path.exists(marker):
        os.unlink(marker)
    torch.save({"model": {"image_encoder.x": RunsCode()}}, tmp_path / "sam2.1_hiera_tiny.pt")
    paths, suffixes = folder_paths.folder_names_and_paths[SAM2_FOLDER]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, SAM2_FOLDER, ([str(tmp_path), *paths], suffixes))
    assert "sam2.1_hiera_tiny.pt" in folder_paths.get_filename_list(SAM2_FOLDER)
    with pytest.raises(ModelFileError, match="refused: it is a pickle that holds more than tensors.*never runs code"):
        SAM2Loader.execute("sam2.1_hiera_tiny.pt", "cpu", "fp32")
    assert not os.path.exists(marker)


def test_configs_are_chosen_by_file_name_and_never_run(tmp_path):
    package = segmentation.package_config_dir("sam2") / "configs"
    for name, config in (("sam2.1_hiera_small.pt", "sam2.1/sam2.1_hiera_s.yaml"),
                         ("sam2_hiera_base_plus.pt", "sam2/sam2_hiera_b+.yaml"),
                         ("sam2.1_hiera_large-fp16.safetensors", "sam2.1/sam2.1_hiera_l.yaml"),
                         ("sam2.1_hiera_tiny.pt", "sam2.1/sam2.1_hiera_t.yaml")):
        path = segmentation.sam2_config_path(tmp_path / name)
        assert path == package / config and path.is_file()
    with pytest.raises(ModelFileError, match="No config for SAM 2 weights my_model.pt"):
        segmentation.sam2_config_path(tmp_path / "my_model.pt")
    weights = tmp_path / "groundingdino_swint_ogc.pth"
    package = segmentation.package_config_dir("groundingdino") / "config"
    assert segmentation.grounding_dino_config_path(weights) == package / "GroundingDINO_SwinT_OGC.py"
    assert segmentation.grounding_dino_config_path(tmp_path / "groundingdino_swinb_cogcoor.pth") == (
        package / "GroundingDINO_SwinB_cfg.py")
    beside = tmp_path / "GroundingDINO_SwinT_OGC.cfg.py"
    beside.write_text("hidden_dim = 256\n")
    assert segmentation.grounding_dino_config_path(weights) == beside
    # the package's configs read as literals; code in a config is refused, not run
    settings = segmentation.read_python_config(package / "GroundingDINO_SwinT_OGC.py")
    assert settings["backbone"] == "swin_T_224_1k" and settings["hidden_dim"] == 256
    beside.write_text("import os\nhidden_dim = 256\n")
    with pytest.raises(ModelFileError, match="only `name = value` assignments"):
        segmentation.read_python_config(beside)
    beside.write_text("hidden_dim = __import__('os').getpid()\n")
    with pytest.raises(ModelFileError, match="hidden_dim is not a literal value"):
        segmentation.read_python_config(beside)


def test_on_the_cpu_gpu_is_a_clear_error_and_half_precision_runs_fp32(tiny_models):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="device 'gpu' was chosen but ComfyUI runs on the CPU"):
        SAM2Loader.execute(SAM2_PT_FILE, "gpu", "fp32")
    out = SAM2Loader.execute(SAM2_PT_FILE, "cpu", "bf16")
    assert next(out.result[0].model.parameters()).dtype == torch.float32
    assert "device cpu, fp32 (bf16 is for GPUs)" in out.ui.as_dict()["text"][0]
