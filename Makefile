# Set-up and entry points. Everything runs inside .venv, created on first use (with bubblewrap, the code jail).
#   make demo      set up, then run the staged pipeline on the built-in tiny model (CPU; 13-19 min on 2 cores)
#   make test      set up, then run the test suite (doctests included)
#   make readme-report  after make demo: the demo's report table into README.md
#   make pipeline  the pipeline alone (PIPELINE_CONFIG=...); make sft / long-sft / dpo / long-dpo / grpo / rm / eval-rm
#                  run one stage (SFT_CONFIG=... etc.): each is `python -m pipelines STAGE --config FILE`;
#                  NPROC=N (default 1) launches it on N processes with torchrun, each stage with its YAML's DeepSpeed file
#   make base      rebuild SIZE's base checkpoint (tiny, 7m; GPU recommended, ~12 / ~8 min on one H200; docs/bases.md)
#   make bench     GPU machine only: fast path vs stock transformers (bench/README.md); BENCH_PY=python3 there
#   make bench-rollout  GPU machine only (+ vLLM): rollout speed, weight sync and train/rollout mismatch, vLLM vs HF
#   make bench-released GPU machine only (+ vLLM): the trainer vs vLLM's MiniMaxText01 on released-layout files
#   make bench-cp  GPU machine only: the context-parallel code path at world size 1 and one rank's compute of R
#   make bench-sandbox  CPU: programs/s of the code reward's jail (bubblewrap) for 1, 2, 4 workers
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
SIZE ?= tiny
PIPELINE_CONFIG ?= configs/$(SIZE)/pipeline.yaml
SFT_CONFIG ?= configs/$(SIZE)/sft.yaml
LONG_SFT_CONFIG ?= configs/$(SIZE)/long_sft.yaml
DPO_CONFIG ?= configs/$(SIZE)/dpo.yaml
LONG_DPO_CONFIG ?= configs/$(SIZE)/long_dpo.yaml
GRPO_CONFIG ?= configs/$(SIZE)/grpo.yaml
RM_CONFIG ?= configs/$(SIZE)/rm.yaml
EVAL_RM_CONFIG ?= configs/$(SIZE)/eval_rm.yaml
# Processes per node. 1: a plain process (the default). N > 1: torchrun starts N ranks (one per GPU; gloo on CPU), and
# each stage's Trainer loads its YAML's training.deepspeed file itself (`pip install -e '.[deepspeed]'`). Several
# nodes: TORCHRUN_ARGS='--nnodes 9 --node-rank R --master-addr HOST --master-port 29500' on each node.
NPROC ?= 1
TORCHRUN_ARGS ?= --standalone
LAUNCH := $(if $(filter 1,$(NPROC)),$(PY),$(PY) -m torch.distributed.run $(TORCHRUN_ARGS) --nproc-per-node $(NPROC))

.PHONY: setup jail-tool base demo readme-report pipeline sft long-sft dpo long-dpo grpo rm eval-rm test bench bench-rollout bench-released bench-cp bench-sandbox clean help

help:
	@sed -n '1,12p' Makefile

setup: $(VENV)/.installed jail-tool

# The code reward's jail (rewards/sandbox.py) is bubblewrap: installed from the distribution's packages when `bwrap`
# is missing (apt-get; through sudo when not root), else nothing is done. Without apt-get it says what to install
# and goes on: only the code reward needs it, and that refuses to start without it.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
jail-tool:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "installing bubblewrap (the code reward's jail)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    $(SUDO) apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
	      { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq bubblewrap >/dev/null; }; \
	  else \
	    echo "warning: bwrap not found; the code reward needs it: install bubblewrap (dnf/pacman/zypper install bubblewrap)"; \
	  fi; }

# torch goes first and pinned: on CPU machines torch==$(TORCH_VERSION) is a local CPU build, while an unpinned torch
# pulled in by another package would download gigabytes of CUDA wheels.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,deepspeed]'
	touch $@

# every stage target goes through the one stage registry (pipelines/stages.py)
pipeline: setup
	$(LAUNCH) -m pipelines pipeline --config $(PIPELINE_CONFIG)

sft: setup
	$(LAUNCH) -m pipelines sft --config $(SFT_CONFIG)

long-sft: setup
	$(LAUNCH) -m pipelines long-sft --config $(LONG_SFT_CONFIG)

# offline DPO from the SFT checkpoint (make sft first); long DPO from the DPO checkpoint
dpo: setup
	$(LAUNCH) -m pipelines dpo --config $(DPO_CONFIG)

long-dpo: setup
	$(LAUNCH) -m pipelines long-dpo --config $(LONG_DPO_CONFIG)

grpo: setup
	$(LAUNCH) -m pipelines grpo --config $(GRPO_CONFIG)

# reward model from the SFT checkpoint (make sft first), then its held-out report
rm: setup
	$(LAUNCH) -m pipelines rm --config $(RM_CONFIG)

eval-rm: setup
	$(LAUNCH) -m pipelines eval-rm --config $(EVAL_RM_CONFIG)

demo: setup pipeline
	@echo "demo finished: see $(RUN)/report.md"

# the demo's report table into README.md (between its report markers), so the README quotes a run: after make demo
readme-report: setup
	$(PY) -c "from alignment.reporting import embed_report; embed_report('$(RUN)/report.md', 'README.md')"

test: setup
	$(PY) -m pytest -q -x -rs

# GPU machine only: a python with CUDA torch and the `gpu` extra (no .venv needed there).
BENCH_PY ?= $(PY)
# GPU recommended: rebuild SIZE's base checkpoint (pipelines/pretrain.py, docs/bases.md) in two phases: lookup text
# until the recall circuit forms, then lookups mixed with worked arithmetic. tiny: ~12 min on one H200 (not timed on
# CPU, expect hours); 7m: ~8 min. BASE_PY=python3 on a GPU machine without .venv.
BASE_PY ?= $(PY)
BASE_ARGS_tiny := --steps 5000 --batch 128 --lr 2e-3
BASE_ARGS2_tiny := --steps 3000 --batch 160 --arithmetic-share 0.2 --lr 1e-3
BASE_ARGS_7m := --steps 3000 --batch 128 --lr 2e-3
BASE_ARGS2_7m := --steps 1500 --batch 160 --arithmetic-share 0.2 --lr 1e-3 --save-dtype bfloat16
base: $(if $(filter $(PY),$(BASE_PY)),setup)
	$(if $(BASE_ARGS_$(SIZE)),,$(error make base: no base recipe for SIZE=$(SIZE) (tiny, 7m)))
	$(BASE_PY) -m pipelines.pretrain --model configs/$(SIZE)/model.yaml --out runs/$(SIZE)/base_lookup $(BASE_ARGS_$(SIZE))
	$(BASE_PY) -m pipelines.pretrain --model runs/$(SIZE)/base_lookup --out configs/$(SIZE)/base $(BASE_ARGS2_$(SIZE))

bench:
	$(BENCH_PY) -m bench.bench_train --out bench/results

bench-rollout:
	$(BENCH_PY) -m bench.bench_rollout --out bench/results

bench-released:
	$(BENCH_PY) -m bench.released_vllm --out bench/results

bench-cp:
	$(BENCH_PY) -m bench.bench_context_parallel --out bench/results

# CPU: the code reward's jail, programs/s for 1, 2, 4 workers (bench/results/sandbox_bench.md)
bench-sandbox: setup
	$(PY) -m bench.sandbox_bench --out bench/results

clean:
	rm -rf runs
