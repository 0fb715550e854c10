# `make test` and `make bench` each build their own environment on a fresh machine.
# torch is installed first and pinned: an unpinned torch (or one pulled in by another
# package) would fetch several GB of CUDA wheels on a CPU-only machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.installed

.PHONY: test bench venv csrc-check clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test,bench]"
	$(PY) -m pip install -q --no-deps verl==0.9.1 tensordict==0.10.0 pyvers==0.1.0
	$(PY) -m pip install -q --no-deps peft==0.21.2 megatron-core==0.16.1
	# OpenRLHF's model code only (tests/openrlhf_oracle.py loads it without flash_attn / deepspeed):
	# its other requirements (flash-attn, deepspeed, vllm, ray ...) do not build or are not needed here.
	$(PY) -m pip install -q --no-deps openrlhf==0.11.2
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m bench.run

csrc-check:
	bash csrc/compile_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
