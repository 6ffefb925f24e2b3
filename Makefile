# The README's two commands: `make book` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= default
# pytest-xdist workers (CI machines have 2 cores)
JOBS ?= 2

.PHONY: help venv book test test-fast lint full clean

help:
	@echo "make book   - set up .venv, make the phantom data, run every chapter (profile=$(PROFILE)), build the HTML book"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make full   - the paper's run: make book PROFILE=paper BRATS_DIR=/path/to/BraTS2021"

venv: $(STAMP)

# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[book,test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/python book/build.py --profile $(PROFILE) $(if $(BRATS_DIR),--brats-dir $(BRATS_DIR))

full:
	$(MAKE) book PROFILE=paper

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check fuse4seg tests benchmarks data_scripts book/build.py

clean:
	rm -rf _build runs _data .pytest_cache
