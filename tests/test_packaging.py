"""The pins of pyproject.toml, environment.yml, the Makefile and package.json agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
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


def pyproject_pins() -> dict[str, str]:
    project = _pyproject()["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    return _pins(requirements, "pyproject.toml")


def environment_yml() -> dict:
    return yaml.safe_load((REPO / "environment.yml").read_text(encoding="utf-8"))


def environment_pins() -> dict[str, str]:
    pip_lists = [dep["pip"] for dep in environment_yml()["dependencies"] if isinstance(dep, dict)]
    assert len(pip_lists) == 1, "environment.yml: expected exactly one `pip:` list"
    return _pins(pip_lists[0], "environment.yml")


def test_pins_parse_by_hand():
    assert _pins(["PyWavelets==1.9.0", "jupyterlab_widgets==3.0.17"], "x") == {
        "pywavelets": "1.9.0",
        "jupyterlab-widgets": "3.0.17",
    }
    with pytest.raises(AssertionError, match="not a pin"):
        _pins(["numpy>=2"], "x")


def test_environment_yml_has_the_pyproject_pins():
    ours, conda = pyproject_pins(), environment_pins()
    assert set(ours) == set(conda), (
        f"only in pyproject.toml: {sorted(set(ours) - set(conda))}; "
        f"only in environment.yml: {sorted(set(conda) - set(ours))}"
    )
    differ = {name: (ours[name], conda[name]) for name in ours if ours[name] != conda[name]}
    assert not differ, f"pins differ (pyproject, environment.yml): {differ}"


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


def test_makefile_installs_the_pinned_torch():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    torch_pins = re.findall(r"torch==([0-9][^\"' ]*)", makefile)
    assert torch_pins, "the Makefile should install a pinned torch before the package"
    assert set(torch_pins) == {pyproject_pins()["torch"]}


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
