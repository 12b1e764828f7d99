# Two entry points do all set-up on a fresh machine:
#   make demo   installs into .venv and runs the main job on the embedded default
#   make test   installs into .venv (with test tools) and runs the test suite
#
# torch: we install the CPU build torch==2.13.0 first. On machines that carry a
# local wheel of it (find-links) this takes seconds and no CUDA packages; elsewhere
# pip fetches 2.13.0 from PyPI. The project itself only asks torch>=2.2, so pip
# keeps what is there. Override with e.g. `make test TORCH_SPEC=torch` for the newest.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: install demo demo-toy test test-fast test-gpu notebooks bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,sequences]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/difftilt online plugins/sequences/configs/online_ehrlich.yaml

demo-toy: install
	$(VENV)/bin/difftilt finetune plugins/toy/configs/demo.yaml

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The tests that run on a CUDA GPU (skipped elsewhere). The default install is torch's CPU
# build: on a GPU machine start from a fresh clone with `make test-gpu TORCH_SPEC=torch`.
test-gpu: install
	CUDA_VISIBLE_DEVICES=$${CUDA_VISIBLE_DEVICES:-0} $(PY) -m pytest -q -k cuda

notebooks: install
	$(PIP) install -q nbclient ipykernel
	$(PY) notebooks/execute.py notebooks/*.ipynb

bench: install
	$(PY) -m difftilt.benchmarks.toy_exactness

clean:
	rm -rf $(VENV) build dist *.egg-info runs
