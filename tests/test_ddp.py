"""Multi-process training with DistributedDataParallel on CPU (gloo), as ``torchrun`` runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_cli_args

from fuse4seg.train.runs import read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_two_processes_gloo_smoke(phantom_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    torchrun = ("torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m")
    train = train_cli_args(phantom_dir, tmp_path, "--device", "cpu")
    cmd = [sys.executable, "-m", *torchrun, *train]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [p for p in tmp_path.iterdir() if p.name.startswith("fuse4seg-")]
    assert len(runs) == 1  # rank 0 alone writes the run folder
    run = runs[0]
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    rows = read_metrics(run)
    assert [r["stage"] for r in rows] == ["warmup", "rollout"]
    assert rows[-1]["leader_updates"] == rows[-1]["steps"]
    assert done.stdout.count("run folder:") == 1  # rank 0 alone reports
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    ema = state["engine"]["ema"]
    assert state["epoch"] == 3 and all(torch.isfinite(v).all() for v in ema.values())
