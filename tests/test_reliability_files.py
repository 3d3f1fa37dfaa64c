"""Model configs are data: crafted SAM 2 and GroundingDINO configs that try to run code are refused by the pack's
real loaders, naming the file and the key, and their payloads never run; the legitimate configs build exactly as the
packages' own code builds them.

Every payload tries to create a marker file in the test's tmp_path. The control test shows two of them live with
Hydra's ``instantiate``, which the pack used before: Hydra 1.3.8's own blocklist stops ``os.system``, ``exec`` and the
like, but not ``torch.load`` reached through a sam2 module, nor the import of whatever module a ``_target_`` names.
"""

import contextlib
import os
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file
from sampling import load_tiny
from test_miva import authors_layout
from tiny_models import ADAPTERS, adapter_info, random_adapter_tensors
from tiny_segmenters import BERT_FOLDER, GROUNDING_DINO_FILE, SAM2_PT_FILE, SAM2_SAFETENSORS_FILE

import motion_dials.nodes.miva as miva_nodes
from motion_dials.models import segmentation
from motion_dials.models.miva import AdapterFormatError, load_adapter, save_adapter
from motion_dials.models.segmentation import ModelFileError
from motion_dials.nodes.miva import MIVAConvert

MARKER = "payload_ran"
SAM2_CONFIG = SAM2_PT_FILE.replace(".pt", ".yaml")
DINO_CONFIG = GROUNDING_DINO_FILE.replace(".pth", ".cfg.py")
PROBE_MODULE = "motion_dials_probe_payload"  # a module in tmp_path whose import creates the marker
# sam2.build_sam.build_sam2's overrides for image prediction, which the pack applies too
EXTRA_ARGS = {"dynamic_multimask_via_stability": True, "dynamic_multimask_stability_delta": 0.05,
              "dynamic_multimask_stability_thresh": 0.98}


class RunsCode:
    def __init__(self, marker):
        self.command = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.command,))


def touch(tmp_path) -> str:
    return f"touch {tmp_path / MARKER}"


def pickle_payload(tmp_path) -> str:
    path = tmp_path / "payload.pt"
    torch.save(RunsCode(tmp_path / MARKER), path)
    return str(path)


def probe_module(tmp_path) -> str:
    (tmp_path / f"{PROBE_MODULE}.py").write_text(f"import pathlib\npathlib.Path({str(tmp_path / MARKER)!r}).touch()\n")
    return PROBE_MODULE


def whole(**model):
    """A config whose model is ``model`` (values that are functions are called with tmp_path)."""
    def edit(config, tmp_path):
        return {"model": {key: value(tmp_path) if callable(value) else value for key, value in model.items()}}
    return edit


def edited(where: str, remove=(), **values):
    """The tiny model's config with, at the dotted path ``where``, the keys ``remove`` dropped and ``values`` set."""
    def edit(config, tmp_path):
        node = config
        for key in where.split("."):
            node = node[key]
        for key in remove:
            del node[key]
        node.update({key: value(tmp_path) if callable(value) else value for key, value in values.items()})
        return config
    return edit


def text(source: str):
    """A config file's text, MARKER standing for the marker's path."""
    return lambda config, tmp_path: source.replace("MARKER", str(tmp_path / MARKER))


TRUNK = "model.image_encoder.trunk"
SAM2_REFUSED = [
    pytest.param(whole(_target_="sam2.build_sam.torch.load", f=pickle_payload, weights_only=False),
                 "model._target_", "'sam2.build_sam.torch.load' is not one of the classes",
                 id="torch.load-through-a-sam2-module-on-a-pickle"),
    pytest.param(whole(_target_="sam2.build_sam.os.system", command=touch),
                 "model._target_", "'sam2.build_sam.os.system' is not one", id="os.system-through-a-sam2-module"),
    pytest.param(whole(_target_="os.system", command=touch), "model._target_", "'os.system' is not one",
                 id="os.system"),
    pytest.param(whole(_target_="builtins.exec", _args_=lambda tmp: [f"import os; os.system({touch(tmp)!r})"]),
                 "model._target_", "'builtins.exec' is not one", id="builtins.exec"),
    pytest.param(whole(_target_="builtins.eval", _args_=lambda tmp: [f"__import__('os').system({touch(tmp)!r})"]),
                 "model._target_", "'builtins.eval' is not one", id="builtins.eval"),
    pytest.param(whole(_target_="subprocess.run", args=lambda tmp: ["touch", str(tmp / MARKER)]),
                 "model._target_", "'subprocess.run' is not one", id="subprocess.run"),
    pytest.param(whole(_target_="importlib.import_module", name=probe_module),
                 "model._target_", "'importlib.import_module' is not one", id="importlib.import_module"),
    pytest.param(whole(_target_=lambda tmp: f"{probe_module(tmp)}.anything"),
                 "model._target_", f"'{PROBE_MODULE}.anything' is not one", id="a-module-on-sys.path"),
    pytest.param(edited(TRUNK, _target_="sam2.build_sam.os.system", command=touch),
                 f"{TRUNK}._target_", "'sam2.build_sam.os.system' is not one", id="nested-target-in-the-trunk"),
    pytest.param(edited("model.image_encoder.neck",
                        fpn_top_down_levels=lambda tmp: [{"_target_": "os.system", "command": touch(tmp)}]),
                 "model.image_encoder.neck.fpn_top_down_levels[0]._target_", "'os.system' is not one",
                 id="nested-target-in-a-list"),
    pytest.param(edited("model.memory_encoder.fuser.layer", _target_="sam2.build_sam.torch.load",
                        f=pickle_payload, weights_only=False),
                 "model.memory_encoder.fuser.layer._target_", "'sam2.build_sam.torch.load' is not one",
                 id="nested-torch.load-built-after-valid-parts"),
    pytest.param(lambda config, tmp: {**config, "trainer": {"_target_": "os.system", "command": touch(tmp)}},
                 "trainer._target_", "'os.system' is not one", id="target-in-a-section-not-built"),
    pytest.param(edited("model", _target_=["sam2.modeling.sam2_base.SAM2Base"]), "model._target_",
                 "['sam2.modeling.sam2_base.SAM2Base'] is not one", id="target-not-text"),
    pytest.param(edited("model", _partial_=True), "model._partial_", "_partial_ is a Hydra instruction",
                 id="_partial_"),
    pytest.param(edited(TRUNK, _args_=[8]), f"{TRUNK}._args_", "_args_ is a Hydra instruction", id="_args_"),
    pytest.param(edited("model.memory_attention", _recursive_=False), "model.memory_attention._recursive_",
                 "_recursive_ is a Hydra instruction", id="_recursive_"),
    pytest.param(edited("model", _convert_="all"), "model._convert_", "_convert_ is a Hydra instruction",
                 id="_convert_"),
    pytest.param(edited("model.image_encoder.neck", _set_={"a": 1}), "model.image_encoder.neck._set_",
                 "_set_ is a Hydra instruction", id="other-underscore-key"),
    pytest.param(edited(TRUNK, embed_dim="${oc.env:HOME}"), f"{TRUNK}.embed_dim",
                 "'${oc.env:HOME}': ${...} interpolations and resolvers are not read", id="resolver"),
    pytest.param(edited("model.memory_attention", d_model="${model.memory_attention.layer.d_model}"),
                 "model.memory_attention.d_model", "interpolations and resolvers are not read",
                 id="interpolation"),
    pytest.param(edited("model.image_encoder.neck", fpn_interp_model="near${est}"),
                 "model.image_encoder.neck.fpn_interp_model", "interpolations and resolvers are not read",
                 id="interpolation-inside-text"),
    pytest.param(edited("model.memory_encoder", **{"${oc.env:HOME}": 1}), "model.memory_encoder.${oc.env:HOME}",
                 "is not a plain name", id="interpolation-in-a-key"),
    pytest.param(edited(TRUNK, embed_dimension=8), f"{TRUNK}.embed_dimension",
                 "Hiera takes no argument 'embed_dimension'", id="unknown-argument"),
    pytest.param(edited("model.memory_attention.layer.self_attention", head_count=1),
                 "model.memory_attention.layer.self_attention.head_count",
                 "RoPEAttention takes no argument 'head_count'", id="unknown-argument-of-a-class-with-kwargs"),
    pytest.param(edited("model.memory_attention", remove=["d_model"]), "model.memory_attention",
                 "MemoryAttention needs d_model", id="missing-argument"),
    pytest.param(edited("model.memory_attention.layer.cross_attention", remove=["embedding_dim"]),
                 "model.memory_attention.layer.cross_attention", "RoPEAttention needs embedding_dim",
                 id="missing-argument-of-the-base-class"),
    pytest.param(edited(TRUNK, weights_path=pickle_payload), f"{TRUNK}.weights_path",
                 "Hiera's weights_path would read a file the config names", id="hiera-weights_path"),
    pytest.param(whole(_target_="sam2.modeling.memory_encoder.CXBlock", dim=8), "model._target_",
                 "the model must be sam2.modeling.sam2_base.SAM2Base", id="model-not-SAM2Base"),
    pytest.param(edited(TRUNK, stages=lambda tmp: {1, 2}), f"{TRUNK}.stages", "a set value is not read",
                 id="python-set"),
    pytest.param(text("notes:\n  day: 2024-01-01\nmodel:\n  _target_: sam2.modeling.sam2_base.SAM2Base\n"),
                 "notes.day", "a date value is not read", id="yaml-date"),
    pytest.param(text("parts: &a [1, 2]\nmore: [*a, *a]\nmodel:\n  _target_: sam2.modeling.sam2_base.SAM2Base\n"),
                 "more[0]", "a YAML alias (*name) repeats a part", id="yaml-alias"),
]


@pytest.fixture
def sam2_files(tiny_models, tmp_path):
    """The tiny SAM 2 weights in tmp_path (linked), and its config as data, to be written beside them."""
    weights = tmp_path / SAM2_PT_FILE
    weights.symlink_to(tiny_models / "sam2" / SAM2_PT_FILE)
    config = yaml.safe_load((tiny_models / "sam2" / SAM2_CONFIG).read_text())
    return weights, config


@pytest.fixture
def nothing_built(monkeypatch):
    """Fails the test if the builder is reached: a refused config is refused before any class is constructed."""
    def refuse_to_build(*args):
        raise AssertionError("the builder was reached")

    monkeypatch.setattr(segmentation, "_build_sam2_node", refuse_to_build)


@pytest.mark.parametrize(("edit", "key", "problem"), SAM2_REFUSED)
def test_a_sam2_config_that_is_not_the_packages_data_is_refused_and_runs_nothing(sam2_files, tmp_path, edit, key,
                                                                                 problem, monkeypatch, nothing_built):
    monkeypatch.syspath_prepend(str(tmp_path))
    weights, config = sam2_files
    crafted = edit(config, tmp_path)
    (tmp_path / SAM2_CONFIG).write_text(crafted if isinstance(crafted, str) else
                                        yaml.dump(crafted, sort_keys=False))
    with pytest.raises(ModelFileError) as error:
        segmentation.build_sam2(weights)
    message = str(error.value)
    assert f"SAM 2 config {SAM2_CONFIG}, {key}: " in message and problem in message
    assert "use the sam2 package's config" in message and "SAM2Base, ImageEncoder, Hiera" in message
    assert not (tmp_path / MARKER).exists() and PROBE_MODULE not in sys.modules


@pytest.mark.parametrize("source", [
    pytest.param("model: !!python/object/apply:os.system ['touch MARKER']\n", id="python-tag"),
    pytest.param("model:\n  _target_: sam2.modeling.sam2_base.SAM2Base\n  x: [\n", id="broken-yaml"),
])
def test_a_sam2_config_that_is_not_plain_yaml_cannot_be_read(sam2_files, tmp_path, source, nothing_built):
    weights, _ = sam2_files
    (tmp_path / SAM2_CONFIG).write_text(source.replace("MARKER", str(tmp_path / MARKER)))
    with pytest.raises(ModelFileError, match=f"(?s)SAM 2 config {SAM2_CONFIG} cannot be read .*{SAM2_CONFIG}.*line"):
        segmentation.build_sam2(weights)
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("edit", [
    pytest.param(whole(_target_="sam2.build_sam.torch.load", f=pickle_payload, weights_only=False), id="torch.load"),
    pytest.param(whole(_target_=lambda tmp: f"{probe_module(tmp)}.anything"), id="module-import"),
])
def test_the_payloads_are_live_hydras_instantiate_runs_them(tmp_path, edit, monkeypatch):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    monkeypatch.syspath_prepend(str(tmp_path))
    config = OmegaConf.create(edit(None, tmp_path))
    try:
        with contextlib.suppress(InstantiationException):  # the module has no `anything`: imported all the same
            instantiate(config.model, _recursive_=True)
    finally:
        sys.modules.pop(PROBE_MODULE, None)
    assert (tmp_path / MARKER).exists()


def hydra_reference(config_path):
    """The model Hydra's ``instantiate`` builds from a config, with sam2.build_sam's image-prediction overrides."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config = OmegaConf.load(config_path)
    config.model.sam_mask_decoder_extra_args = EXTRA_ARGS
    return instantiate(config.model, _recursive_=True).eval()


def assert_same_model(ours, reference):
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert list(ours_state) == list(reference_state)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    for key, tensor in ours_state.items():
        assert tensor.dtype == reference_state[key].dtype and torch.equal(tensor, reference_state[key]), key
    for name in ("image_size", "num_maskmem", "sam_mask_decoder_extra_args", "use_high_res_features_in_sam"):
        assert getattr(ours, name) == getattr(reference, name), name


@pytest.mark.parametrize("weights", [SAM2_PT_FILE, SAM2_SAFETENSORS_FILE])
def test_the_tiny_models_configs_build_as_hydra_builds_them(tiny_models, weights):
    config = tiny_models / "sam2" / (weights.rsplit(".", 1)[0] + ".yaml")
    torch.manual_seed(7)
    ours = segmentation.construct_sam2(config)
    torch.manual_seed(7)
    assert_same_model(ours, hydra_reference(config))
    assert ours.motion_dials_config == {"config": config.name} and not ours.training
    assert ours.sam_mask_decoder.dynamic_multimask_via_stability is True
    assert ours.sam_mask_decoder.dynamic_multimask_stability_delta == 0.05
    assert ours.sam_mask_decoder.dynamic_multimask_stability_thresh == 0.98
    assert float(ours.memory_encoder.fuser.layers[0].gamma[0]) == pytest.approx(1e-6)  # YAML's `1e-6`, a number
    built = segmentation.build_sam2(tiny_models / "sam2" / weights)  # and the weights file matches it exactly
    assert built.image_size == 64


def test_the_tiny_config_round_tripped_through_the_test_harness_builds(sam2_files, tmp_path):
    weights, config = sam2_files
    (tmp_path / SAM2_CONFIG).write_text(yaml.dump(config, sort_keys=False))
    assert segmentation.build_sam2(weights).motion_dials_config == {"config": SAM2_CONFIG}


PACKAGE_CONFIGS = [f"{version}/{version}_hiera_{size}.yaml" for version in ("sam2", "sam2.1")
                   for size in ("t", "s", "b+", "l")]


def test_the_allowed_classes_are_exactly_those_the_packages_configs_name():
    targets = set()

    def collect(node):
        if isinstance(node, dict):
            targets.update([node["_target_"]] if "_target_" in node else [])
            node = list(node.values())
        for item in node if isinstance(node, list) else ():
            collect(item)

    folder = segmentation.package_config_dir("sam2") / "configs"
    for name in PACKAGE_CONFIGS:
        source = (folder / name).read_text()
        assert "${" not in source
        collect(yaml.safe_load(source))
    assert targets == set(segmentation.sam2_classes())
    assert len(targets) == 12


@pytest.mark.parametrize("name", PACKAGE_CONFIGS)
def test_each_package_config_builds_as_sam2_build_sam_builds_it(name):
    from sam2.build_sam import build_sam2

    torch.manual_seed(3)
    ours = segmentation.construct_sam2(segmentation.package_config_dir("sam2") / "configs" / name)
    torch.manual_seed(3)
    reference = build_sam2(f"configs/{name}", ckpt_path=None, device="cpu")
    assert_same_model(ours, reference)


# ------------------------------------------------------------------------------------------------ GroundingDINO


DINO_REFUSED = [
    pytest.param("import os\nos.system('touch MARKER')\n", "line 1: only `name = value`", id="import"),
    pytest.param("hidden_dim = 256\n__import__('os').system('touch MARKER')\n", "line 2: only `name = value`",
                 id="a-call-statement"),
    pytest.param("hidden_dim = __import__('os').system('touch MARKER')\n", "line 1: hidden_dim is not a literal",
                 id="__import__"),
    pytest.param("hidden_dim = 256\nnheads = print('touch MARKER')\n", "line 2: nheads is not a literal",
                 id="a-function-call"),
    pytest.param("backbone = lambda: __import__('os').system('touch MARKER')\n", "line 1: backbone is not a literal",
                 id="lambda"),
    pytest.param("backbone = (lambda: __import__('os').system('touch MARKER'))()\n",
                 "line 1: backbone is not a literal", id="lambda-called"),
    pytest.param("text_encoder_type = f\"{__import__('os').system('touch MARKER')}\"\n",
                 "line 1: text_encoder_type is not a literal", id="f-string"),
    pytest.param("backbone = ''.__class__.__mro__[1].__subclasses__()\n", "line 1: backbone is not a literal",
                 id="attribute-access"),
    pytest.param("hidden_dim = 256\nenc_layers = hidden_dim\n", "line 2: enc_layers is not a literal",
                 id="a-name"),
    pytest.param("swin_params = dict(embed_dim=__import__('os').system('touch MARKER'))\n",
                 "line 1: swin_params is not a literal", id="call-inside-dict()"),
    pytest.param("exec(\"__import__('os').system('touch MARKER')\")\n", "line 1: only `name = value`", id="exec"),
    pytest.param("def backbone():\n    return __import__('os').system('touch MARKER')\n",
                 "line 1: only `name = value`", id="def"),
    pytest.param("hidden_dim: int = __import__('os').system('touch MARKER')\n", "line 1: only `name = value`",
                 id="annotated-assignment"),
    pytest.param("hidden_dim = nheads = __import__('os').system('touch MARKER')\n", "line 1: only `name = value`",
                 id="chained-assignment"),
]


@pytest.mark.parametrize(("source", "problem"), DINO_REFUSED)
def test_a_grounding_dino_config_with_code_is_refused_and_never_run(tiny_models, tmp_path, source, problem):
    weights = tmp_path / GROUNDING_DINO_FILE
    weights.symlink_to(tiny_models / "grounding-dino" / GROUNDING_DINO_FILE)
    (tmp_path / DINO_CONFIG).write_text(source.replace("MARKER", str(tmp_path / MARKER)))
    with pytest.raises(ModelFileError) as error:
        segmentation.build_grounding_dino(weights, tiny_models / BERT_FOLDER)
    assert f"GroundingDINO config {DINO_CONFIG}, {problem}" in str(error.value)
    assert not (tmp_path / MARKER).exists()


# ------------------------------------------------------------------------------------------------ MIVA adapters


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_an_adapter_with_non_finite_tensors_is_refused_naming_the_tensor(tmp_path, bad):
    info = adapter_info(ADAPTERS[1])
    tensors = random_adapter_tensors(info, 4)
    tensors["blocks.1.cfa.o.up"][3, 0] = bad
    path = tmp_path / "diverged.safetensors"
    save_file(tensors, str(path), metadata=info.to_metadata())
    with pytest.raises(AdapterFormatError, match=r"diverged.safetensors: blocks.1.cfa.o.up holds NaN or infinite"):
        load_adapter(path)


def test_miva_convert_keeps_an_existing_adapter_unless_overwrite_is_on(tiny_models):
    info = adapter_info(ADAPTERS[1])
    source = tiny_models / "miva" / "reliability_training_output.safetensors"
    target = tiny_models / "miva" / "reliability_existing.safetensors"
    existing = random_adapter_tensors(info, 8)
    try:
        save_file(authors_layout(random_adapter_tensors(info, 9), info), str(source))
        save_adapter(target, info, existing)
        before = target.read_bytes()
        arguments = (source.name, "waterfall", "waterfall", info.base, info.heads, target.stem)
        with pytest.raises(FileExistsError, match="reliability_existing.safetensors already exists.*overwrite on"):
            MIVAConvert.execute(*arguments)
        assert target.read_bytes() == before
        MIVAConvert.execute(*arguments, overwrite=True)
        assert not torch.equal(load_adapter(target).blocks[0].cfa.query.down, existing["blocks.0.cfa.q.down"])
    finally:
        source.unlink(missing_ok=True)
        target.unlink(missing_ok=True)


def test_miva_loader_checks_the_adapter_against_its_model_before_reading_a_tensor(tiny_models, monkeypatch):
    info = adapter_info(ADAPTERS[0], dim=512, heads=4)
    path = tiny_models / "miva" / "reliability_too_wide.safetensors"
    save_adapter(path, info, random_adapter_tensors(info, 2))
    monkeypatch.setattr(miva_nodes, "load_adapter", lambda *args: pytest.fail("the tensors were read"))
    miva_nodes._load_cached.cache_clear()
    try:
        with pytest.raises(ValueError, match="reliability_too_wide.safetensors was made for .*width 512, 4 heads"):
            miva_nodes.MIVALoader.execute(path.name, 1.0, None, load_tiny("wan2.1_t2v"))
    finally:
        path.unlink()
