# Two commands do all the set-up on a fresh machine:
#   make train   # environment + CIFAR-10 betons + a real training run (all GPUs, or the cpu preset)
#   make test    # environment + the test suite (CPU only; .ci/run calls exactly this)
# Variables: CIFAR10_SOURCE (torchvision | ImageFolder dir | tarball), DATA_DIR, RUN_DIR,
#            CONFIG (default: configs/resnet18.yaml with a GPU, configs/cpu.yaml without),
#            ARGS (extra key=value overrides), PYTHON, VENV, TORCH_SPEC.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CIFAR10_SOURCE ?= torchvision
DATA_DIR ?= data/cifar10
FFCV_APT := pkg-config libopencv-dev libturbojpeg0-dev

.PHONY: setup data train test
setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	@if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing FFCV's system libraries: $(FFCV_APT)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(FFCV_APT) >/dev/null; \
	  else \
	    echo "FFCV needs system libraries. Run this, then 'make' again:"; \
	    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends $(FFCV_APT)"; \
	    echo "  (conda: conda install -c conda-forge pkg-config opencv libjpeg-turbo)"; exit 1; \
	  fi; \
	fi
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	@# not --no-compile: it saves 20 s here, but where PYTHONDONTWRITEBYTECODE is set (this VM, many containers)
	@# every process then compiles torch's modules again at each import (the suite took 12 min instead of 8.5)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	@# the project and its extras with uv, into the same venv, beside the torch that pip put there (uv keeps it:
	@# it satisfies the range): 21 s with an empty uv cache (FFCV's build in it) against pip's 44 s here;
	@# --compile-bytecode for the reason above
	$(BIN)/python -m pip install -q uv
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -e '.[test,export,sweep,tracking,explain,compress]'
	touch $@

data: setup
	@if [ -f $(DATA_DIR)/manifest.json ]; then echo "betons ready in $(DATA_DIR)"; \
	else $(BIN)/python -m dist_resnet.data.prepare --source $(CIFAR10_SOURCE) --out $(DATA_DIR); fi

train: data
	PATH=$(abspath $(BIN)):$$PATH DATA_DIR=$(DATA_DIR) RUN_DIR=$(RUN_DIR) CONFIG=$(CONFIG) launch/single_node.sh $(ARGS)

test: setup
	@bash tests/services.sh  # shellcheck, PostgreSQL, munge + Slurm: the suite's real services, as root
	@# 3 workers on 2 cores (a third of the suite's time is spent waiting: on Slurm, timeouts, process
	@# start-ups), each taking whole files (module fixtures built once), the longest first, in the order
	@# tests/conftest.py gives them. pytest exits 5 when no test ran: that fails here too, so CI cannot pass
	@# on an empty run
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=25
