# The two commands of the README:   make bench   (the main job)   and   make test
# Each creates .venv on first use: torch==2.13.0 first (a CPU build from local disk on our
# machines; any other torch request pulls a multi-GB CUDA build), then the package and its extras.
# On a GPU machine with its own torch, use that Python instead:  make bench PY=python3
PY ?= .venv/bin/python
VENV_STAMP := .venv/.installed
ARGS ?=

ifeq ($(PY),.venv/bin/python)
SETUP := $(VENV_STAMP)
else
SETUP :=
endif

.PHONY: bench test

bench: $(SETUP)
	$(PY) -m mae_fast.cli bench --report benchmarks/results/latest $(ARGS)

test: $(SETUP)
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)

$(VENV_STAMP): pyproject.toml setup.py
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python -m pip install -q torch==2.13.0 setuptools wheel ninja pybind11
	# no build isolation: setup.py builds against the torch above (an isolated build env would fetch another)
	.venv/bin/python -m pip install -q --no-build-isolation -e ".[test,triton,bench,train,fast]"
	touch $@
