"""Other nodes that set ComfyUI's one attention-override slot, before or after the Motion Dials nodes.

A node placed after the slider that overwrites the slot (ComfyUI 0.33.0's ModelAttentionBackend does) must not
silently drop the slider: the core finds it when a model call starts and runs the effects through it.
"""

import importlib

import comfy.ldm.modules.attention as comfy_attention
import pytest
import torch
from sampling import load_tiny, sample_tiny

from motion_dials.nodes.dymos import DyMoSMotionSlider

CASE, STEPS = "wan2.1_t2v", 2
SLOT = "optimized_attention_override"


def slider(model, strength=2.0):
    return DyMoSMotionSlider.execute(model, strength, 1.0, "uniform", 1).result[0]


class CountingAttention:
    """An attention backend: ComfyUI's own attention, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return comfy_attention.optimized_attention.__wrapped__(*args, **kwargs)


def replacing_node(model, backend):
    """A node that puts its own override in the slot, ignoring what was there (as ModelAttentionBackend does)."""
    patched = model.clone()
    patched.model_options["transformer_options"][SLOT] = lambda func, *args, **kwargs: backend(*args, **kwargs)
    return patched


def chaining_node(model, backend):
    """A node that keeps the override it found and calls it with its own attention function."""
    patched = model.clone()
    found = patched.model_options["transformer_options"].get(SLOT)

    def override(func, *args, **kwargs):
        return backend(*args, **kwargs) if found is None else found(backend, *args, **kwargs)

    patched.model_options["transformer_options"][SLOT] = override
    return patched


def backend_nodes():
    """This host's own backend node where it has one, and the two kinds of override other packs set."""
    nodes = {"replacing override": replacing_node, "chaining override": chaining_node}
    advanced = importlib.import_module("comfy_extras.nodes_model_advanced")
    if hasattr(advanced, "ModelAttentionBackend"):
        def model_attention_backend(model, backend):
            real = comfy_attention.get_attention_function
            comfy_attention.get_attention_function = lambda *args, **kwargs: backend
            try:
                return advanced.ModelAttentionBackend().patch(model, "pytorch attention")[0]
            finally:
                comfy_attention.get_attention_function = real
        nodes["ModelAttentionBackend"] = model_attention_backend
    return nodes


NODES = backend_nodes()


@pytest.mark.parametrize("node", list(NODES))
def test_a_backend_after_the_slider_keeps_the_slider_and_is_used(tiny_models, node):
    model = load_tiny(CASE)
    alone = sample_tiny(CASE, slider(model), STEPS)
    backend = CountingAttention()
    after = NODES[node](slider(model), backend)
    torch.testing.assert_close(sample_tiny(CASE, after, STEPS), alone, rtol=1e-5, atol=1e-6)
    assert backend.calls > 0, "the backend chosen after the slider must run the attention"
    assert not torch.allclose(alone, sample_tiny(CASE, model, STEPS), rtol=0, atol=1e-6)


@pytest.mark.parametrize("node", list(NODES))
def test_a_backend_before_the_slider_is_chained(tiny_models, node):
    model = load_tiny(CASE)
    backend = CountingAttention()
    before = slider(NODES[node](model, backend))
    torch.testing.assert_close(sample_tiny(CASE, before, STEPS), sample_tiny(CASE, slider(model), STEPS),
                               rtol=1e-5, atol=1e-6)
    assert backend.calls > 0


def test_a_backend_between_two_sliders_keeps_both(tiny_models):
    model = load_tiny(CASE)
    backend = CountingAttention()
    both = slider(replacing_node(slider(model, 1.0), backend), 1.0)
    torch.testing.assert_close(sample_tiny(CASE, both, STEPS), sample_tiny(CASE, slider(slider(model, 1.0), 1.0),
                                                                             STEPS), rtol=1e-5, atol=1e-6)
    assert backend.calls > 0
