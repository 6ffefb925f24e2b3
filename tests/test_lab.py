"""`make lab`: JupyterLab from .venv, the chapters opening as notebooks, the venv's kernel.

The test runs the Makefile's `lab` target itself (with this interpreter's folder as ``BIN`` and
the venv stamp taken as up to date), headless on 127.0.0.1 with a random port and token and
throw-away Jupyter user folders, then asks the server's REST API for a chapter as a notebook
(jupytext's contents manager), for the document viewers JupyterLab is configured with (the
repository's ``jupyter/labconfig``) and for the kernel, and shuts it down.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, token: str, method: str = "GET") -> dict:
    request = urllib.request.Request(
        url, method=method, headers={"Authorization": f"token {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body else {}


@pytest.mark.slow
def test_make_lab_serves_the_chapters_as_notebooks(tmp_path):
    pytest.importorskip("jupyterlab", reason="the `lab` extra is not installed (make venv does)")
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    for name in ("config", "data", "runtime"):  # the user's own Jupyter folders stay untouched
        env[f"JUPYTER_{name.upper()}_DIR"] = str(tmp_path / name)
    lab_args = (
        f"--no-browser --ip=127.0.0.1 --port={port} --ServerApp.port_retries=0 "
        f"--IdentityProvider.token={token} --LabApp.news_url=none "
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"
    )
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI runs as root
        lab_args += " --allow-root"
    command = [
        "make", "--no-print-directory", "-o", ".venv/.installed", "lab",
        f"BIN={Path(sys.executable).parent}", f"LAB_ARGS={lab_args}",
    ]
    log = tmp_path / "lab.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"make lab exited early:\n{log.read_text()[-4000:]}"
            try:
                _get(f"{base}/api/status", token)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"no server after 180 s:\n{log.read_text()}"
                time.sleep(1)

        # a chapter, opened as a notebook through jupytext's contents manager
        model = _get(f"{base}/api/contents/book/01_data.md?type=notebook&content=1", token)
        assert model["type"] == "notebook", model["type"]
        cells = model["content"]["cells"]
        code = [cell for cell in cells if cell["cell_type"] == "code"]
        assert len(cells) > 5 and code, "the chapter came back without cells"
        assert "parameters" in code[0]["metadata"].get("tags", [])
        assert model["content"]["metadata"]["kernelspec"]["name"] == "python3"

        # a double click opens Markdown (MyST) files with jupytext's notebook viewer
        plugin = _get(f"{base}/lab/api/settings/@jupyterlab/docmanager-extension:plugin", token)
        viewers = plugin["schema"]["properties"]["defaultViewers"]["default"]
        assert viewers.get("markdown") == "Jupytext Notebook", viewers
        assert viewers.get("myst") == "Jupytext Notebook", viewers

        # the kernel is this environment's Python (make venv installs the kernelspec)
        specs = _get(f"{base}/api/kernelspecs", token)
        python = specs["kernelspecs"]["python3"]["spec"]["argv"][0]
        assert os.path.samefile(Path(python).parent, Path(sys.executable).parent), python

        _get(f"{base}/api/shutdown", token, method="POST")
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
