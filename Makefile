# Two commands do all set-up on a fresh machine:
#   make demo   - run every notebook end to end on the tiny CPU model, independent ones side by side (executed
#                 copies in runs/notebooks)
#   make test   - unit tests + every notebook in smoke mode
#   make class  - every notebook in class mode: the models as recorded in data/class, no training (a few minutes)
# Both create .venv when missing and install a CPU torch pinned to 2.13.0 when no torch is present
# (an unpinned torch would pull a multi-GB CUDA build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.entruth-installed
BROWSER := $(VENV)/.entruth-browser
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)  # -n: never wait for a password
TORCH_CPU ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test class record-class unit notebooks-smoke setup strip build-tiny clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[notebooks,dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# the browser test (tests/test_browser.py) drives JupyterLab in headless chromium: installed here when missing
$(BROWSER): $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; } || \
	  echo "no chromium: the browser test will be skipped (install chromium and chromium-driver)"
	touch $(BROWSER)

demo: $(STAMP)
	$(VENV)/bin/entruth-lite notebooks run --out runs/notebooks

# tests side by side, one per core (pytest-xdist; conftest gives each one math thread); a module's shared fixtures
# stay on one worker (--dist loadgroup)
XDIST := -n auto --dist loadgroup

test: $(STAMP) $(BROWSER)
	$(PY) -m pytest $(XDIST)

class: $(STAMP)
	$(VENV)/bin/entruth-lite notebooks run --class --out runs/notebooks-class

record-class: $(STAMP)
	$(VENV)/bin/entruth-lite notebooks record-class --runs runs

unit: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not notebooks"

notebooks-smoke: $(STAMP)
	$(VENV)/bin/entruth-lite notebooks run --smoke --out runs/notebooks-smoke

strip: $(STAMP)
	$(VENV)/bin/entruth-lite notebooks strip

build-tiny: $(STAMP)
	$(VENV)/bin/entruth-lite zoo build-tiny

clean:
	rm -rf runs .pytest_cache
