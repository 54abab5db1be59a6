# kd2 — two commands: `make demo` and `make test`. Both create/reuse .venv and install only
# what is missing (a stamp file records a complete install of the current setup.py).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kd2-install-stamp
# torch and torchvision are installed together, unpinned, so pip picks a matching pair
# (torchvision's Linux wheels need the CUDA-enabled torch of the same release; it runs on CPU).
TORCH_PKGS ?= torch torchvision
# Detectron2 is on no package index: where its source tarball is beside the checkout (CI, the
# project's machines), `make install` builds it offline into .venv; elsewhere see README, 'Install'.
D2_TARBALL ?= ../shared/third_party/detectron2-02b5c4e.tar.gz
D2_BUILD ?= $(VENV)/src/detectron2-02b5c4e
D2_STAMP := $(VENV)/.kd2-detectron2-stamp

.PHONY: install detectron2 test demo lint benchmark clean

install: $(STAMP) detectron2

detectron2: $(STAMP)
	@bash tools/install_detectron2.sh $(PY) $(D2_TARBALL) $(D2_BUILD) $(D2_STAMP)

$(STAMP): setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools<80" wheel
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,hf,foundation]"
	$(PY) -c "import kd2, torch, torchvision; print('kd2 ready: torch', torch.__version__, 'torchvision', torchvision.__version__)"
	@touch $(STAMP)

test: install
	$(VENV)/bin/lint-imports
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
