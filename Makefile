# Two commands for a fresh machine that has python3, gcc and make:
#   make demo   # trains the demo preset on the bundled data (CPU, a few minutes), then probes it against a random trunk
#   make test   # runs the test suite
# Both create .venv when it is missing. A torch that is already importable (for example a CUDA build on a
# GPU machine) is reused; otherwise the CPU wheel torch==2.13.0 is installed, never a multi-GB CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
DEMO_OUT ?= runs/demo
DEMO_STEPS ?= 160

.PHONY: demo test lint install venv clean bench bench-quick cuda-check triton-check gpu-dry-run compat gpu-wheels bench-cpu

$(PY):
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "reusing the torch of $(PYTHON) (torch $$($(PYTHON) -c 'import torch; print(torch.__version__)'))"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi

venv: $(PY)
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PIP) install -q "torch==$(TORCH_VERSION)"
	@$(PIP) install -q --upgrade "setuptools>=64" wheel ninja

# timm (the parity tests of tests/test_timm_parity.py) goes in without its dependencies: they include torchvision,
# whose wheels pin another torch (a multi-GB CUDA build on a CPU machine). The tests give timm a stand-in for the
# few torchvision names it imports, pinned to what this timm version imports (tests/_torchvision_stub.py).
TIMM_VERSION ?= 1.0.31
install: venv
	$(PIP) install -q --no-build-isolation -e ".[test]"
	@$(PY) -c "import importlib.metadata as m; assert m.version('timm') == '$(TIMM_VERSION)'" 2>/dev/null \
		|| $(PIP) install -q --no-deps "timm==$(TIMM_VERSION)"

# Trains the demo preset, then probes its frozen trunk and a randomly initialised one (same preset, same probe
# settings and images) on the bundled held-out shapes, and prints both top-1 figures (see README: at the demo's scale
# the random trunk is ahead).
demo: install
	$(VENV)/bin/aimv2-train --config configs/demo.toml --out $(DEMO_OUT) --steps $(DEMO_STEPS)
	$(VENV)/bin/aimv2-probe --checkpoint $(DEMO_OUT) --preset aimv2-demo --vs-random --out $(DEMO_OUT)/probe.json --no-progress
	@echo "(At the default 160 steps the random trunk comes out ahead: README, 'Evaluation: the attentive probe', says why, with longer runs.)"

# Compiles every csrc/cuda/*.cu for sm_80 and sm_90a with the machine's nvcc and prints ptxas's register,
# shared-memory and spill report (skipped, with a message, where there is no nvcc).
cuda-check: install
	$(PY) tools/cuda_compile_check.py --archs 80,90a

# Compiles every Triton kernel in every autotune configuration its pruner keeps, for sm_90a and sm_80, without a
# GPU; fails on a compile error, shared memory over the target's limit or a register spill.
triton-check: install
	$(PY) tools/triton_compile_check.py --archs 90a,80

# ruff with the rules of pyproject.toml ([tool.ruff]), then the public functions' type hints
# (tools/check_type_hints.py); .ci/run runs it before the tests. Installs the pinned ruff into the venv (no build).
RUFF_VERSION ?= 0.17.6
lint: venv
	@$(PY) -m ruff --version 2>/dev/null | grep -qx "ruff $(RUFF_VERSION)" || $(PIP) install -q "ruff==$(RUFF_VERSION)"
	$(PY) -m ruff check .
	$(PY) tools/check_type_hints.py

# bench/gpu_check.sh on the CPU at tiny sizes, with the real run's commands and flags (see its header).
gpu-dry-run: install
	PYTHON=$(abspath $(PY)) bash bench/gpu_check.sh --dry-run runs/gpu-dry-run

# The suite, with the CUDA and Triton compile checks and the GPU dry run beside it (each mostly on one core: all
# four take about half the time they take one after the other on 2 cores). The checks' logs go to runs/, their
# last lines are printed at the end, and any failure fails the target.
test: install
	@mkdir -p runs; echo "cuda-check, triton-check and gpu-dry-run run beside the tests (logs in runs/)"
	@$(PY) tools/cuda_compile_check.py --archs 80,90a > runs/cuda-check.log 2>&1 & cuda=$$!; \
	$(PY) tools/triton_compile_check.py --archs 90a,80 --jobs 1 > runs/triton-check.log 2>&1 & check=$$!; \
	PYTHON=$(abspath $(PY)) bash bench/gpu_check.sh --dry-run runs/gpu-dry-run > runs/gpu-dry-run.log 2>&1 & dry=$$!; \
	$(PY) -m pytest -q --durations=20; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; \
	wait $$cuda; curc=$$?; wait $$check; crc=$$?; wait $$dry; drc=$$?; \
	echo "== cuda-check (exit $$curc)"; tail -n 3 runs/cuda-check.log; \
	echo "== triton-check (exit $$crc)"; tail -n 12 runs/triton-check.log; \
	echo "== gpu-dry-run (exit $$drc)"; tail -n 15 runs/gpu-dry-run.log; \
	for code in $$rc $$curc $$crc $$drc; do if [ $$code -ne 0 ]; then exit $$code; fi; done

# The GPU machine's versions (Python 3.12, torch 2.11.0 CUDA build, triton 3.6.0, transformers 5.17.0) in
# .venv-compat: the build with the CUDA extension, the CPU suite, the Triton compile check and the dry run
# (tools/compat.sh; about 5 GB of wheels, 15-25 minutes the first time). Not part of `make test`.
compat:
	bash tools/compat.sh

# The wheels of the benchmark peers that the GPU image lacks (pure Python, for its Python 3.12) into .whl/;
# bench/gpu_check.sh installs them into a temporary folder when the folder travels with the run.
GPU_WHEELS ?= liger-kernel==0.8.5 cut-cross-entropy==25.1.1
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl $(GPU_WHEELS)
	@ls -l .whl

# The compiled CPU kernels against their targets, the references and the peers (a few minutes on 2 cores).
bench-cpu: install
	$(PIP) install -q -e ".[bench]" --no-build-isolation
	$(PY) bench/cpu_check.py --out bench/results

# Every op against its references and peers on this machine's device (CPU here: about 15 minutes on 2 cores):
# bench/results/<device>-<date>.{json,md} and one PNG per op. bench-quick: tiny shapes, a smoke test (~2 min).
bench: install
	$(PIP) install -q -e ".[bench]" --no-build-isolation
	$(PY) bench/run.py --out bench/results

bench-quick: install
	$(PY) bench/run.py --quick --out runs/bench-quick

clean:
	rm -rf build *.egg-info aimv2_kernels/_C*.so runs
