# kd2 — two commands: `make demo` and `make test`. Both create/reuse .venv and install only
# what is missing (a stamp file records a complete install of the current setup.py).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kd2-install-stamp
# torch and torchvision are installed together, unpinned, so pip picks a matching pair
# (torchvision's Linux wheels need the CUDA-enabled torch of the same release; it runs on CPU).
TORCH_PKGS ?= torch torchvision

.PHONY: install test demo lint benchmark clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools<80" wheel
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(PY) -c "import kd2, torch, torchvision; print('kd2 ready: torch', torch.__version__, 'torchvision', torchvision.__version__)"
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) tools/demo.py

benchmark: install
	$(PY) benchmarks/step_overhead.py

lint: install
	$(VENV)/bin/ruff check kd2 tools tests benchmarks
	$(VENV)/bin/ruff format --check kd2 tools tests benchmarks

clean:
	rm -rf build *.egg-info output
