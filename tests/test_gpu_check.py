"""``benchmarks/gpu_check.sh`` (issue 9, part 5) runs: a smoke test on CPU with tiny sizes.

Not a timing. On a lent GPU the script benchmarks the train step at the paper's size and runs
chapters 2-4 on CUDA; here it runs the same code paths with ``--device cpu``, 32×32 slices and
the ``smoke`` profile's models, and only chapter 4 (the training chapter; chapters 2 and 3 run
in ``tests/test_chapters.py``), and we check that its outputs are written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from bench_scripts import load

REPO = Path(__file__).resolve().parents[1]

# it starts a Jupyter kernel: the same xdist group as the chapter tests (see test_chapters.py)
pytestmark = pytest.mark.xdist_group("kernels")


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_with_tiny_sizes(tmp_path):
    out = tmp_path / "gpu_check"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "CHAPTER_TIMEOUT": "600",
        "BENCH_TIMEOUT": "300",
        "OMP_NUM_THREADS": "1",
    }
    args = [
        "bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--device", "cpu",
        "--size", "32", "--batch", "2", "--inner-steps", "1", "--profile", "smoke",
        "--models", "profile", "--variants", "eager", "--repeats", "1", "--chapters", "04",
    ]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (out / "bench_train_step.md").read_text()
    assert "| eager |" in table and "failed" not in table
    assert "# eager: 3 outer steps (" in table  # the profile of where the step's time goes
    assert (out / "machine.txt").is_file()
    assert (out / "chapters" / "04_bilevel_training.ipynb").is_file()
    assert "chapter 04_bilevel_training: ok" in log
    # what the device tool brings back: at most 8 files, none deeper than OUT/a/b/file
    files = [f.relative_to(out) for f in out.rglob("*") if f.is_file()]
    assert len(files) <= 8 and all(len(f.parts) <= 3 for f in files), files
    scratch = next(line for line in log.splitlines() if "scratch " in line).split("scratch ")[1]
    assert not Path(scratch.strip()).exists()  # the phantom, runs and caches are removed


def test_gpu_wheels_fetches_the_locked_versions_for_the_gpu_machines_python(tmp_path):
    """``gpu_wheels.sh`` asks pip for each package the GPU image lacks at the version of
    requirements.lock, as CPython 3.12 manylinux wheels without dependencies (a stub
    interpreter records the call; no download)."""
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {calls}\n')
    stub.chmod(0o755)
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_wheels.sh"), str(tmp_path / "whl")],
        env={**os.environ, "PYTHON": str(stub)}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    args = calls.read_text().splitlines()
    assert args[:3] == ["-m", "pip", "download"]
    assert "--no-deps" in args and args[args.index("--python-version") + 1] == "3.12"
    pins = [a for a in args if "==" in a]
    lock = set((REPO / "requirements.lock").read_text().splitlines())
    assert pins and set(pins) <= lock
    names = {pin.split("==")[0].lower().replace("_", "-") for pin in pins}
    assert {"papermill", "jupytext", "ipykernel", "nibabel", "nilearn", "pywavelets"} <= names
    assert "torch" not in names and "numpy" not in names  # the image has them


def test_bench_train_step_measures_cpu_bf16_only_when_asked(capsys):
    """``--cpu-bf16``: the amp rows are timed under CPU bf16 autocast; without it they say why
    they were skipped (training ignores ``train.amp`` on CPU)."""
    bench_train_step = load("bench_train_step")
    args = ["--device", "cpu", "--size", "32", "--batch", "2", "--inner-steps", "1",
            "--profile", "smoke", "--variants", "eager,amp", "--repeats", "1", "--warmup", "1"]
    assert bench_train_step.main(args) == 0
    assert "| amp | skipped: AMP is off on CPU in training |" in capsys.readouterr().out
    assert bench_train_step.main([*args, "--cpu-bf16"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| amp |")]
    assert len(rows) == 1 and "skipped" not in rows[0] and "failed" not in rows[0]


def test_bench_train_step_traces_the_variant_asked_for(capsys):
    """``--trace N --trace-variant NAME`` profiles NAME, not the first variant; a variant that
    did not run is said, and the first one is traced instead."""
    bench_train_step = load("bench_train_step")
    args = ["--device", "cpu", "--size", "32", "--batch", "2", "--inner-steps", "1",
            "--profile", "smoke", "--variants", "eager,cl", "--repeats", "1", "--warmup", "1",
            "--trace", "3"]
    assert bench_train_step.main([*args, "--trace-variant", "cl"]) == 0
    out = capsys.readouterr().out
    assert "# cl: 3 outer steps (" in out and "# eager: 3 outer steps" not in out
    assert bench_train_step.main([*args, "--trace-variant", "amp"]) == 0
    out = capsys.readouterr().out
    assert "# --trace-variant amp did not run: tracing eager" in out
    assert "# eager: 3 outer steps (" in out


def test_bench_train_step_can_switch_the_followers_average_off():
    bench_train_step = load("bench_train_step")
    import argparse

    import torch

    args = argparse.Namespace(size=64, batch=2, inner_steps=1, fusion=None, segmentation=None,
                              profile="default")
    cpu = torch.device("cpu")
    assert bench_train_step.build(args, "eager", cpu).follower_ema is not None  # the profile's
    assert bench_train_step.build(args, "no_follower_ema", cpu).follower_ema is None


def _before_and_shipped(monkeypatch, variant: str, switch: str):
    """The engines of ``variant`` (the code before a CPU change, built under ``switch``) and
    of ``eager`` (as shipped), at the smoke profile; the switch is set for the build only."""
    import argparse

    import torch

    bench_train_step = load("bench_train_step")
    monkeypatch.delenv(switch, raising=False)
    args = argparse.Namespace(size=32, batch=2, inner_steps=1, fusion=None, segmentation=None,
                              profile="smoke")
    cpu = torch.device("cpu")
    before = bench_train_step.build(args, variant, cpu)
    assert switch not in os.environ
    return before, bench_train_step.build(args, "eager", cpu)


def test_bench_train_step_loop_adamw_builds_torchs_default_optimisers(monkeypatch):
    loop, shipped = _before_and_shipped(monkeypatch, "loop_adamw", "FUSE4SEG_ADAMW")
    for learner in (loop.follower, loop.leader):
        assert not learner.opt.param_groups[0]["fused"]
    for learner in (shipped.follower, shipped.leader):
        assert learner.opt.param_groups[0]["fused"] is True


def test_bench_train_step_nchw_leader_keeps_the_leaders_weights_in_nchw(monkeypatch):
    import torch

    nchw, shipped = _before_and_shipped(monkeypatch, "nchw_leader", "FUSE4SEG_LEADER_LAYOUT")
    cl = torch.channels_last
    assert nchw.leader_module.head[0].weight.is_contiguous()
    assert not nchw.leader_module.head[0].weight.is_contiguous(memory_format=cl)
    assert shipped.leader_module.head[0].weight.is_contiguous(memory_format=cl)


def test_bench_train_step_static_compile_trains_the_optimisers_parameters():
    """``compile_static``: both networks compiled with ``dynamic=False``, wrapping the very
    parameters their optimisers update (so a timed step is a real training step)."""
    bench_train_step = load("bench_train_step")
    import argparse

    import torch

    from fuse4seg.train.engine import unwrap

    args = argparse.Namespace(size=32, batch=2, inner_steps=1, fusion=None, segmentation=None,
                              profile="smoke")
    engine = bench_train_step.build(args, "compile_static", torch.device("cpu"))
    for learner in (engine.leader, engine.follower):
        assert learner.net is not unwrap(learner.net)  # wrapped by torch.compile
        held = {id(p) for group in learner.opt.param_groups for p in group["params"]}
        assert held == {id(p) for p in learner.net.parameters()}
        assert held == {id(p) for p in unwrap(learner.net).parameters()}
    # compile_graphs: both compiled (reduce-overhead), every step marked as a new one
    engine = bench_train_step.build(args, "compile_graphs", torch.device("cpu"))
    for learner in (engine.leader, engine.follower):
        assert learner.net is not unwrap(learner.net)
        held = {id(p) for group in learner.opt.param_groups for p in group["params"]}
        assert held == {id(p) for p in unwrap(learner.net).parameters()}
    case = bench_train_step.Case.__new__(bench_train_step.Case)
    marks = []
    case.variant = "compile_graphs"
    with mock.patch.object(torch.compiler, "cudagraph_mark_step_begin",
                           lambda: marks.append(1)):
        case._mark()
        case.variant = "compile"
        case._mark()
    assert marks == [1]
    # compile_leader: the leader alone is compiled, the follower stays eager
    engine = bench_train_step.build(args, "compile_leader", torch.device("cpu"))
    assert engine.leader.net is not unwrap(engine.leader.net)
    assert engine.follower.net is unwrap(engine.follower.net)


def test_step_anatomy_parts_and_the_trainer_split(phantom_dir, capsys):
    """``benchmarks/step_anatomy.py`` on tiny sizes and the ``smoke`` profile: every part of a
    follower update is reported; in the trainer's split each step fetched its batch once (and
    no other draw, e.g. the stage change's reference, counts as a batch), every epoch ended
    once, and the timed parts do not add up to more than the run's wall time."""
    step_anatomy = load("step_anatomy")
    argv = ["--profile", "smoke", "--sizes", "16", "32", "--batch", "2", "--inner-steps", "1",
            "--repeats", "1", "--warmup", "1"]
    assert step_anatomy.main(argv) == 0
    out = capsys.readouterr().out
    for part in (*step_anatomy.PARTS, "warm-up step", "outer step"):
        assert f"| {part} |" in out
    import argparse

    split = step_anatomy.trainer_split(argparse.Namespace(
        profile="smoke", data=str(phantom_dir), warmup_epochs=None, rollout_epochs=None,
        val_every=None))
    assert split["steps"] > 0 and split["epochs"] == 2  # the smoke profile: 1 + 1 epochs
    assert split["calls"]["steps"] == split["calls"]["batches"] == split["steps"]
    assert split["calls"]["end of epoch"] == split["epochs"]
    assert split["seconds"]["batches"] > 0 and split["seconds"]["rest"] >= 0
    assert "| all (wall) |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        step_anatomy.main(["--sizes", "64", "16"])
    assert stop.value.code == 2
    assert "--sizes must be distinct and increasing" in capsys.readouterr().err


def test_probe_gpu_leader_compares_its_variants_to_amp_on_the_same_weights(capsys):
    """``probe_gpu_leader.py`` on a CPU at a tiny size: one row per variant, each patch
    computing the same x_f as the package's leader to float rounding, the patched classes
    restored afterwards, and a variant that needs CUDA (graphs) said to have failed."""
    from fuse4seg.models import fusion
    from fuse4seg.models.layers import LayerNorm2d

    probe = load("probe_gpu_leader")
    forwards = (LayerNorm2d.forward, fusion.TransposedAttention.forward,
                fusion.DepthwiseConv2d.forward)
    variants = "amp,amp_ln_nchw,amp_attn,amp_best,amp_graph"
    assert probe.main(["--device", "cpu", "--size", "16", "--batch", "1", "--repeats", "1",
                       "--fusion", "fuse4seg_tiny", "--variants", variants, "--trace", "2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines()
            if line.startswith("| amp")}
    assert "# amp: 3 calls, " in out and "# amp: by input shape" in out  # --trace: amp only
    assert "# fp32:" not in out
    assert set(rows) == set(variants.split(","))
    assert "failed" in rows["amp_graph"]
    for name in ("amp_ln_nchw", "amp_attn", "amp_best"):
        assert float(rows[name].split("|")[5]) < 1e-4, rows[name]
    assert forwards == (LayerNorm2d.forward, fusion.TransposedAttention.forward,
                        fusion.DepthwiseConv2d.forward)
