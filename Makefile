# Set-up and entry points. Everything runs inside .venv, created on first use.
#   make demo      set up, then run the staged pipeline on the built-in tiny model (CPU; ~13-15 min on 2 cores)
#   make test      set up, then run the test suite
#   make pipeline  the pipeline alone (PIPELINE_CONFIG=...); make sft / long-sft / dpo / long-dpo / grpo / rm / eval-rm
#                  run one stage
#   make bench     GPU machine only: fast path vs stock transformers (bench/README.md); BENCH_PY=python3 there
#   make bench-rollout  GPU machine only (+ vLLM): rollout speed, weight sync and train/rollout mismatch, vLLM vs HF
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Tiny CPU runs: one thread per process (2 threads on a busy 2-core box are 5-14x slower).
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

RUN ?= runs/tiny
SFT_CONFIG ?= configs/tiny/sft.yaml
LONG_SFT_CONFIG ?= configs/tiny/long_sft.yaml
GRPO_CONFIG ?= configs/tiny/grpo.yaml
PIPELINE_CONFIG ?= configs/tiny/pipeline.yaml
DPO_CONFIG ?= configs/tiny/dpo.yaml
LONG_DPO_CONFIG ?= configs/tiny/long_dpo.yaml
RM_CONFIG ?= configs/tiny/rm.yaml
EVAL_RM_CONFIG ?= configs/tiny/eval_rm.yaml

.PHONY: setup base demo pipeline sft long-sft dpo long-dpo grpo rm eval-rm test bench bench-rollout clean help

help:
	@sed -n '1,7p' Makefile

setup: $(VENV)/.installed

# torch goes first and pinned: on CPU machines torch==$(TORCH_VERSION) is a local CPU build, while an unpinned torch
# pulled in by another package would download gigabytes of CUDA wheels.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

sft: setup
	$(PY) -m pipelines.sft --config $(SFT_CONFIG)

long-sft: setup
	$(PY) -m pipelines.sft --config $(LONG_SFT_CONFIG)

# offline DPO from the SFT checkpoint (make sft first); long DPO from the DPO checkpoint
dpo: setup
	$(PY) -m pipelines.dpo --config $(DPO_CONFIG)

long-dpo: setup
	$(PY) -m pipelines.dpo --config $(LONG_DPO_CONFIG)

grpo: setup
	$(PY) -m pipelines.grpo --config $(GRPO_CONFIG)

# reward model from the SFT checkpoint (make sft first), then its held-out report
rm: setup
	$(PY) -m pipelines.rm --config $(RM_CONFIG)

eval-rm: setup
	$(PY) -m pipelines.eval_rm --config $(EVAL_RM_CONFIG)

pipeline: setup
	$(PY) -m pipelines.run --config $(PIPELINE_CONFIG)

demo: setup pipeline
	@echo "demo finished: see $(RUN)/report.md"

test: setup
	$(PY) -m pytest -q -x -rs

# GPU machine only: a python with CUDA torch and the `gpu` extra (no .venv needed there).
BENCH_PY ?= $(PY)
# GPU recommended (~12 min on one H200; not timed on CPU, expect hours): rebuild the tiny base checkpoint (pipelines/pretrain.py) in two
# phases: lookup text until the recall circuit forms, then lookups mixed with worked arithmetic
base: setup
	$(PY) -m pipelines.pretrain --out runs/tiny/base_lookup --steps 5000 --batch 128 --lr 2e-3
	$(PY) -m pipelines.pretrain --model runs/tiny/base_lookup --out configs/tiny/base --steps 3000 \
		--batch 160 --arithmetic-share 0.2 --lr 1e-3

bench:
	$(BENCH_PY) -m bench.bench_train --out bench/results

bench-rollout:
	$(BENCH_PY) -m bench.bench_rollout --out bench/results

clean:
	rm -rf runs
