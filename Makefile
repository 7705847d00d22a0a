# Two entry points for a fresh Linux or macOS machine with Python >= 3.10:
#   make demo   creates .venv, installs the package, runs the demo
#   make test   creates .venv, installs the package with test extras, runs the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch is pinned here, not in the package metadata: a looser requirement
# would pull several GB of CUDA packages on Linux.
TORCH  ?= torch==2.13.0

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m flash_attn_metal demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info
