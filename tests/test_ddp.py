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
    """Two gloo ranks train one run: rank 0 alone writes and reports it; the ranks train on
    different warm-up batches and still end with the same networks (the gradients are
    all-reduced: without DDP's reduction the ranks' parameters would part ways)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    torchrun = ("torch.distributed.run", "--nproc_per_node", "2", "--standalone")
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    train = train_cli_args(phantom_dir, tmp_path, "--device", "cpu")[1:]  # after "fuse4seg"
    cmd = [sys.executable, "-m", *torchrun, str(REPO / "tests" / "ddp_ranks.py"), str(ranks),
           *train]
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

    r0, r1 = (torch.load(ranks / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # each rank trained on its own shard of the warm-up batches
    assert r0["warmup_batches"] and len(r0["warmup_batches"]) == len(r1["warmup_batches"])
    assert r0["warmup_batches"] != r1["warmup_batches"]
    # ... and both ended with the same leader and follower, which rank 0 saved
    assert r0["params"].keys() == r1["params"].keys()
    assert any(k.startswith("leader.") for k in r0["params"])
    for key, value in r0["params"].items():
        assert torch.equal(value, r1["params"][key]), key
    # ... which training moved (equal ranks would also follow from no training at all)
    moved = [k for k, v in r0["params"].items() if not torch.equal(v, r0["before"][k])]
    assert any(k.startswith("leader.") for k in moved)
    assert any(k.startswith("follower.") for k in moved)
    for key, value in state["engine"]["leader"].items():
        assert torch.equal(value, r0["params"][f"leader.{key}"]), key
