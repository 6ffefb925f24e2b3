"""Checkpoint I/O (atomic, weights_only), RNG capture, the EMA of Eq. 4 and the cosine schedule."""

from __future__ import annotations

import copy
import pickle
import random

import numpy as np
import pytest
import torch

from fuse4seg.train.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from fuse4seg.train.engine import (
    Learner,
    ModelEMA,
    NonFiniteLossError,
    adamw,
    check_finite,
    cosine_lr,
    fetch,
)


def test_roundtrip_weights_only_and_no_temp_files(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": net.state_dict(),
        "opt": opt.state_dict(),
        "history": [{"epoch": 1, "loss": 0.5, "stage": "warmup"}],
        "best": None,
        "rng": capture_rng(),
    }
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint(path, state)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["weight"], net.weight)
    assert back["history"] == state["history"]
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(back["opt"])


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_load_rejects_unsafe_and_foreign_files(tmp_path):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": CHECKPOINT_FORMAT, "x": _Evil()}, protocol=2))
    with pytest.raises(ValueError, match="not a readable fuse4seg checkpoint: it holds Python "
                       "objects other than tensors"):
        load_checkpoint(evil)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a fuse4seg checkpoint"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    # the reason in a line, not torch's advice to load with weights_only=False
    objects = tmp_path / "objects.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "steps": range(3)}, objects)
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    for path, why in ((objects, "holds Python objects other than tensors"),
                      (text, "not a file written by torch.save")):
        with pytest.raises(ValueError) as info:
            load_checkpoint(path)
        assert why in str(info.value) and "weights_only" not in str(info.value)


def test_rng_capture_and_restore(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    state = capture_rng()
    save_checkpoint(tmp_path / "r.pt", {"format": CHECKPOINT_FORMAT, "rng": state})
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(load_checkpoint(tmp_path / "r.pt")["rng"])
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]


def test_ema_follows_eq4_by_hand():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = ModelEMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update(net)  # 0.9 * 1 + 0.1 * 3 = 1.2
    assert ema.module.weight.item() == pytest.approx(1.2)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema.update(net)  # 0.9 * 1.2 + 0.1 * 0 = 1.08
    assert ema.module.weight.item() == pytest.approx(1.08)
    assert not ema.module.weight.requires_grad
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(net, decay=1.0)


def test_ema_update_is_the_per_tensor_formula_bit_for_bit():
    """The ``foreach`` update computes avg·m + (1 − m)·value exactly as the per-tensor loop did,
    and copies integer buffers."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    ema = ModelEMA(net, decay=0.97)
    by_hand = {k: v.clone() for k, v in ema.module.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].num_batches_tracked += 5
        ema.update(net)
        for name, value in net.state_dict().items():
            if value.dtype.is_floating_point:
                by_hand[name].mul_(0.97).add_(value, alpha=1.0 - 0.97)
            else:
                by_hand[name].copy_(value)
    for name, value in ema.module.state_dict().items():
        assert torch.equal(value, by_hand[name]), name
    assert ema.module[1].num_batches_tracked.item() == 15


def test_fetch_reads_every_value_in_one_transfer(monkeypatch):
    values = {"a": torch.tensor(1.5), "b": 2, "c": torch.tensor([[3.25]]), "d": float("nan")}
    reads = []  # every way a tensor's value reaches Python (a host sync on a GPU)

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    out = fetch(values)
    assert len(reads) == 1, reads  # one transfer for the two tensors, not one read each
    assert list(out) == ["a", "b", "c", "d"]
    assert out["a"] == 1.5 and out["b"] == 2.0 and out["c"] == 3.25 and np.isnan(out["d"])
    assert fetch({}) == {}


def test_check_finite_returns_the_values_and_checks_only_the_terms():
    out = check_finite({"L": torch.tensor(0.5)}, lambda: "here", also={"logged": float("inf")})
    assert out == {"L": 0.5, "logged": float("inf")}
    with pytest.raises(NonFiniteLossError, match=r"at step 3: L_b = \[nan\]"):
        check_finite({"L_a": 1.0, "L_b": torch.tensor(float("nan"))}, lambda: "step 3")
    # a logged value must not hide a checked term of the same name (it would replace it)
    with pytest.raises(ValueError, match=r"\['L'\] are both checked terms and logged"):
        check_finite({"L": torch.tensor(float("nan"))}, lambda: "here", also={"L": 0.0})


def test_a_learner_step_stops_on_a_non_finite_loss_before_the_weights_move():
    """The loss and the gradient norm are checked together, after the backward and before the
    step: the message names both, and no weight or optimiser state changes."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    before = copy.deepcopy(net.state_dict())
    learner = Learner(net, lr=0.1, total_updates=10, weight_decay=0.0, grad_clip=1.0)

    def guard(terms, also=None):
        return check_finite(terms, lambda: "step 1", also=also)

    learner.zero_grad()
    loss = net(torch.randn(3, 4)).sum() * float("nan")
    with pytest.raises(NonFiniteLossError, match="L_x, gradient norm of L_x"):
        learner.step(loss, "L_x", guard, {"L_x": loss})
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert learner.updates == 0 and not learner.opt.state
    learner.zero_grad()
    loss = net(torch.randn(3, 4)).square().mean()
    out = learner.step(loss, "L_x", guard, {"L_x": loss}, {"logged": torch.tensor(7.0)})
    assert set(out) == {"L_x", "gradient norm of L_x", "logged"} and out["logged"] == 7.0
    assert out["L_x"] == pytest.approx(loss.item()) and learner.updates == 1
    assert not torch.equal(net.weight, before["weight"])


def test_cosine_lr_by_hand():
    assert cosine_lr(1.0, 0, 10) == pytest.approx(1.0)
    assert cosine_lr(1.0, 5, 10) == pytest.approx(0.5)
    assert cosine_lr(1.0, 10, 10) == pytest.approx(0.0)
    assert cosine_lr(2.0, 3, 0) == 2.0


def test_adamw_is_fused_on_a_cpu_unless_the_loop_is_asked_for(monkeypatch):
    net = torch.nn.Linear(3, 2)
    monkeypatch.delenv("FUSE4SEG_ADAMW", raising=False)
    assert adamw(net, 1e-3, 1e-5).param_groups[0]["fused"] is True
    monkeypatch.setenv("FUSE4SEG_ADAMW", "loop")
    assert not adamw(net, 1e-3, 1e-5).param_groups[0]["fused"]


def test_fused_adamw_takes_the_loops_steps_to_float_rounding(monkeypatch):
    """The fused kernel computes AdamW's update (decoupled weight decay included) in another
    order: after 30 steps on the same gradients the weights agree to float32 rounding."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    b = copy.deepcopy(a)
    monkeypatch.delenv("FUSE4SEG_ADAMW", raising=False)
    fused = adamw(a, 1e-2, 1e-2)
    monkeypatch.setenv("FUSE4SEG_ADAMW", "loop")
    loop = adamw(b, 1e-2, 1e-2)
    for _ in range(30):
        x = torch.randn(8, 16)
        for net, opt in ((a, fused), (b, loop)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bench_optimizer_times_the_three_adamw_kernels(capsys):
    from bench_scripts import load

    bench = load("bench_optimizer")
    assert bench.main(["--profile", "smoke", "--steps", "2", "--rounds", "1"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| follower")
            or r.startswith("| leader")]
    assert [r.split(" | ")[3] for r in rows] == ["loop", "foreach", "fused"] * 2
    assert all(r.endswith("1.00 |") for r in rows[::3])  # the loop is its own baseline


def test_a_resumed_run_keeps_the_adamw_kernel_it_started_with(monkeypatch):
    """torch's load_state_dict takes a group's ``fused`` from the checkpoint: a run started
    with the loop (before the fused default, or under FUSE4SEG_ADAMW=loop) resumes with it."""
    net = torch.nn.Linear(3, 2)
    monkeypatch.setenv("FUSE4SEG_ADAMW", "loop")
    loop = adamw(net, 1e-3, 1e-5)
    net(torch.randn(4, 3)).sum().backward()
    loop.step()
    monkeypatch.delenv("FUSE4SEG_ADAMW")
    resumed = adamw(net, 1e-3, 1e-5)
    assert resumed.param_groups[0]["fused"] is True
    resumed.load_state_dict(loop.state_dict())
    assert not resumed.param_groups[0]["fused"]


def test_a_resumed_learner_gives_its_moments_its_parameters_layout():
    """A checkpoint of a leader in NCHW resumed with the leader channels-last (or the other way
    round, :func:`fuse4seg.models.place_leader`) continues as the run in one layout would:
    torch's fused AdamW misreads moments whose strides differ from their parameter's (its
    update then differs by about the learning rate), so ``Learner.load_state_dict`` gives
    them the parameter's layout."""
    from fuse4seg.train.engine import Learner

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)

    def learner(channels_last: bool) -> Learner:
        torch.manual_seed(1)
        net = torch.nn.Conv2d(4, 6, 3)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        return Learner(net, lr=1e-2, total_updates=10, weight_decay=1e-2, grad_clip=0.0)

    def steps(run: Learner, n: int) -> None:
        for _ in range(n):
            run.zero_grad()
            run.step(run.net(x).square().mean(), "loss", lambda terms, also=None: {})

    first = learner(False)
    assert first.opt.param_groups[0]["fused"] is True
    steps(first, 2)
    saved = copy.deepcopy({"net": first.net.state_dict(), "learner": first.state_dict()})
    for layout in (False, True):
        resumed = learner(layout)
        resumed.net.load_state_dict(copy.deepcopy(saved["net"]))
        resumed.load_state_dict(copy.deepcopy(saved["learner"]))
        strides = [(m["exp_avg"].stride(), m["exp_avg_sq"].stride(), p.stride())
                   for p, m in resumed.opt.state.items()]
        steps(resumed, 3)
        if not layout:
            reference = resumed.net.weight.detach().clone()
        else:  # the weights first: what a wrong layout would cost (its size in the message)
            torch.testing.assert_close(resumed.net.weight.detach(), reference,
                                       rtol=1e-5, atol=1e-6)
        assert all(avg == avg_sq == param for avg, avg_sq, param in strides)
