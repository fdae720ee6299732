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

.PHONY: demo test install venv clean bench bench-quick cuda-check bench-cpu

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

install: venv
	$(PIP) install -q --no-build-isolation -e ".[test]"

# Trains the demo preset, then probes its frozen trunk and a randomly initialised one (same preset, same probe
# settings and images) on the bundled held-out shapes, and prints both top-1 figures (see README: at the demo's scale
# the random trunk is ahead).
demo: install
	$(VENV)/bin/aimv2-train --preset aimv2-demo --out $(DEMO_OUT) --steps $(DEMO_STEPS) --batch-size 32
	$(VENV)/bin/aimv2-probe --checkpoint $(DEMO_OUT) --preset aimv2-demo --vs-random --out $(DEMO_OUT)/probe.json --no-progress
	@echo "(At the default 160 steps the random trunk comes out ahead: README, 'Evaluation: the attentive probe', says why, with longer runs.)"

# Compiles every csrc/cuda/*.cu for sm_80 and sm_90a with the machine's nvcc and prints ptxas's register,
# shared-memory and spill report (skipped, with a message, where there is no nvcc).
cuda-check: install
	$(PY) tools/cuda_compile_check.py --archs 80,90a

test: install cuda-check
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

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
