# Every target installs what it needs into .venv (once; a second call installs nothing).
# On a GPU node whose system Python already has CUDA torch (an NGC container), the venv is
# created with --system-site-packages and reuses that torch / Transformer Engine / Apex.

VENV    ?= .venv
RECIPE  ?= proxy
NPROC   ?= 1
ARGS    ?=
SMOKE   ?=
# PyPI's torch for Python 3.12 (a CUDA build, which also runs on a CPU); PIP_EXTRA="--index-url
# https://download.pytorch.org/whl/cpu" takes the smaller CPU build instead.
TORCH_SPEC ?= torch==2.14.1
PIP_EXTRA  ?=

# The interpreter the venv is made with (megatron-core 0.19 needs Python >= 3.12): PYTHON=, else
# python3 when it is new enough, else python3.12 or python3.13 on the PATH, else pyenv's newest
# 3.12 or 3.13 (pyenv's shims refuse a version that is installed but not selected).
NEW_ENOUGH := -c 'import sys; sys.exit(sys.version_info < (3, 12))'
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell \
	new_enough() { "$$1" $(NEW_ENOUGH) 2>/dev/null; }; \
	if new_enough python3; then echo python3; exit; fi; \
	for minor in 12 13; do \
		if new_enough python3.$$minor; then echo python3.$$minor; exit; fi; \
		version=$$(pyenv versions --bare 2>/dev/null | grep -E "^3\.$$minor\.[0-9]+$$" | sort -V | tail -n 1); \
		if [ -n "$$version" ] && new_enough "$$(pyenv prefix $$version)/bin/python3"; then \
			echo "$$(pyenv prefix $$version)/bin/python3"; exit; fi; \
	done)
endif

BIN := $(VENV)/bin
MP  := $(BIN)/megatron-power
# The versions the tests last passed with (`make constraints` rewrites the file, on purpose): a
# fresh install gets those, not whatever was released since. A container's own packages (the
# system-site venv below) are left as they are.
CONSTRAINTS ?= constraints.txt
PIN = $$([ -f $(VENV)/.system-site ] || echo "-c $(CONSTRAINTS)")
ifeq ($(NPROC),1)
LAUNCH := $(MP)
else
# On Ctrl-C or SIGTERM torchrun forwards the signal and SIGKILLs workers still running after
# --shutdown-timeout (30 s by default): long enough here for them to finish the step and save.
STOP_TIMEOUT ?= 900
LAUNCH := $(BIN)/torchrun --standalone --nproc_per_node $(NPROC) --shutdown-timeout $(STOP_TIMEOUT) -m megatron_power.cli
endif

.PHONY: setup setup-dev setup-plot data check-nproc train submit sweep study convert test bench gpu-check constraints clean-venv

setup: $(VENV)/.installed-base
setup-dev: $(VENV)/.installed-dev
setup-plot: $(VENV)/.installed-plot

$(VENV)/.installed-torch:
	@if [ -z "$(PYTHON)" ]; then echo "error: no Python >= 3.12 found (looked for python3, python3.12 and python3.13 on the PATH and in pyenv): install Python 3.12, or name one with PYTHON=/path/to/python3.12" >&2; exit 1; fi
	@$(PYTHON) $(NEW_ENOUGH) 2>/dev/null || { echo "error: PYTHON=$(PYTHON) is not a Python >= 3.12 (megatron-core 0.19 needs one): name another, or leave PYTHON unset to find one" >&2; exit 1; }
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "Reusing the system's CUDA torch (and TE/Apex if present)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV) && touch $(VENV)/.system-site; \
	else \
		$(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q $(PIP_EXTRA) "$(TORCH_SPEC)"; \
	fi
	@touch $@

$(VENV)/.installed-base: pyproject.toml $(CONSTRAINTS) $(VENV)/.installed-torch
	@$(BIN)/python $(NEW_ENOUGH) || { echo "error: $(VENV) was made with $$($(BIN)/python -V), and megatron-core 0.19 needs Python >= 3.12: run make clean-venv, then this command again" >&2; exit 1; }
	$(BIN)/pip install -q $(PIP_EXTRA) $(PIN) -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml $(CONSTRAINTS) $(VENV)/.installed-base
	$(BIN)/pip install -q $(PIP_EXTRA) $(PIN) -e ".[dev]"
	@touch $@

$(VENV)/.installed-plot: pyproject.toml $(CONSTRAINTS) $(VENV)/.installed-base
	$(BIN)/pip install -q $(PIP_EXTRA) $(PIN) -e ".[plot]"
	@touch $@

data: setup
	$(MP) data

# Checked before anything is installed: torchrun's own refusal of a bad NPROC is a traceback.
check-nproc:
	@case "$(NPROC)" in ''|*[!0-9]*|0*) echo "error: NPROC=$(NPROC) is not a number of processes (expected a positive whole number, e.g. NPROC=4)" >&2; exit 2;; esac

# The recipe and overrides are checked (for NPROC processes) before the default data is built.
train: check-nproc setup
	@$(MP) config $(RECIPE) --world-size $(NPROC) $(if $(SMOKE),--smoke) $(ARGS) > /dev/null
	$(MP) data
	$(LAUNCH) train $(RECIPE) $(if $(SMOKE),--smoke) $(ARGS)

# make submit RECIPE=dense3b NODES=16 [GPUS_PER_NODE=8 PARTITION= ACCOUNT= TIME= CONTAINER=
#             CONTAINER_MOUNTS= CPU=1 SIGNAL_LEAD=180 GPU_MEMORY=80 DRY_RUN=1 ARGS="overrides"]
NODES ?= 1
GPUS_PER_NODE ?= 8
submit: setup
	$(MP) submit $(RECIPE) --nodes $(NODES) --gpus-per-node $(GPUS_PER_NODE) \
		$(if $(PARTITION),--partition $(PARTITION)) $(if $(ACCOUNT),--account $(ACCOUNT)) \
		$(if $(TIME),--time $(TIME)) $(if $(filter-out undefined,$(origin CONTAINER)),--container "$(CONTAINER)") \
		$(if $(CONTAINER_MOUNTS),--container-mounts "$(CONTAINER_MOUNTS)") $(if $(CPU),--cpu) \
		$(if $(SIGNAL_LEAD),--signal-lead $(SIGNAL_LEAD)) $(if $(GPU_MEMORY),--gpu-memory $(GPU_MEMORY)) \
		$(if $(DRY_RUN),--dry-run) $(ARGS)

# make sweep [SPEC=proxy_lr_batch] [ARGS="--jobs 4" | ARGS="--slurm --partition p --time 1:00:00"]
# Runs the grid (again: finished points are skipped), writes results.csv, then fits and plots it.
SPEC ?= proxy_lr_batch
sweep: setup-plot
	@$(MP) sweep $(SPEC) --check $(ARGS) > /dev/null
	$(MP) data
	$(MP) sweep $(SPEC) $(ARGS)

# make study [STUDY=proxy] [ARGS="--jobs 4" | ARGS="--slurm --partition p --time 1:00:00"]
# Power vs tuned WSD and cosine, (a, b) carried to unseen budgets and batches, MoE muTransfer: runs
# what is left (a rerun resumes), then writes study.md, results.csv and figures in runs/studies/<name>.
STUDY ?= proxy
study: setup-plot
	@$(MP) study $(STUDY) --check $(ARGS) > /dev/null
	$(MP) data
	$(MP) study $(STUDY) $(ARGS)

# make convert CKPT=runs/proxy OUT=hf/proxy [ARGS="--dtype fp32 --verify"]
convert: setup-dev
	$(MP) convert to-hf $(CKPT) $(OUT) $(ARGS)

# pytest exits 5 when it collects nothing: that is a broken setup, not a pass.
test: setup-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: setup-dev
	$(BIN)/python bench/train_throughput.py $(ARGS)

# On a GPU machine: the GPU tests, the MFU benchmark (dense3b and moe3b, bf16 and FP8; eager and with
# CUDA graphs) and its profile, in one report folder (runs/gpu-check/report.md). Transformer Engine comes from
# the container, or: $(BIN)/pip install --no-build-isolation -e ".[gpu]"
gpu-check: setup-dev
	$(BIN)/python bench/gpu_check.py $(ARGS)

# After a dependency upgrade that `make test` passes with: pin what is installed now.
constraints:
	{ echo "# Versions the tests last passed with, written by \`make constraints\`; torch is pinned by TORCH_SPEC."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -e '^torch==' -e '^#'; } > $(CONSTRAINTS)

clean-venv:
	rm -rf $(VENV)
