"""``benchmarks/bench_models.py``: what its FLOP count counts."""

from __future__ import annotations

import os

import torch
from bench_scripts import load
from torch.utils.flop_counter import FlopCounterMode


def test_gflops_count_the_leader_s_attention_per_head_whatever_the_environment(monkeypatch):
    """On a CPU the leader's attention runs ``fusion._ChannelAttention``, whose masked Gram
    matrix ``FlopCounterMode`` counts h× the per-head products. ``_gflops`` counts the
    per-head form, so a leader's GFLOPs are the model's and not the CPU path's: the same
    with the switch unset or set by the caller, smaller than the count on the CPU path, and
    the caller's environment is left as it was."""
    from fuse4seg.models import create_fusion

    bench = load("bench_models")
    cpu = torch.device("cpu")
    model = create_fusion("fuse4seg_tiny")
    monkeypatch.delenv("FUSE4SEG_ATTENTION", raising=False)
    counted = bench._gflops(model, "fusion", 32, cpu, False)
    assert "FUSE4SEG_ATTENTION" not in os.environ
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*bench._inputs("fusion", 1, 32, cpu))  # the CPU path, as the package runs it
    cpu_path = counter.get_total_flops() / 1e9
    assert counted < cpu_path
    monkeypatch.setenv("FUSE4SEG_ATTENTION", "autograd")
    assert bench._gflops(model, "fusion", 32, cpu, False) == counted
    assert os.environ["FUSE4SEG_ATTENTION"] == "autograd"
