# make demo : high-resolution profile of pvt_fast against the official (reference) model
# make test : the whole test suite (CPU: Triton kernels under TRITON_INTERPRET=1, AOT GPU compiles, host tests)
# make test-oldest : the AOT report and the kernel tests again under the oldest supported torch + triton
# Each target sets up .venv with everything it needs on a fresh machine with python3.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# The CUDA toolkit, where there is one (torch otherwise guesses CUDA_HOME and can guess wrong).
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
MAX_JOBS ?= 2
export TORCH_CUDA_ARCH_LIST MAX_JOBS
ifneq ($(CUDA_HOME),)
export CUDA_HOME
endif

# The oldest supported torch and its triton (what the lent GPU machines run), in a second venv with only
# what the Triton kernels need: the AOT report and the kernels' interpreter tests run there.
OLDEST_VENV ?= .venv-oldest
# numpy < 2.4: triton 3.6's interpreter cannot run loops with runtime bounds on numpy >= 2.4.
OLDEST_PINS ?= torch==2.11.0 triton==3.6.0 numpy==2.3.5
OLDEST_TESTS ?= tests/test_sra_attention.py tests/test_reduce_kv.py tests/test_mlp_dwconv.py

.PHONY: install demo test test-oldest test-fast test-full bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel

$(VENV)/.deps: $(BIN)/python requirements-dev.txt
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/*.cu csrc/*.cpp csrc/*.h csrc/*.cuh)
	$(BIN)/pip install -v --no-build-isolation --no-deps -e . >$(VENV)/build.log 2>&1 \
		|| (tail -60 $(VENV)/build.log; echo "build failed, full log: $(VENV)/build.log"; exit 1)
	grep -E "pvt_fast:|ptxas info|spill" $(VENV)/build.log || true
	$(BIN)/python -c "import pvt_fast"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m pvt_fast profile --model pvt_v2_b2 --size 1024 --compare reference --out profile_out

test: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -rs -m "not aot" -p no:cacheprovider
	$(BIN)/python -m pytest -q -rs -m aot -p no:cacheprovider
	$(BIN)/python -m pytest -q -rs benchmarks/ --benchmark-disable -m "not compiled" -p no:cacheprovider

$(OLDEST_VENV)/.deps: requirements-dev.txt
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install -q $(OLDEST_PINS) wheel $(shell grep -E '^pytest==' requirements-dev.txt)
	touch $@

# No CUDA extension here: it is built for the newest torch (make install) and has no Triton kernel.
$(OLDEST_VENV)/.installed: $(OLDEST_VENV)/.deps setup.py pyproject.toml
	PVT_FAST_BUILD_CUDA=0 $(OLDEST_VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Both parts run even when the first fails; the target fails if either does.
test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
	status=0; \
	$(OLDEST_VENV)/bin/python -m pvt_fast.kernels.report || status=1; \
	TRITON_INTERPRET=1 $(OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(OLDEST_TESTS) || status=1; \
	exit $$status

test-full: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not aot" --runslow
	$(BIN)/python -m pytest -q -m aot
	$(BIN)/python -m pytest -q benchmarks/ --benchmark-disable

bench: install
	$(BIN)/python -m pytest benchmarks/ --benchmark-autosave

clean:
	rm -rf build *.egg-info profile_out
