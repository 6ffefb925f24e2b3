"""Packaging: ranges in pyproject.toml, exact versions in requirements.lock, and a wheel that works.

pyproject.toml declares compatible ranges (so the package installs into an existing
environment); requirements.lock holds the exact versions the book and the tests run with, and
environment.yml, the Makefile and package.json must agree with it. The slow test builds the
sdist and the wheel, checks them with twine and installs the wheel into a fresh venv from local
wheel files only, then runs the command line from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")


def _pins(requirements: list[str], where: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for text in requirements:
        req = Requirement(text)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{where}: {text!r} is not a pin"
        name = canonicalize_name(req.name)
        assert name not in pins, f"{where}: {req.name} listed twice"
        pins[name] = specs[0].version
    return pins


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def declared_requirements() -> list[Requirement]:
    """The runtime dependencies and every extra of pyproject.toml."""
    project = _pyproject()["project"]
    texts = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        texts.extend(extra)
    return [Requirement(text) for text in texts]


def lock_pins() -> dict[str, str]:
    lines = (line.split("#", 1)[0].strip() for line in LOCK.read_text("utf-8").splitlines())
    return _pins([line for line in lines if line], "requirements.lock")


def environment_yml() -> dict:
    return yaml.safe_load((REPO / "environment.yml").read_text(encoding="utf-8"))


def environment_pins() -> dict[str, str]:
    pip_lists = [dep["pip"] for dep in environment_yml()["dependencies"] if isinstance(dep, dict)]
    assert len(pip_lists) == 1, "environment.yml: expected exactly one `pip:` list"
    return _pins(pip_lists[0], "environment.yml")


def package_version() -> str:
    text = (REPO / "fuse4seg" / "__init__.py").read_text(encoding="utf-8")
    found = re.findall(r'^__version__ = "([^"]+)"$', text, flags=re.M)
    assert len(found) == 1, "fuse4seg/__init__.py: one `__version__ = \"...\"` line"
    return found[0]


def test_pins_parse_by_hand():
    assert _pins(["PyWavelets==1.9.0", "jupyterlab_widgets==3.0.17"], "x") == {
        "pywavelets": "1.9.0",
        "jupyterlab-widgets": "3.0.17",
    }
    with pytest.raises(AssertionError, match="not a pin"):
        _pins(["numpy>=2"], "x")


def test_declared_dependencies_are_ranges_with_a_lower_bound():
    for req in declared_requirements():
        operators = {spec.operator for spec in req.specifier}
        assert "==" not in operators and "===" not in operators, (
            f"pyproject.toml: {req} is an exact pin; pins belong in requirements.lock"
        )
        assert ">=" in operators, f"pyproject.toml: {req} needs a lower bound (the tested one)"


def test_every_locked_version_satisfies_the_declared_range():
    locked = lock_pins()
    for req in declared_requirements():
        name = canonicalize_name(req.name)
        assert name in locked, f"requirements.lock lacks {req.name} (declared as {req})"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock has {req.name}=={locked[name]}, outside the declared {req}"
        )
    assert "fuse4seg" not in locked, "the lock pins the dependencies, not the package itself"


def test_the_lock_keeps_pytest_below_9_2():
    # pytest 9.2 silently drops pytest-xdist's loadgroup (see the Makefile's `test` target)
    assert not SpecifierSet(">=9.2").contains(lock_pins()["pytest"])


def test_environment_yml_lists_the_locked_versions():
    locked, conda = lock_pins(), environment_pins()
    assert set(locked) == set(conda), (
        f"only in requirements.lock: {sorted(set(locked) - set(conda))}; "
        f"only in environment.yml: {sorted(set(conda) - set(locked))}"
    )
    differ = {name: (locked[name], conda[name]) for name in locked if locked[name] != conda[name]}
    assert not differ, f"versions differ (requirements.lock, environment.yml): {differ}"


def test_environment_python_satisfies_requires_python():
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    pythons = [
        dep
        for dep in environment_yml()["dependencies"]
        if isinstance(dep, str) and re.match(r"python[=<> ]", dep)
    ]
    assert len(pythons) == 1, "environment.yml: pin python once, e.g. python=3.11"
    version = re.split(r"[=<> ]+", pythons[0], maxsplit=1)[1]
    assert requires.contains(version + ".0"), f"python {version} vs requires-python {requires}"


def test_makefile_installs_the_locked_versions():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    torch_pins = re.findall(r"torch==([0-9][^\"' ]*)", makefile)
    assert torch_pins, "the Makefile should install a pinned torch before the package"
    assert set(torch_pins) == {lock_pins()["torch"]}
    install = re.findall(r"pip install[^\n]*-e \"\.\[book,test,lab\]\"", makefile)
    assert install and all("-c requirements.lock" in line for line in install), install
    assert re.search(r"^\$\(STAMP\):[^\n]*requirements\.lock", makefile, flags=re.M)


def test_the_version_lives_in_one_place():
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    dynamic = _pyproject()["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "fuse4seg.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", package_version())
    assert "version" not in yaml.safe_load((REPO / "CITATION.cff").read_text("utf-8"))


def test_license_and_citation():
    project = _pyproject()["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text("utf-8").startswith("MIT License\n")
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text("utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["license"] == "MIT" and cff["authors"] and cff["message"]
    titles = " | ".join(ref["title"] for ref in cff["references"])
    for needle in ("Fuse4Seg", "CDDFuse", "Brain Tumor Image Segmentation Benchmark", "BraTS 2021"):
        assert needle in titles, f"CITATION.cff: no reference titled with {needle!r}"
    for ref in cff["references"]:
        assert ref["type"] and ref["authors"], ref["title"]
    readme = (REPO / "README.md").read_text("utf-8")
    assert "## How to cite" in readme and "CITATION.cff" in readme


def test_package_json_pins_match_the_lock_file():
    package = json.loads((REPO / "package.json").read_text(encoding="utf-8"))
    lock = json.loads((REPO / "package-lock.json").read_text(encoding="utf-8"))
    wanted = package["dependencies"]
    assert set(wanted) == {"mathjax", "requirejs", "@jupyter-widgets/html-manager"}
    for name, version in wanted.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"package.json: pin {name} exactly"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version, name
    assert wanted["mathjax"].startswith("3.")
    assert wanted["requirejs"].startswith("2.")
    assert wanted["@jupyter-widgets/html-manager"].startswith("1.")


# --- the built distributions ------------------------------------------------------------------


def _run(cmd: list, *, cwd: Path, env: dict | None = None, timeout: float = 900) -> str:
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result.stdout


def _wheelhouse_root(tmp_path: Path) -> Path:
    """Kept between runs inside the test venv (git-ignored), else per run."""
    if sys.prefix != sys.base_prefix:  # a venv, e.g. make's .venv
        return Path(sys.prefix) / "fuse4seg-wheelhouse"
    return tmp_path / "wheelhouse"


def _wheelhouse(wheel: Path, requires: list[str], tmp_path: Path) -> Path:
    """Wheels of the wheel's dependencies at the locked versions, downloaded once per lock.

    Only the torch CPU build found by pip's configured find-links (as in the Makefile) is used:
    a CUDA build from PyPI would be gigabytes."""
    key = hashlib.sha256(("\n".join(sorted(requires)) + LOCK.read_text("utf-8")).encode())
    house = _wheelhouse_root(tmp_path) / key.hexdigest()[:16]
    if (house / ".complete").is_file():
        return house
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    report = json.loads(
        _run(
            [*pip, "install", "--dry-run", "--quiet", "--ignore-installed", "--no-deps",
             "--report", "-", "-c", LOCK, "torch"],
            cwd=tmp_path,
        )
    )
    url = report["install"][0]["download_info"]["url"]
    if sys.platform.startswith(("linux", "win")) and not (
        url.startswith("file:") or "+cpu" in url
    ):
        pytest.skip(f"no local CPU torch wheel for pip (it would fetch {url})")
    for old in house.parent.glob("*"):  # wheelhouses of earlier locks
        if old != house and old.is_dir():
            shutil.rmtree(old)
    house.mkdir(parents=True, exist_ok=True)
    _run([*pip, "download", "--quiet", "--dest", house, "-c", LOCK, wheel], cwd=tmp_path)
    (house / wheel.name).unlink(missing_ok=True)  # the package itself comes from dist/
    (house / ".complete").touch()
    return house


@pytest.mark.slow
@pytest.mark.xdist_group("packaging")
def test_wheel_builds_checks_and_runs_in_a_fresh_venv(tmp_path):
    pytest.importorskip("build", reason="the packaging test needs `build` (the test extra)")
    pytest.importorskip("twine", reason="the packaging test needs `twine` (the test extra)")
    version = package_version()
    dist = tmp_path / "dist"
    # sdist first, then the wheel from the unpacked sdist: a file missing from either shows up
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, REPO], cwd=tmp_path)
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    assert [p.name for p in sdists] == [f"fuse4seg-{version}.tar.gz"]
    assert [p.name for p in wheels] == [f"fuse4seg-{version}-py3-none-any.whl"]
    _run([sys.executable, "-m", "twine", "check", "--strict", *sdists, *wheels], cwd=tmp_path)

    # every module and data file of the package is in the wheel
    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
        metadata = whl.read(f"fuse4seg-{version}.dist-info/METADATA").decode()
    sources = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "fuse4seg").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        and not any(part.startswith(".") for part in p.relative_to(REPO).parts)
    }
    assert sources - names == set(), f"missing from the wheel: {sorted(sources - names)}"
    assert f"fuse4seg-{version}.dist-info/licenses/LICENSE" in names
    assert "License-Expression: MIT" in metadata
    requires = re.findall(r"^Requires-Dist: (.+)$", metadata, flags=re.M)
    runtime = {str(Requirement(r)) for r in requires if "extra ==" not in r}
    assert runtime == {str(Requirement(r)) for r in _pyproject()["project"]["dependencies"]}
    with tarfile.open(sdists[0]) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for name in ("LICENSE", "CITATION.cff", "requirements.lock", "README.md"):
        assert name in in_sdist, f"{name} is missing from the sdist"

    # a fresh venv, local wheel files only: no index, no pip configuration, no checkout on the path
    house = _wheelhouse(wheels[0], requires, tmp_path)
    fresh = tmp_path / "fresh"
    _run([sys.executable, "-m", "venv", "--without-pip", fresh], cwd=tmp_path)
    bindir = fresh / ("Scripts" if os.name == "nt" else "bin")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", MPLBACKEND="Agg")
    # this venv's pip installs into the fresh one (--python); no byte-compiling saves a minute
    pip = [sys.executable, "-m", "pip", "--python", bindir / "python"]
    _run(
        [*pip, "install", "--quiet", "--no-compile", "--no-index", "--find-links", house,
         wheels[0]],
        cwd=tmp_path, env=env,
    )
    _run([*pip, "check"], cwd=tmp_path, env=env)
    where = _run([bindir / "python", "-c", "import fuse4seg; print(fuse4seg.__file__)"],
                 cwd=tmp_path, env=env)
    assert Path(where.strip()).is_relative_to(fresh), where
    assert _run([bindir / "fuse4seg", "--version"], cwd=tmp_path, env=env).strip() == (
        f"fuse4seg {version}"
    )
    out = tmp_path / "phantom"
    _run([bindir / "fuse4seg", "data", "phantom", "--cases", "1", "--out", out, "--quiet"],
         cwd=tmp_path, env=env)
    assert len(list(out.rglob("*.nii.gz"))) >= 3, sorted(out.rglob("*"))


def test_requires_python_floor_is_one_every_dependency_supports():
    # the installed (locked) releases of the dependencies must run on the lowest Python that
    # requires-python admits; numpy >= 2.3 needs 3.11, so ">=3.10" promised what pip refuses
    from importlib import metadata

    requires = _pyproject()["project"]["requires-python"]
    floor = re.fullmatch(r">=\s*(\d+\.\d+)", requires)
    assert floor, f"requires-python {requires!r}: give a lower bound, e.g. >=3.11"
    lowest = floor.group(1) + ".0"
    refused = {}
    for text in _pyproject()["project"]["dependencies"]:
        name = Requirement(text).name
        needs = metadata.metadata(name).get("Requires-Python")
        if needs and not SpecifierSet(needs).contains(lowest):
            refused[name] = needs
    assert not refused, f"requires-python {requires}, but these need more: {refused}"
