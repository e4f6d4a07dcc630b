# Two commands a newcomer needs (see README):  `make demo`  and  `make test`.
# Every target is idempotent: stamps under .venv/ record what is already installed.
SHELL   := /bin/bash
PYTHON  ?= python3.11
VENV    := .venv
PY      := $(VENV)/bin/python
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# System libraries: FFCV builds against OpenCV + libjpeg-turbo; Fashion-MNIST is the embedded demo set.
APT_PKGS := pkg-config libopencv-dev libturbojpeg0-dev dataset-fashion-mnist
PYTEST_ARGS ?=

.PHONY: install demo test bench gpu-check clean-venv

install: $(VENV)/.installed

$(VENV)/.apt: Makefile
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

$(VENV)/.installed: requirements.txt pyproject.toml $(VENV)/.apt
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Main job on the embedded dataset: a short LeJEPA pretraining on CPU, then a k-shot readout.
demo: install
	$(PY) launchers/local.py --preset cpu-small --time-budget 5 --out runs/demo
	data=$$($(PY) -m pipelines.embedded) && \
	$(PY) evaluation/kshot.py --checkpoint runs/demo --baseline --datasets imagefolder:$$data \
	    --shots 1 10 all --seeds 3 --markdown runs/demo/kshot.md --json runs/demo/kshot.json && \
	$(PY) evaluation/visualize.py --checkpoint runs/demo --baseline --images $$data/test --num-images 4 \
	    --image-size 224 --out runs/demo/pca.png

test: install
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

# Every GPU path once, with its figures (benchmarks/gpu_check.py). Needs no install: on a GPU node it runs with
# the node's own torch/torchvision/timm (and DALI/FFCV when they import); without CUDA it says so and exits 0.
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

bench: install
	$(PY) benchmarks/sigreg.py

clean-venv:
	rm -rf $(VENV)
