"""Tiny random-weight GroundingDINO, BERT and SAM 2 in the published file layouts, for the subject-mask tests.

Each model is built by the packages' own code (groundingdino-py, sam2, transformers) from a small config, with the
packages' own random initial weights, and saved as the published files are:

    grounding-dino/groundingdino_tiny_random.pth       {"model": state_dict}, as groundingdino_swint_ogc.pth
    grounding-dino/groundingdino_tiny_random.cfg.py    the config, as GroundingDINO_SwinT_OGC.cfg.py (tiny sizes)
    bert-base-uncased/                                 config.json, vocab.txt, tokenizer_config.json,
                                                       model.safetensors, as google-bert/bert-base-uncased
    sam2/sam2.1_hiera_tiny_random.pt  (+ .yaml)        {"model": state_dict}, as sam2.1_hiera_tiny.pt
    sam2/sam2_hiera_tiny_random.safetensors (+ .yaml)  the bare state dict, as the safetensors copies people share

The GroundingDINO config keeps every key of the package's SwinT config and shrinks the sizes; its Swin backbone is
given by ``swin_params`` (see models/segmentation.py); its width stays 256, which the package hard-codes in places.
The SAM 2 configs are the package's sam2.1 / sam2 tiny YAML files with the widths, depths and image size shrunk
(64 px input, 16 px image-embedding stride).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

GROUNDING_DINO_FILE = "groundingdino_tiny_random.pth"
SAM2_PT_FILE = "sam2.1_hiera_tiny_random.pt"
SAM2_SAFETENSORS_FILE = "sam2_hiera_tiny_random.safetensors"
BERT_FOLDER = "bert-base-uncased"
SEED = 41
DECODER_GAIN = 1 / 16

TINY_DINO = dict(
    hidden_dim=256, nheads=8, dim_feedforward=64, enc_layers=1, dec_layers=1, num_queries=16, dn_labelbook_size=8,
    swin_params=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7),
)
TINY_BERT = dict(
    architectures=["BertModel"], model_type="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=128, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.02, pad_token_id=0,
)
WORDS = ("a", "the", "and", "of", "horse", "waterfall", "dog", "cat", "person", "car", "bird", "river", "running")


def vocab() -> list[str]:
    """Special tokens first (as bert-base-uncased: [PAD] = 0), then words, letters, digits and '##' pieces, so every
    lower-case ASCII word has a word-piece spelling."""
    letters = list(string.ascii_lowercase + string.digits)
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(".,?!'-") + list(WORDS)
            + [c for c in letters if c not in WORDS] + ["##" + c for c in letters])


def dino_config_text() -> str:
    """The package's SwinT config, every key kept, with the sizes of TINY_DINO."""
    from motion_dials.models.segmentation import package_config_dir, read_python_config

    settings = read_python_config(package_config_dir("groundingdino") / "config" / "GroundingDINO_SwinT_OGC.py")
    settings.update(TINY_DINO)
    lines = ['"""GroundingDINO at tiny sizes, random weights (Motion Dials tests); keys of the SwinT config."""']
    lines += [f"{key} = {value!r}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def sam2_config(version: str):
    """The package's tiny config of ``version`` (sam2 or sam2.1), shrunk."""
    from omegaconf import OmegaConf

    from motion_dials.models.segmentation import package_config_dir

    config = OmegaConf.load(package_config_dir("sam2") / "configs" / version / f"{version}_hiera_t.yaml")
    model = config.model
    trunk, neck = model.image_encoder.trunk, model.image_encoder.neck
    trunk.embed_dim, trunk.num_heads, trunk.stages = 8, 1, [1, 1, 2, 1]  # q-pooling at blocks 1, 2, 4
    trunk.global_att_blocks, trunk.window_spec = [3], [4, 4, 2, 2]
    trunk.window_pos_embed_bkg_spatial_size = [4, 4]
    neck.d_model, neck.backbone_channel_list = 32, [64, 32, 16, 8]
    neck.position_encoding.num_pos_feats = 32
    attention = model.memory_attention
    attention.d_model, attention.num_layers = 32, 1
    attention.layer.d_model, attention.layer.dim_feedforward = 32, 64
    for part in (attention.layer.self_attention, attention.layer.cross_attention):
        part.embedding_dim, part.feat_sizes = 32, [4, 4]
    attention.layer.cross_attention.kv_in_dim = 16
    encoder = model.memory_encoder
    encoder.out_dim, encoder.in_dim = 16, 32
    encoder.position_encoding.num_pos_feats = 16
    encoder.mask_downsampler.embed_dim = 32
    encoder.fuser.layer.dim, encoder.fuser.num_layers = 32, 1
    model.image_size, model.num_maskmem = 64, 2
    return config


def write_bert(folder: Path, seed: int) -> None:
    import torch
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    words = vocab()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    (folder / "config.json").write_text(json.dumps({**TINY_BERT, "vocab_size": len(words)}, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 128}) + "\n")
    torch.manual_seed(seed)
    BertModel(BertConfig.from_pretrained(str(folder), local_files_only=True)).save_pretrained(str(folder))


def generate(out: Path) -> dict:
    """Writes the files under ``out``; returns manifest entries as tests/tiny_models.py writes them."""
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from motion_dials.models.segmentation import construct_grounding_dino, construct_sam2

    manifest = {}
    bert = out / BERT_FOLDER
    write_bert(bert, SEED)
    manifest[f"{BERT_FOLDER}/"] = {"family": "bert", "role": "GroundingDINO's text encoder folder", "template": "",
                                   "dtype": "float32"}

    dino_dir = out / "grounding-dino"
    dino_dir.mkdir(parents=True, exist_ok=True)
    config = dino_dir / GROUNDING_DINO_FILE.replace(".pth", ".cfg.py")
    config.write_text(dino_config_text())
    torch.manual_seed(SEED + 1)
    dino = construct_grounding_dino(config, bert)  # BERT's weights from the folder, the rest the package's init
    state = dino.state_dict()
    # The box scores are sigmoids of dot products of 256-wide unit-scale features: saturated at 1 for random
    # weights. A small gain on the decoder's output norm spreads them over (0, 1), as a trained model's are.
    state["transformer.decoder.norm.weight"] = state["transformer.decoder.norm.weight"] * DECODER_GAIN
    torch.save({"model": state}, dino_dir / GROUNDING_DINO_FILE)
    manifest[f"grounding-dino/{GROUNDING_DINO_FILE}"] = {"family": "groundingdino", "role": "text -> boxes",
                                                         "template": "", "dtype": "float32"}

    sam_dir = out / "sam2"
    sam_dir.mkdir(parents=True, exist_ok=True)
    for file_name, version, seed in ((SAM2_PT_FILE, "sam2.1", SEED + 2), (SAM2_SAFETENSORS_FILE, "sam2", SEED + 3)):
        path = sam_dir / file_name
        OmegaConf.save(sam2_config(version), path.with_suffix(".yaml"))
        torch.manual_seed(seed)
        state = construct_sam2(path.with_suffix(".yaml")).state_dict()
        if path.suffix == ".pt":
            torch.save({"model": state}, path)
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        manifest[f"sam2/{file_name}"] = {"family": version, "role": "box -> mask", "template": "", "dtype": "float32"}
    return manifest


def main():
    import argparse

    if __package__:
        from .host import import_host
    else:
        from host import import_host

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import_host()
    for path in generate(args.out):
        target = args.out / path
        size = sum(f.stat().st_size for f in target.rglob("*")) if target.is_dir() else target.stat().st_size
        print(f"{path:<50} {size / 2**20:6.2f} MiB")


if __name__ == "__main__":
    main()
