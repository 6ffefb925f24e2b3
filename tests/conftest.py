"""Shared test fixtures.

Real data lives in ``../shared/data`` beside the checkout (or where ``FUSE4SEG_SHARED_DATA``
points). Tests that need it skip with a clear reason where it is absent; the package itself
never reads that folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_book_build():
    """``book/build.py`` (not part of the package) imported as a module, once per process."""
    name = "fuse4seg_book_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "book" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def train_cli_args(data, out, *extra) -> list[str]:
    """Arguments after ``python -m`` for ``fuse4seg train``: Fuse4Seg, smoke profile, no bar, a
    split of 2 training + 1 validation patient on the 3-case phantom (plus ``extra``)."""
    return [
        *("fuse4seg", "train", "--method", "fuse4seg", "--profile", "smoke"),
        *("--data", str(data), "--out", str(out), "--no-progress"),
        *("--set", "data.split_fractions=[0.67, 0.33, 0.0]"),
        *map(str, extra),
    ]


def _shared_data() -> Path:
    env = os.environ.get("FUSE4SEG_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (BraTS cases in three layouts, Harvard pairs, GFP-PC pairs)."""
    path = _shared_data()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent")
    return path


@pytest.fixture(scope="session")
def brats2021_case(shared_data) -> Path:
    return shared_data / "brats" / "BraTS2021_00006"


@pytest.fixture(scope="session")
def brats2023_case(shared_data) -> Path:
    return shared_data / "brats" / "BraTS-GLI-00000-000"


@pytest.fixture(scope="session")
def brats2013_dir(shared_data) -> Path:
    return shared_data / "brats2013"


@pytest.fixture(scope="session")
def harvard_dir(shared_data) -> Path:
    return shared_data / "harvard"


@pytest.fixture(scope="session")
def gfp_dir(shared_data) -> Path:
    return shared_data / "gfp"


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A small phantom dataset (3 cases, seed 0), written once per test session."""
    from fuse4seg.data.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(out, cases=3, seed=0)
    return out


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory) -> Path:
    """The HTML of the ``smoke`` book (``_build/html``), built once per test session.

    ``book/build.py --profile smoke --device cpu --strict`` (what ``make book PROFILE=smoke``
    runs, with Sphinx warnings as errors) into a tmp folder, with the Harvard and GFP pairs of
    the shared data when present (as ``make`` passes them). The phantom is taken from
    ``_build/nbval/phantom`` when ``make test`` has already written it there (the same smoke
    cases), else written in the tmp folder. With ``FUSE4SEG_SMOKE_BOOK=DIR`` an existing smoke
    build's ``html`` folder is used instead.
    """
    given = os.environ.get("FUSE4SEG_SMOKE_BOOK")
    if given:
        html = Path(given)
        assert (html / "index.html").is_file(), f"FUSE4SEG_SMOKE_BOOK={given}: no index.html"
        return html
    if not (REPO / "node_modules").is_dir() and shutil.which("npm") is None:
        pytest.skip("node_modules/ is absent and npm is not installed (needed for MathJax)")
    build = load_book_build()
    out = tmp_path_factory.mktemp("smoke-book")
    phantom = REPO / "_build" / "nbval" / "phantom"
    if not (phantom.is_dir() and build.phantom_case_count(phantom) == build.phantom_cases("smoke")):
        phantom = out / "phantom"
    # --strict: a Sphinx warning (a broken docstring, an ambiguous reference) fails the build
    argv = ["--profile", "smoke", "--device", "cpu", "--out", str(out), "--data-dir", str(phantom),
            "--strict"]
    for option, name in (("--harvard-dir", "harvard"), ("--gfp-dir", "gfp")):
        if (_shared_data() / name).is_dir():
            argv += [option, str(_shared_data() / name)]
    start = time.perf_counter()
    status = build.main(argv)
    assert status == 0, f"book/build.py {' '.join(argv)} failed (its output is above)"
    print(f"smoke book built in {time.perf_counter() - start:.0f} s: {out / 'html'}")
    return out / "html"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """nbval's cells (``make test`` runs the prepared chapters with ``--nbval-lax``; see the
    Makefile) join the "kernels" xdist group: the cells of a notebook share one kernel, so they
    must run in order on one worker, and kernels are started one at a time."""
    for item in items:
        if type(item).__name__ == "IPyNbCell":
            item.add_marker(pytest.mark.xdist_group("kernels"))


def pytest_configure(config):
    """One torch thread per test process: `make test` runs 2 xdist workers on 2 cores, and
    oversubscribed threads make small CPU steps 10-30x slower."""
    import torch

    torch.set_num_threads(1)
