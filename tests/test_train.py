"""The trainer (Algorithm 1), every method and ablation, run folders, resume, NaN handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_cli_args

from fuse4seg import curves
from fuse4seg.config import get_config, load_config
from fuse4seg.data.slices import load_manifest
from fuse4seg.train import METHODS, NonFiniteLossError, Trainer, train
from fuse4seg.train.checkpoint import load_checkpoint
from fuse4seg.train.methods import ABLATIONS, get_method
from fuse4seg.train.runs import read_metrics, resolve_cache

REPO = Path(__file__).resolve().parents[1]
# 3 phantom cases: 2 training patients and 1 validation patient, so the patient-level split
# of the rollout is exercised (the default fractions would leave one training patient)
SPLIT = {"data.split_fractions": [0.67, 0.33, 0.0]}


def smoke(**overrides):
    return get_config("smoke", {**SPLIT, **overrides})


@pytest.fixture(scope="module")
def phantom_cache(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    return resolve_cache(phantom_dir, smoke(), cache=out / "phantom", progress=False)


@pytest.fixture(scope="module")
def brats_cache(brats2021_case, tmp_path_factory):
    """The real BraTS 2021 case alone: one patient (block split, validation on it)."""
    out = tmp_path_factory.mktemp("cache")
    return resolve_cache(brats2021_case, smoke(), cache=out / "brats", progress=False)


def _trainer(cache, tmp_path, method="fuse4seg", **overrides):
    return Trainer(smoke(**overrides), method, cache, tmp_path / "run", progress=False)


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_rollout_step_reuses_xf_and_freezes_the_follower(phantom_cache, tmp_path):
    trainer = _trainer(phantom_cache, tmp_path, **{"train.inner_steps": 3})
    engine = trainer.engine
    leader, follower = engine.leader_module, engine.follower_module
    calls = []
    leader.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    follower_before = _params(follower)
    leader_before = _params(leader)
    ema_before = _params(engine.ema.module)

    # the leader step alone: follower weights untouched, no gradient accumulated in them
    _, val = trainer.batches.split(1, 0, need_val=True)
    engine.leader_step(val["x1"], val["x2"], val["seg"])
    assert calls == [True]
    for name, p in follower.named_parameters():
        assert p.grad is None, name
        assert p.requires_grad, name  # restored after the step
        assert torch.equal(p.detach(), follower_before[name]), name
    leader_after = _params(leader)
    changed = [k for k in leader_before if not torch.equal(leader_before[k], leader_after[k])]
    assert changed, "the leader did not move"
    # Eq. 4 with m = 0.99 after one step from θ̂ = θ0
    m = trainer.config.train.ema_decay
    for k in changed[:5]:
        expected = m * ema_before[k] + (1 - m) * leader_after[k]
        torch.testing.assert_close(engine.ema.module.state_dict()[k], expected)

    # a whole outer step: x_f on D_tr once without grad, K follower steps, one leader step
    calls.clear()
    updates = engine.follower.updates
    engine.outer_step("rollout", 1, 1, trainer.batches)
    assert calls == [False, True]
    assert engine.follower.updates - updates == 3
    assert engine.leader.updates == 2


def test_the_leader_learns_from_the_followers_loss(phantom_cache, tmp_path):
    """The paper's mechanism (Algorithm 1, lines 12-16): ∂L_lower/∂x_f flows through the frozen
    follower into the leader. A review found that detaching x_f before the follower, or the
    segmentation term in L_upper, was caught only by an unrelated bound. Here, from one saved
    state, the leader's update must (a) repeat exactly for the same D_val batch, (b) differ
    when only the segmentation target differs, and (c) happen with every physical term off."""
    import copy

    def leader_after(trainer, saved, seg):
        trainer.engine.load_state_dict(copy.deepcopy(saved))
        trainer.engine.leader_step(val["x1"], val["x2"], seg)
        return _params(trainer.engine.leader_module)

    trainer = _trainer(phantom_cache, tmp_path)
    saved = copy.deepcopy(trainer.engine.state_dict())
    _, val = trainer.batches.split(1, 0, need_val=True)
    other = torch.where(val["seg"] > 0, torch.zeros_like(val["seg"]), val["seg"])  # no tumour
    assert not torch.equal(other, val["seg"])
    before = _params(trainer.engine.leader_module)
    a = leader_after(trainer, saved, val["seg"])
    assert all(torch.equal(v, leader_after(trainer, saved, val["seg"])[k]) for k, v in a.items())
    b = leader_after(trainer, saved, other)
    moved, n = [k for k in a if not torch.equal(a[k], b[k])], len(a)
    assert len(moved) > n // 2, f"{len(moved)} of {n} differ: the target barely reaches the leader"

    # the segmentation term alone still moves the leader
    quiet = _trainer(phantom_cache, tmp_path / "quiet", **{
        "loss.use_decomp": False, "loss.use_grad": False, "loss.use_recon": False})
    quiet.engine.load_state_dict(copy.deepcopy(saved))
    grads = {}
    for name, p in quiet.engine.leader_module.named_parameters():
        p.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach().clone()))
    quiet.engine.leader_step(val["x1"], val["x2"], val["seg"])
    nonzero = [k for k, g in grads.items() if float(g.abs().max()) > 0]
    assert len(nonzero) > len(grads) // 2, f"{len(nonzero)} of {len(grads)} gradients non-zero"
    after = _params(quiet.engine.leader_module)
    assert any(not torch.equal(before[k], after[k]) for k in before)


class _ThresholdFollower(torch.nn.Module):
    """A follower whose labels are a known rule of its input: ET above 0.85, ED in
    (0.6, 0.85], background elsewhere (validation's argmax of these logits)."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 4, *x.shape[2:])
        logits[:, 2] = 10.0 * ((x[:, 0] > 0.6) & (x[:, 0] <= 0.85))
        logits[:, 3] = 10.0 * (x[:, 0] > 0.85)
        return logits


def test_validation_dice_is_the_3d_dice_per_patient_computed_by_hand(phantom_cache, tmp_path,
                                                                     monkeypatch):
    """validate(): a review found that argmin for argmax passed every test. With a follower
    whose labels are a known rule of x_avg, the validation Dice must equal NumPy's 3-D Dice
    per validation patient (a class absent from both counts 1), averaged over patients and
    then over NCR, ED and ET."""
    from fuse4seg.train.bilevel import Engine

    trainer = _trainer(phantom_cache, tmp_path, "average")
    assert not trainer.config.train.warmup_minmax  # the warm-up prior is x_avg as it is
    monkeypatch.setattr(Engine, "eval_follower", property(lambda self: _ThresholdFollower()))
    got = trainer.validate("warmup", batch_size=3)
    pred, truth = {}, {}
    for i in trainer.val_items:
        item = trainer.val_set[int(i)]
        x_avg = 0.5 * (item["x1"][0] + item["x2"][0]).numpy()
        labels = np.where(x_avg > 0.85, 3, np.where(x_avg > 0.6, 2, 0))
        pred.setdefault(item["case_id"], []).append(labels)
        truth.setdefault(item["case_id"], []).append(item["seg"].numpy())
    per_class = {}
    for name, c in (("NCR", 1), ("ED", 2), ("ET", 3)):
        scores = []
        for case in pred:
            p, t = np.stack(pred[case]) == c, np.stack(truth[case]) == c
            tp, fp, fn = (p & t).sum(), (p & ~t).sum(), (~p & t).sum()
            scores.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
        per_class[name] = float(np.mean(scores))
    assert 0.0 < per_class["ED"] < 1.0 and 0.0 < per_class["ET"] < 1.0  # a real test of each
    for name, want in per_class.items():
        assert got["per_class"][name]["dice"] == pytest.approx(want, abs=1e-9), name
    assert got["mean_dice"] == pytest.approx(np.mean(list(per_class.values())), abs=1e-9)
    assert got["slices"] == len(trainer.val_items)


def test_best_pt_holds_the_epoch_with_the_highest_validation_dice(phantom_cache, tmp_path,
                                                                  monkeypatch):
    """best.pt is what predict and evaluate load by default; a review found that keeping the
    worst epoch passed every test. With scripted validations 0.3, 0.5, 0.4 the best is epoch
    2, in the trainer, in best.pt and in run.json."""
    scores = iter([0.3, 0.5, 0.4])

    def scripted(self, stage, batch_size=None, ema=True):
        d = next(scores)
        return {"split": "val", "prior": "x_avg", "slices": 1, "mean_dice": d, "mean_iou": d / 2,
                "per_class": {c: {"dice": d, "iou": d / 2} for c in ("NCR", "ED", "ET")}}

    monkeypatch.setattr(Trainer, "validate", scripted)
    config = smoke(**{"train.warmup_epochs": 3, "train.rollout_epochs": 0})
    result = train(config, "average", data=phantom_cache, out=tmp_path, progress=False)
    assert [r["val"]["mean_dice"] for r in result.metrics] == [0.3, 0.5, 0.4]
    assert result.best["epoch"] == 2 and result.best["mean_dice"] == 0.5
    assert load_checkpoint(result.run_dir / "checkpoints" / "best.pt")["epoch"] == 2
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["finished"]["best"]["epoch"] == 2
    assert record["device"] == "cpu"  # the run's device (results.thread_note reads it)


def test_every_rollout_step_splits_by_patient(phantom_cache, tmp_path):
    splits = []
    trainer = Trainer(
        smoke(**{"train.warmup_epochs": 0, "train.rollout_epochs": 2}), "fuse4seg",
        phantom_cache, tmp_path / "run", progress=False,
        on_split=lambda tr, val: splits.append((tr, val)),
    )
    assert trainer.batches.sampler.patient_level
    trainer.fit()
    assert len(splits) == 2 * trainer.steps_per_epoch
    for train_patients, val_patients in splits:
        assert not set(train_patients) & set(val_patients)


@pytest.mark.parametrize("minmax", [True, False])
def test_warmup_prior_is_x_avg_in_the_leaders_domain(phantom_cache, tmp_path, minmax):
    trainer = _trainer(phantom_cache, tmp_path, **{"train.warmup_minmax": minmax})
    from fuse4seg.train.validation import collate

    batch = collate(trainer.train_set, np.arange(4), trainer.device)
    x1, x2 = batch["x1"], batch["x2"]
    x_avg = 0.5 * (x1 + x2)
    assert float(x_avg.amax()) < 0.99  # real slices: T1ce and FLAIR peak in different places
    prior = trainer.prior(x1, x2, "warmup", ema=False)
    if minmax:
        lo, hi = x_avg.amin(dim=(1, 2, 3), keepdim=True), x_avg.amax(dim=(1, 2, 3), keepdim=True)
        torch.testing.assert_close(prior, (x_avg - lo) / (hi - lo), atol=1e-4, rtol=0)
        assert torch.allclose(prior.amax(dim=(1, 2, 3)), torch.ones(4))
    else:
        assert torch.equal(prior, x_avg)
    # the leader's x_f is min-max normalised too; a fresh leader starts close to minmax(x_avg)
    x_f = trainer.prior(x1, x2, "rollout", ema=True)
    assert torch.allclose(x_f.amax(dim=(1, 2, 3)), torch.ones(4), atol=1e-4)
    lo, hi = x_avg.amin(dim=(1, 2, 3), keepdim=True), x_avg.amax(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(x_f, (x_avg - lo) / (hi - lo), atol=0.01, rtol=0)
    label = trainer.validate("warmup")["prior"]
    assert label == ("minmax(x_avg)" if minmax else "x_avg")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_two_smoke_epochs_on_the_phantom(method, phantom_cache, tmp_path):
    result = train(smoke(), method, data=phantom_cache, out=tmp_path, progress=False)
    _check_run(result, method, val_split="val")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_two_smoke_epochs_on_a_real_case(method, brats_cache, tmp_path):
    with pytest.warns(UserWarning, match="one training patient"):
        result = train(smoke(), method, data=brats_cache, out=tmp_path, progress=False)
    _check_run(result, method, val_split="train")


def _check_run(result, method, val_split):
    run = result.run_dir
    assert run.name.startswith(f"{method}-smoke-")
    rows = read_metrics(run)
    epochs = 3 if method == "disjoint_ae" else 2  # + the leader's own (fusion) epoch
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    assert all(np.isfinite(r["L_lower"]) for r in rows if r["stage"] != "fusion")
    final = rows[-1]["val"]
    assert final["split"] == val_split and 0.0 <= final["mean_dice"] <= 1.0
    for name in ("last", "ema", "best"):
        state = torch.load(run / "checkpoints" / f"{name}.pt", weights_only=True)
        assert state["method"] == method
    info = json.loads((run / "run.json").read_text())
    assert info["method"] == method and info["commit"]
    # the patient split it trained on, as its cache's manifest has it
    assert info["split"] == load_manifest(info["cache"])["split"] and info["split"]["train"]
    assert load_config(run / "config.yaml").profile == "smoke"
    if method == "fuse4seg":
        assert rows[0]["stage"] == "warmup" and rows[1]["stage"] == "rollout"
        assert rows[1]["leader_updates"] == rows[1]["steps"]
        assert np.isfinite(rows[1]["L_upper"])
        assert sorted(p.name for p in (run / "glassbox").iterdir()) == [
            "epoch_001.npz",
            "epoch_002.npz",
            "inputs.npz",
        ]
    if method == "disjoint_ae":
        assert rows[0]["stage"] == "fusion" and "L_physical" in rows[0]
    if get_method(method).leader is None:
        assert rows[-1]["leader_updates"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_ablation_trains_two_smoke_epochs(name, phantom_cache, tmp_path):
    variant = ABLATIONS[name]
    result = train(smoke(), ablation=name, data=phantom_cache, out=tmp_path, progress=False)
    _check_run(result, variant.method, val_split="val")
    config = load_config(result.run_dir / "config.yaml")
    for key, value in variant.overrides.items():
        section, field = key.split(".")
        assert getattr(getattr(config, section), field) == value
    rows = read_metrics(result.run_dir)
    # a switched-off term is logged but does not enter the leader's objective
    if not config.loss.use_grad and variant.method == "fuse4seg":
        row = rows[-1]
        expected = row["upper/seg"] + config.loss.gamma_recon * row["upper/recon"]
        if config.loss.use_decomp:
            expected += config.loss.alpha_decomp * row["upper/decomp"]
        assert row["upper/total"] == pytest.approx(expected, rel=1e-5)


def test_no_method_name_is_compared_outside_the_spec_table():
    """Methods are data: the training code reads MethodSpec fields, never method names."""
    import re

    pattern = re.compile(
        r"""(==|!=|\bin\b)\s*\(?\s*["'](fuse4seg|disjoint_ae|average|max|direct2ch|monai_unet)["']"""
    )
    offenders = []
    for path in sorted((REPO / "fuse4seg").rglob("*.py")):
        if path.name == "methods.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_ablations_set_the_loss_switches(phantom_cache, tmp_path):
    result = train(
        smoke(**{"train.warmup_epochs": 0}),
        ablation="A",
        data=phantom_cache,
        out=tmp_path,
        progress=False,
    )
    config = load_config(result.run_dir / "config.yaml")
    assert not config.loss.use_decomp and not config.loss.use_grad and config.loss.use_recon
    assert json.loads((result.run_dir / "run.json").read_text())["ablation"] == "A"
    with pytest.raises(ValueError, match="ablation"):
        train(smoke(), ablation="C", data=phantom_cache, out=tmp_path)


def test_a_finished_run_is_reused_from_its_files_without_building_a_model(
    phantom_cache, tmp_path, monkeypatch
):
    import fuse4seg.train.trainer as trainer_module

    config = smoke(**{"train.warmup_epochs": 1, "train.rollout_epochs": 0})
    first = train(config, "average", data=phantom_cache, out=tmp_path, progress=False)
    done = json.loads((first.run_dir / "run.json").read_text())["finished"]
    assert done["epochs"] == 1 and done["best"] == first.best
    # another seed is another run, in a folder of its own (the refusal to train over a run:
    # test_a_run_made_by_other_code_warns_or_restarts)
    other = train(smoke(**{"train.warmup_epochs": 1, "train.rollout_epochs": 0, "seed": 1}),
                  "average", data=phantom_cache, out=tmp_path, progress=False)
    assert other.run_dir != first.run_dir and other.run_dir.is_dir()

    def no_trainer(*args, **kwargs):
        raise AssertionError("a finished run built a Trainer")

    monkeypatch.setattr(trainer_module, "Trainer", no_trainer)
    again = train(config, "average", data=phantom_cache, out=tmp_path, resume=True, progress=False)
    assert again.run_dir == first.run_dir and again.best == first.best
    assert again.metrics == first.metrics
    # without the record (a run stopped before its end) the Trainer is built to continue it
    info = json.loads((first.run_dir / "run.json").read_text())
    del info["finished"]
    (first.run_dir / "run.json").write_text(json.dumps(info))
    with pytest.raises(AssertionError, match="built a Trainer"):
        train(config, "average", data=phantom_cache, out=tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("augment", [False, True])
def test_the_stage_change_is_compared_on_the_same_slices(phantom_cache, tmp_path, augment):
    # average feeds x_avg in both stages, so with one step per epoch nothing differs between
    # the reference (warmed-up follower, no update) and the first rollout step's first inner
    # loss: they must agree to float rounding, augmentation included
    config = smoke(**{"train.warmup_epochs": 2, "train.rollout_epochs": 1,
                      "train.steps_per_epoch": 1, "train.augment": augment})
    rows = train(config, "average", data=phantom_cache, out=tmp_path, progress=False).metrics
    assert "L_lower_ref_next" not in rows[0]  # only at the last warm-up epoch
    assert rows[2]["L_lower_first"] == pytest.approx(rows[1]["L_lower_ref_next"], rel=1e-5)
    # with two steps the reference is the mean over the epoch's D_tr halves, before any update
    two = smoke(**{"train.warmup_epochs": 1, "train.rollout_epochs": 1,
                   "train.steps_per_epoch": 2, "train.inner_steps": 2})
    trainer = Trainer(two, "fuse4seg", phantom_cache, tmp_path / "two", progress=False)
    seen = []
    trainer.batches.on_split = lambda tr, val: seen.append(tr)
    engine, scored = trainer.engine, []  # the reference's losses: draw and value
    reference, follower_loss = engine.stage_change_reference, engine.follower_loss

    def scored_loss(x_in, target, draw):
        scored.append((draw, follower_loss(x_in, target, draw)))
        return scored[-1][1]

    def spied_reference(batches, epoch):
        engine.follower_loss = scored_loss
        try:
            return reference(batches, epoch)
        finally:
            engine.follower_loss = follower_loss

    engine.stage_change_reference = spied_reference
    result = trainer.fit()
    assert len(seen) == 2  # the reference's draws are not reported as rollout splits
    ref, first = result.metrics[0]["L_lower_ref_next"], result.metrics[1]["L_lower_first"]
    # one loss per step of the rollout epoch (epoch 2: its first inner draws), and their mean
    assert [draw for draw, _ in scored] == [(2, 0, 0), (2, 1, 0)]
    assert ref == pytest.approx(np.mean([value for _, value in scored]), rel=1e-12)
    # fuse4seg's untrained leader anchored on x_avg's range: close to x_avg, not equal
    assert np.isfinite(ref) and np.isfinite(first) and ref > 0
    t = curves.rollout_targets([curves.curve(result.run_dir)])
    assert t["loss_basis"] == "same D_tr slices"
    assert t["loss_ratio"] == pytest.approx([first / ref])
    assert t["loss_ratio_logged"] == pytest.approx(
        [result.metrics[1]["L_lower"] / result.metrics[0]["L_lower"]])


def test_methods_of_one_seed_start_from_the_same_networks(phantom_cache, tmp_path):
    # each network is initialised from its own seed (bilevel.init_seed), so fuse4seg's warm-up
    # on x_avg is average's bit for bit: their paired difference is the rollout's alone
    config = smoke(**{"train.warmup_epochs": 2, "train.rollout_epochs": 1})
    runs = {m: Trainer(config, m, phantom_cache, tmp_path / m, progress=False)
            for m in ("fuse4seg", "average", "disjoint_ae")}
    nets = {m: (t.engine.leader_module, t.engine.follower_module) for m, t in runs.items()}
    assert nets["average"][0] is None
    for m in ("average", "disjoint_ae"):
        assert _same_state(nets[m][1], nets["fuse4seg"][1]), m
    assert _same_state(nets["disjoint_ae"][0], nets["fuse4seg"][0])
    other = Trainer(smoke(**{"train.warmup_epochs": 2, "train.rollout_epochs": 1,
                             "train.seed": 1}), "average", phantom_cache, tmp_path / "s1",
                    progress=False)
    assert not _same_state(other.engine.follower_module, nets["average"][1])
    rows = {m: runs[m].fit().metrics for m in ("fuse4seg", "average")}

    for epoch in (0, 1):  # the warm-up epochs: every number average logs (not the time)
        ours, theirs = rows["fuse4seg"][epoch], rows["average"][epoch]
        assert ours["stage"] == "warmup" and "val" in theirs
        assert {k: ours[k] for k in theirs if k != "elapsed_s"} == {
            k: v for k, v in theirs.items() if k != "elapsed_s"}
    assert rows["fuse4seg"][2]["L_lower"] != rows["average"][2]["L_lower"]  # the rollouts differ


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_table3_variants_share_one_warmup_bit_for_bit(phantom_cache, tmp_path):
    config = smoke(**{"train.warmup_epochs": 1, "train.rollout_epochs": 1})
    full = train(config, ablation="full", data=phantom_cache, out=tmp_path / "shared",
                 progress=False)
    assert (full.run_dir / "checkpoints" / "warmup.pt").is_file()
    shared = train(config, ablation="A", data=phantom_cache, out=tmp_path / "shared",
                   progress=False)
    info = json.loads((shared.run_dir / "run.json").read_text())
    assert info["warmup_from"] == full.run_dir.name
    alone = train(config, ablation="A", data=phantom_cache, out=tmp_path / "alone",
                  progress=False)
    assert json.loads((alone.run_dir / "run.json").read_text())["warmup_from"] is None

    def numbers(rows):
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]

    assert numbers(shared.metrics) == numbers(alone.metrics)
    assert numbers(shared.metrics)[1] != numbers(full.metrics)[1]  # the rollouts differ
    a = load_checkpoint(shared.run_dir / "checkpoints" / "last.pt")["engine"]
    b = load_checkpoint(alone.run_dir / "checkpoints" / "last.pt")["engine"]
    for net in ("follower", "leader"):
        for name, value in a[net].items():
            assert torch.equal(value, b[net][name]), f"{net}.{name}"
    # the disjoint baseline's first stage reads the loss switches: it shares nothing
    base = train(config, ablation="baseline", data=phantom_cache, out=tmp_path / "shared",
                 progress=False)
    assert json.loads((base.run_dir / "run.json").read_text())["warmup_from"] is None
    # a warm-up whose validations may pick best.pt (average's) is never shared
    avg = train(config, "average", data=phantom_cache, out=tmp_path / "shared", progress=False)
    assert not (avg.run_dir / "checkpoints" / "warmup.pt").exists()


def test_disjoint_follower_reads_a_kept_x_f_of_its_frozen_leader(phantom_cache, tmp_path,
                                                                  monkeypatch):
    from fuse4seg.train.bilevel import Engine

    config = smoke(**{"train.warmup_epochs": 1, "train.rollout_epochs": 1})
    fused = {"n": 0}
    real_prior = Engine.prior

    def counting(self, x1, x2, stage, ema):
        if self.spec.input_rule(stage) is None and stage != "fusion":
            fused["n"] += x1.shape[0]
        return real_prior(self, x1, x2, stage, ema)

    monkeypatch.setattr(Engine, "prior", counting)
    kept = train(config, "disjoint_ae", data=phantom_cache, out=tmp_path / "kept",
                 progress=False)
    kept_count = fused["n"]
    fused["n"] = 0
    monkeypatch.setattr(Engine, "FROZEN_CACHE_BYTES", 0)  # nothing fits: fused every step
    every = train(config, "disjoint_ae", data=phantom_cache, out=tmp_path / "every",
                  progress=False)
    assert kept_count < fused["n"]  # fewer slices fused
    validations = [row for row in kept.metrics if "val" in row]
    assert len(validations) >= 2  # the validation slices were fused at the first one only
    for a, b in zip(kept.metrics, every.metrics, strict=True):
        for key in ("L_lower", "L_physical"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4), key
        if "val" in a:
            assert a["val"]["mean_dice"] == pytest.approx(b["val"]["mean_dice"], abs=1e-6)
    # what was fused, kept: each training slice drawn and each validation slice once
    fused["n"] = 0
    monkeypatch.setattr(Engine, "FROZEN_CACHE_BYTES", 1 << 30)
    from fuse4seg.train.trainer import Trainer

    trainer = Trainer(config, "disjoint_ae", phantom_cache, tmp_path / "direct", progress=False)
    trainer.validate("warmup")
    first = fused["n"]
    trainer.validate("rollout")
    assert first == len(trainer.val_items) and fused["n"] == first


def test_a_frozen_cache_keeps_every_slice_or_none(phantom_cache, tmp_path, monkeypatch):
    """frozen_prior keeps x_f of a frozen leader when all the run's slices fit, each fused
    alone once (so a kept x_f does not depend on its batch: a review found a resumed
    disjoint_ae run refilled the cache in other batches and ended 2e-8 away); when they do
    not all fit, it keeps none and fuses each batch whole, once a step."""
    from fuse4seg.train.bilevel import Engine
    from fuse4seg.train.trainer import Trainer
    from fuse4seg.train.validation import collate

    config = smoke()
    trainer = Trainer(config, "disjoint_ae", phantom_cache, tmp_path / "run", progress=False)
    engine, data = trainer.engine, trainer.train_set
    assert engine.frozen_slices == len(data) + len(trainer.val_items)
    sizes = []
    real_prior = Engine.prior

    def counting(self, x1, x2, stage, ema):
        sizes.append(x1.shape[0])
        return real_prior(self, x1, x2, stage, ema)

    monkeypatch.setattr(Engine, "prior", counting)
    batches = [collate(data, np.array(ix), engine.device) for ix in ([0, 1], [1, 2, 3], [3, 0])]
    one = batches[0]["x1"][0].numel() * 4  # bytes of one slice's float32 x_f
    monkeypatch.setattr(Engine, "FROZEN_CACHE_BYTES", engine.frozen_slices * one)
    outs = [engine.frozen_prior(b, "warmup") for b in batches]
    assert sizes == [1, 1, 1, 1] and len(engine._frozen_xf) == 4  # each slice once, alone
    for b, out in zip(batches, outs, strict=True):
        alone = torch.cat([real_prior(engine, b["x1"][j:j + 1], b["x2"][j:j + 1], "warmup",
                                      False) for j in range(len(out))])
        assert torch.equal(out, alone)
    monkeypatch.setattr(Engine, "FROZEN_CACHE_BYTES", engine.frozen_slices * one - 1)
    engine._frozen_xf, sizes[:] = {}, []
    for _ in range(2):
        for b in batches:
            engine.frozen_prior(b, "warmup")
    assert sizes == [2, 3, 2, 2, 3, 2] and not engine._frozen_xf  # whole batches, each step


def test_a_resumed_disjoint_run_ends_as_an_uninterrupted_one(phantom_cache, tmp_path):
    """The frozen leader's kept x_f is emptied on load and refilled from other batches:
    stopped after its first warm-up epoch and resumed, a disjoint_ae run must still end bit
    for bit as one never stopped (the SIGKILL test covers fuse4seg)."""
    # enough steps that later batches meet slices kept from earlier ones
    config = smoke(**{"train.warmup_epochs": 3, "train.rollout_epochs": 1,
                      "train.steps_per_epoch": 5})
    whole = train(config, "disjoint_ae", data=phantom_cache, out=tmp_path / "a",
                  progress=False)

    def stop(row):
        if row["stage"] == "warmup":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, "disjoint_ae", data=phantom_cache, out=tmp_path / "b", progress=False,
              callback=stop)
    resumed = train(config, "disjoint_ae", data=phantom_cache, out=tmp_path / "b",
                    progress=False, resume=True)
    assert _strip(resumed.metrics) == _strip(whole.metrics)
    a = load_checkpoint(whole.run_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(resumed.run_dir / "checkpoints" / "last.pt")
    for part in ("leader", "ema", "follower"):
        for k in a["engine"][part]:
            assert torch.equal(a["engine"][part][k], b["engine"][part][k]), (part, k)


def test_run_hours_reads_the_frozen_cache_as_the_engine_does(phantom_cache, tmp_path,
                                                            monkeypatch):
    """book.run_hours projects chapter 7's hours with the engine's two rules for the frozen
    leader (MethodSpec.reads_frozen_leader, Engine.frozen_cache_holds). At the cache's edge
    (all training slices fit, or one slot short) its projection must agree with what the
    engine does."""
    from fuse4seg.book import run_hours
    from fuse4seg.train.bilevel import Engine
    from fuse4seg.train.methods import METHODS, get_method
    from fuse4seg.train.trainer import Trainer
    from fuse4seg.train.validation import collate

    for name in METHODS:  # only the disjoint pipeline, after its fusion stage
        spec = get_method(name)
        for stage, _ in spec.plan(1, 1):
            assert spec.reads_frozen_leader(stage) == (
                spec.leader == "disjoint" and stage != "fusion"), (name, stage)

    config = smoke()
    trainer = Trainer(config, "disjoint_ae", phantom_cache, tmp_path / "run", progress=False)
    engine, data = trainer.engine, trainer.train_set
    n = engine.frozen_slices  # training and validation slices
    one = config.data.crop_size ** 2 * 4  # one slice's float32 x_f, as run_hours counts it
    for cap, kept in ((n * one, True), (n * one - 1, False)):
        monkeypatch.setattr(Engine, "FROZEN_CACHE_BYTES", cap)
        engine._frozen_xf = {}
        for start in range(0, len(data), 2):
            engine.frozen_prior(collate(data, np.arange(start, min(start + 2, len(data))),
                                        engine.device), "warmup")
        assert (len(engine._frozen_xf) == len(data)) == kept, cap
        row = run_hours(config, n, 1.0, 10.0, ["disjoint_ae"], t_leader_forward=1.0)[0]
        projected = "the frozen leader's forward every step" not in row["estimates"]
        assert projected == kept, cap


def test_a_run_made_by_other_code_warns_or_restarts(phantom_cache, tmp_path, capsys):
    config = smoke(**{"train.warmup_epochs": 1, "train.rollout_epochs": 0})
    first = train(config, "average", data=phantom_cache, out=tmp_path, progress=False)
    # again without --resume: a finished run is named as finished, not "to continue"
    with pytest.raises(ValueError, match="already holds a finished run of this code; --resume "
                                         "reuses it"):
        train(config, "average", data=phantom_cache, out=tmp_path, progress=False)
    info_path = first.run_dir / "run.json"
    info = json.loads(info_path.read_text())
    from fuse4seg.utils import code_digest

    assert info["code"] == code_digest()
    info["code"] = "0" * 12  # as if an older fuse4seg had written the run
    info_path.write_text(json.dumps(info))
    last = first.run_dir / "checkpoints" / "last.pt"
    os.utime(last, ns=(1, 1))  # an old file time, so a rewrite shows
    with pytest.warns(UserWarning, match="other fuse4seg code.*resuming it anyway"):
        again = train(config, "average", data=phantom_cache, out=tmp_path, resume=True,
                      progress=False)
    assert again.metrics == first.metrics and len(again.metrics) == 1
    assert json.loads(info_path.read_text())["code"] == "0" * 12  # left as it was
    assert last.stat().st_mtime_ns == 1  # a finished run: nothing trained, nothing written

    fresh = train(config, "average", data=phantom_cache, out=tmp_path, resume=True,
                  progress=False, restart_if_code_changed=True)
    said = capsys.readouterr().err.splitlines()
    assert said[0] == str(first.run_dir)
    assert said[1] == "  was trained by other fuse4seg code: starting it again"
    assert said[2].startswith("  that run:  code 000000000000, commit ")
    assert said[3].startswith(f"  this code: code {code_digest()}, commit ")
    assert all(len(line) <= 86 for line in said[1:4])  # a chapter's output block holds 86
    assert fresh.run_dir == first.run_dir
    assert json.loads(info_path.read_text())["code"] == code_digest()
    assert last.stat().st_mtime_ns > 1  # trained again
    assert len(read_metrics(fresh.run_dir)) == 1  # from epoch 1, not appended
    assert [p.name for p in tmp_path.iterdir() if ".stale-" in p.name] == []
    # the same code now: reused, no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(config, "average", data=phantom_cache, out=tmp_path, resume=True, progress=False,
              restart_if_code_changed=True)


SAMPLE = '''"""A module of the package: its docstring."""

import math
import os

LIMIT: int = 3
"""An attribute docstring, as config.py documents its settings."""

HELP = """usage:

  run it"""


def scale(x):  # a comment
    """Scale x.

    More words.
    """
    return math.sqrt(x) * LIMIT + len(os.sep)
'''


def test_code_digest_ignores_docstrings_and_comments_but_not_code(tmp_path):
    import shutil

    import fuse4seg
    from fuse4seg.utils import code_digest, code_text

    pkg = tmp_path / "fuse4seg"
    shutil.copytree(Path(fuse4seg.__file__).parent, pkg,
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert code_digest(root=pkg) == code_digest()  # the copy hashes like the package
    sample = pkg / "sample.py"  # a module of known text, so the package's own can change
    sample.write_text(SAMPLE)
    base = code_digest(root=pkg)

    def digest_of(text: str) -> str:
        sample.write_bytes(text.encode())
        return code_digest(root=pkg)

    def edited(old: str, new: str) -> str:
        assert SAMPLE.count(old) == 1
        return SAMPLE.replace(old, new)

    # docstrings (longer, shorter, an attribute's), comments, blank lines, line endings: no code
    same = [
        edited('"""Scale x.\n\n    More words.\n    """', '"""Scale x, in one line."""'),
        edited('"""A module of the package: its docstring."""', "'Another.'"),
        edited("config.py documents its settings.", "the settings are documented."),
        edited("  # a comment", "  # another, \u00e9 and all\n    # and a line more"),
        edited("\n\n\ndef scale", "\n\n\n\n\ndef scale"),
        edited("    return math", "    \n    return math"),
        SAMPLE.replace("\n", "\r\n"),  # a CRLF checkout
    ]
    for text in same:
        assert digest_of(text) == base, text
    # code does: a number, a string's value (its blank line too), a statement, lines joined
    other = [
        edited("LIMIT: int = 3", "LIMIT: int = 4"),
        edited("usage:\n\n  run it", "usage:\n  run it"),
        edited("usage:\n", "usage:  \n"),
        edited("    return math", "    pass\n    return math"),
        edited("import math\nimport os\n", "import math; import os\n"),
        edited('"""Scale x.\n\n    More words.\n    """', "x = 0"),
    ]
    for text in other:
        assert digest_of(text) != base, text
    assert digest_of(SAMPLE) == base
    sample.unlink()
    assert code_digest(root=pkg) == code_digest()  # a file counts by its name and code
    (pkg / ".#lock.py").write_text("x = 1\n")  # editor files are skipped
    assert code_digest(root=pkg) == code_digest()

    # code_text itself: what is cut, what stays
    assert code_text('"""Module."""\nx = 1  # note\r\n\r\n\'doc of x\'\n') == "x = 1"
    assert code_text('def f():\n    "\u00e9t\u00e9"; return 1\n') == "def f():\n    ; return 1"
    assert code_text('x = "\u00e9"; "doc"; y = 2\n') == 'x = "\u00e9"; ; y = 2'  # str columns
    assert code_text("print('a string in an expression is code')\n") == (
        "print('a string in an expression is code')")
    for value in ('x = """a\n\nb"""', 'x = """a   \nb"""', "x = b'''a\n\nb'''",
                  'x = f"""{1}\n\nb"""'):
        assert code_text(value + "\n") == value  # a string's blank lines and spaces stay
    broken = "def f(:\n    'doc'\n"  # a file that does not parse is kept whole
    assert code_text(broken) == broken
    # bytes in the encoding a file declares; bytes that do not decode are kept whole
    latin = b"# -*- coding: latin-1 -*-\n'd\xe9j\xe0'\nx = '\xe9'\n"
    assert code_text(latin) == "x = '\u00e9'"
    assert code_text(b"x = '\xe9'\n") == "x = '\udce9'\n"
    assert code_text(b"\xef\xbb\xbfx = 1\n") == code_text("\ufeffx = 1\n") == "x = 1"
    (pkg / "odd.py").write_bytes(b"'doc'\nx = '\xe9'\n")
    odd = code_digest(root=pkg)
    (pkg / "odd.py").write_bytes(b"'doc'\nx = '\xe8'\n")
    assert code_digest(root=pkg) not in (odd, code_digest())


def test_nan_loss_stops_with_the_step_and_term_and_keeps_the_checkpoint(
    phantom_cache, tmp_path, monkeypatch
):
    import fuse4seg.losses as losses

    real = losses.lower_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 2 else value

    monkeypatch.setattr(losses, "lower_loss", flaky)
    config = smoke(**{"train.rollout_epochs": 0})
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2 .*L_lower"):
        train(
            config,
            "average",
            data=phantom_cache,
            out=tmp_path,
            progress=False,
            checkpoint_every_steps=1,
        )
    (run,) = [p for p in tmp_path.iterdir() if p.name.startswith("average-")]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["step_in_epoch"] == 1
    assert state["scheme"] == "brats2021"  # as in the bundles: predict --which last agrees
    assert all(torch.isfinite(v).all() for v in state["engine"]["follower"].values())


def test_nan_in_an_upper_term_is_named(phantom_cache, tmp_path, monkeypatch):
    import fuse4seg.losses as losses

    real = losses.upper_loss

    def bad(*args, **kwargs):
        total, terms = real(*args, **kwargs)
        return total * float("inf"), {**terms, "grad": float("inf")}

    monkeypatch.setattr(losses, "upper_loss", bad)
    with pytest.raises(NonFiniteLossError, match=r"L_grad"):
        train(
            smoke(**{"train.warmup_epochs": 0}),
            "fuse4seg",
            data=phantom_cache,
            out=tmp_path,
            progress=False,
        )


def _cli_train(out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    every_step = ("--set", "train.rollout_epochs=2", "--checkpoint-every-steps", "1")
    cmd = [sys.executable, "-m", *train_cli_args(cache, out, *every_step, *extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(phantom_cache, tmp_path):
    """Killed in the rollout, after the leader's first update (a review found the kill always
    came in the warm-up, so a resume that lost the leader's weights or optimiser passed), then
    resumed: every logged value and every weight as in a run never stopped."""
    whole = _cli_train(tmp_path / "a", phantom_cache)
    killed = _cli_train(tmp_path / "b", phantom_cache)
    deadline = time.time() + 300
    last = None
    while time.time() < deadline and killed.poll() is None:
        found = list((tmp_path / "b").glob("fuse4seg-*/checkpoints/last.pt"))
        if found:
            try:
                seen = load_checkpoint(found[0])["engine"]["leader_learner"]["updates"]
            except (OSError, RuntimeError, ValueError, KeyError):  # being replaced: look again
                seen = 0
            if seen >= 1:
                os.kill(killed.pid, signal.SIGKILL)
                last = found[0]
                break
        time.sleep(0.02)
    assert last is not None, killed.communicate()[1].decode()[-2000:]
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    state = load_checkpoint(last)
    total = 3 * state["config"]["train"]["steps_per_epoch"]
    assert (state["epoch"] - 1) * 2 + state["step_in_epoch"] < total  # killed mid-run
    assert state["engine"]["leader_learner"]["updates"] >= 1  # ... in the rollout
    resumed = _cli_train(tmp_path / "b", phantom_cache, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err.decode()[-2000:]
    (run_a,) = (tmp_path / "a").glob("fuse4seg-*")
    (run_b,) = (tmp_path / "b").glob("fuse4seg-*")
    assert run_a.name == run_b.name
    assert _strip(read_metrics(run_a)) == _strip(read_metrics(run_b))
    a = load_checkpoint(run_a / "checkpoints" / "last.pt")
    b = load_checkpoint(run_b / "checkpoints" / "last.pt")
    for part in ("leader", "ema", "follower"):
        for k in a["engine"][part]:
            assert torch.equal(a["engine"][part][k], b["engine"][part][k]), (part, k)


def test_cli_train_reports_bad_input(tmp_path, capsys):
    from fuse4seg.cli import main

    base = ["train", "--profile", "smoke", "--out", str(tmp_path)]
    assert main([*base, "--data", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path), "--set", "train.bogus=1"]) == 2
    assert "unknown setting" in capsys.readouterr().err


@pytest.mark.parametrize("decay", [None, 0.9])
def test_the_followers_weight_average_is_what_is_validated_and_saved(phantom_cache, tmp_path,
                                                                     decay, monkeypatch):
    """train.follower_ema: best.pt / ema.pt / last.pt serve the average of the follower's
    weights; off (None), the follower itself (validation: the next test)."""
    import fuse4seg.train.trainer as trainer_module
    from fuse4seg.inference import load_bundle

    config = smoke(**{"train.follower_ema": decay})
    trainer = Trainer(config, "fuse4seg", phantom_cache, tmp_path / "run", progress=False)
    best_saves, save = [], trainer_module.save_checkpoint

    def spied_save(path, payload):  # best.pt, at each new best: the follower of that moment
        if Path(path).name == "best.pt":
            eng = trainer.engine
            now = (eng.follower_module if decay is None else eng.follower_ema.module).state_dict()
            best_saves.append(all(torch.equal(payload["follower"][k], v) for k, v in now.items()))
        return save(path, payload)

    monkeypatch.setattr(trainer_module, "save_checkpoint", spied_save)
    result = trainer.fit()
    assert best_saves and all(best_saves)
    ckpt = result.run_dir / "checkpoints"
    engine = load_checkpoint(ckpt / "last.pt")["engine"]
    saved = load_checkpoint(ckpt / "ema.pt")["follower"]
    last = load_bundle(result.run_dir, which="last", device="cpu")
    served = last.follower.state_dict()
    # last.pt stores the epoch to run next; its bundle names the last one it finished
    assert last.epoch == load_bundle(result.run_dir, which="ema").epoch == len(result.metrics)
    if decay is None:
        assert engine["follower_ema"] is None
        expected = engine["follower"]
    else:
        t = config.train
        # every follower update, warm-up and inner steps alike, moves the average once
        assert engine["follower_ema_updates"] == t.steps_per_epoch * (1 + t.inner_steps)
        expected = engine["follower_ema"]
        assert any(not torch.equal(expected[k], engine["follower"][k]) for k in expected)
    for k in expected:
        assert torch.equal(saved[k], expected[k]), k
        assert torch.equal(served[k], expected[k]), k


def test_validation_scores_the_followers_weight_average(phantom_cache, tmp_path):
    trainer = _trainer(phantom_cache, tmp_path, **{"train.follower_ema": 0.5})
    engine = trainer.engine
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 64, 64, generator=gen)
    seg = torch.randint(0, 4, (4, 64, 64), generator=gen)
    theta = [_params(engine.follower_module)]
    for _ in range(2):
        engine.follower_step(x, seg)
        theta.append(_params(engine.follower_module))
    assert engine.follower_ema.updates == 2
    # the ramped decay min(m, (1 + t) / (10 + t)): 0.1, then 2/11
    d0, d1 = 0.1, 2 / 11
    avg = engine.follower_ema.module.state_dict()
    moved = 0
    for k, v in avg.items():
        want = d1 * (d0 * theta[0][k] + (1 - d0) * theta[1][k]) + (1 - d1) * theta[2][k]
        torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(v, theta[2][k])
    assert moved  # the average is not the live follower
    with_avg = trainer.validate("warmup")
    # the same scores from a follower that holds the averaged weights, with no average kept
    engine.follower_module.load_state_dict(avg)
    engine.follower_ema = None
    assert trainer.validate("warmup") == with_avg


def test_a_follower_average_resumes_with_its_update_count(phantom_cache, tmp_path):
    from fuse4seg.train.bilevel import Engine

    config = smoke(**{"train.follower_ema": 0.9})
    a = Engine(config, "average", torch.device("cpu"), steps_per_epoch=2)
    gen = torch.Generator().manual_seed(1)
    a.follower_step(torch.rand(2, 1, 64, 64, generator=gen),
                    torch.randint(0, 4, (2, 64, 64), generator=gen))
    b = Engine(config, "average", torch.device("cpu"), steps_per_epoch=2, seed=5)
    b.load_state_dict(a.state_dict())
    assert b.follower_ema.updates == 1
    for k, v in a.follower_ema.state_dict().items():
        assert torch.equal(b.follower_ema.state_dict()[k], v), k
    off = Engine(smoke(), "average", torch.device("cpu"), steps_per_epoch=2)
    state = off.state_dict()
    with pytest.raises(ValueError, match="no follower_ema to resume"):
        b.load_state_dict(state)


def test_follower_ema_must_be_a_decay():
    from fuse4seg.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.follower_ema must be in \(0, 1\)"):
        smoke(**{"train.follower_ema": 1.0})


@pytest.mark.parametrize("ramp", [False, True])
def test_leader_drift_rebuilds_the_initial_live_and_ema_leaders(phantom_cache, tmp_path, ramp,
                                                             monkeypatch, capsys):
    """validation.leader_drift, chapter 4's "Which leader is this?": the initial leader it
    rebuilds is the one the run started from (the glass box's warm-up frame, where the EMA has
    not moved), its EMA is the one the glass box shows after the rollout, and train.ema_warmup
    ramps the EMA's decay."""
    from fuse4seg.train.validation import leader_drift

    config = smoke(**{"train.ema_warmup": ramp})
    result = train(config, "fuse4seg", data=phantom_cache, out=tmp_path, progress=False)
    drift = leader_drift(result.run_dir)
    n = config.train.steps_per_epoch  # one rollout epoch: one leader update per step
    assert drift["updates"] == n == 2
    m = config.train.ema_decay
    share = (1 / 10) * (2 / 11) if ramp else m**n  # min(m, (1 + t) / (10 + t)), t = 0, 1
    assert drift["initial_share"] == pytest.approx(share)
    rows = {row["leader"]: row for row in drift["rows"]}
    glass = result.run_dir / "glassbox"
    with np.load(glass / "inputs.npz") as z:
        x_avg = 0.5 * (z["x1"] + z["x2"])
    for leader, frame in (("initial", "epoch_001"), ("EMA", "epoch_002")):
        with np.load(glass / f"{frame}.npz") as z:
            want = float(np.abs(z["x_fused"] - x_avg).mean())
        assert rows[leader]["from_x_avg"] == pytest.approx(want, rel=1e-4, abs=1e-7), leader
    assert rows["initial"]["from_live"] > 0  # the live leader did move in the rollout
    # the EMA lies between the initial and the live leader, near the initial one unramped
    ema_gap, init_gap = rows["EMA"]["from_live"], rows["initial"]["from_live"]
    assert (ema_gap < 0.5 * init_gap) if ramp else (0.9 * init_gap < ema_gap < init_gap)
    with np.load(glass / "inputs.npz") as z:  # the max rule's distance, for scale
        scale = float(np.abs(np.maximum(z["x1"], z["x2"]) - x_avg).mean())
    assert drift["max_from_x_avg"] == pytest.approx(scale, rel=1e-5) and scale > 0
    average = train(config, "average", data=phantom_cache, out=tmp_path, progress=False)
    assert leader_drift(average.run_dir) is None
    # benchmarks/leader_drift.py: a row per run with a leader, the EMA's gap last
    import bench_scripts

    script = bench_scripts.load("leader_drift")
    monkeypatch.setattr(sys, "argv", ["leader_drift.py", str(result.run_dir),
                                      str(average.run_dir)])
    capsys.readouterr()
    script.main()
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert len(table) == 1 and table[0].startswith(f"| `{result.run_dir.name}` | 0 | {ramp} | 2 |")
    assert table[0].endswith(f"| {ema_gap:.4f} |")
    monkeypatch.setattr(sys, "argv", ["leader_drift.py", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a run folder"):
        script.main()
    (result.run_dir / "checkpoints" / "last.pt").unlink()  # pruned: nothing to rebuild from
    assert leader_drift(result.run_dir) is None


def test_a_cache_with_other_settings_names_only_what_differs_and_where_it_comes_from(tmp_path):
    """A cache prepared for the plain profile, given to a run with ``--set data.crop_size``:
    the error names the one setting, blames the ``--set`` (not the profile) and gives a
    command that keeps it, into a new folder; ``evaluate`` (``split_free``) accepts a cache
    that differs only in its split."""
    from fuse4seg.data.slices import SETTINGS_FIELDS

    config = smoke()
    settings = json.loads(json.dumps({n: getattr(config.data, n) for n in SETTINGS_FIELDS}))
    (tmp_path / "manifest.json").write_text(json.dumps({"settings": settings}))
    wider = get_config("smoke", {"data.crop_size": 96})
    with pytest.raises(ValueError) as err:
        resolve_cache(tmp_path, wider)
    message = str(err.value)
    assert f"data.crop_size {config.data.crop_size} (needed: 96)" in message
    assert "than profile 'smoke' with --set data.crop_size=96 needs" in message
    assert "--out NEW_CACHE --profile smoke --set data.crop_size=96`" in message
    assert "downsample" not in message  # only what differs
    reseeded = get_config("smoke", {"data.split_seed": config.data.split_seed + 1})
    with pytest.raises(ValueError, match=r"data.split_seed \d+ \(needed: \d+\)"):
        resolve_cache(tmp_path, reseeded)
    assert resolve_cache(tmp_path, reseeded, split_free=True) == tmp_path
    # a config file's own profile name: the command names a shipped profile and every setting
    # that differs from it, so that it runs
    import dataclasses

    own = dataclasses.replace(wider, profile="mine")
    with pytest.raises(ValueError) as err:
        resolve_cache(tmp_path, own)
    assert "--profile paper --set data.downsample=4 --set data.crop_size=96" in str(err.value)


def test_an_unknown_model_name_is_refused_by_its_setting_before_the_data(tmp_path):
    """Building the network would refuse it too, but only after the cache is prepared (minutes
    on real data) and without naming the setting."""
    data = tmp_path / "raw"  # never read: the name is checked first
    with pytest.raises(ValueError, match=r"model\.fusion 'fuse4seg_tinny': unknown fusion "
                                         r"model; registered: \['fuse4seg_paper'"):
        train(smoke(**{"model.fusion": "fuse4seg_tinny"}), data=data, out=tmp_path / "runs")
    with pytest.raises(ValueError, match=r"model\.segmentation 'unet': unknown segmentation"):
        train(smoke(**{"model.segmentation": "unet"}), data=data, out=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_an_interrupted_run_says_where_it_stands_and_how_to_go_on(
        checkpointed, phantom_cache, tmp_path, monkeypatch, capsys):
    def interrupted(self, callback=None):  # Ctrl-C during training, after a checkpoint or not
        if checkpointed:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            (self.ckpt_dir / "last.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(smoke(), data=phantom_cache, out=tmp_path / "runs", progress=False)
    (run_dir,) = (tmp_path / "runs").glob("fuse4seg-smoke-*")
    how = (f"it continues from {run_dir / 'checkpoints' / 'last.pt'} with the same command "
           "and --resume" if checkpointed
           else "no checkpoint was written yet; the same command starts it again")
    assert f"training interrupted: {run_dir}: {how}" in capsys.readouterr().err


def test_a_cache_option_holding_another_cache_is_refused_not_replaced(phantom_dir, tmp_path):
    """``--cache OLD`` beside a raw ``--data``: a cache of the same folder and settings is
    used (and brought up to date); one of other data settings or another folder used to be
    prepared again in place, under the runs trained on it (helper review). Now it is refused
    with nothing written, unless ``replace_other`` (the chapters' shared cache)."""
    import shutil

    cache = tmp_path / "old"
    assert resolve_cache(phantom_dir, smoke(), cache=cache, progress=False) == cache
    before = (cache / "manifest.json").read_bytes()
    assert resolve_cache(phantom_dir, smoke(), cache=cache, progress=False) == cache
    stride = smoke().data.slice_stride + 1
    with pytest.raises(ValueError) as err:
        resolve_cache(phantom_dir, smoke(**{"data.slice_stride": stride}), cache=cache)
    assert str(err.value).startswith(
        f"--cache {cache}: holds a slice cache of --data {phantom_dir} prepared with other "
        f"data settings: data.slice_stride {stride - 1} (needed: {stride}); it is not "
        "prepared again in place")
    other = tmp_path / "other"
    shutil.copytree(sorted(phantom_dir.iterdir())[0], other / sorted(phantom_dir.iterdir())[0].name)
    with pytest.raises(ValueError, match="holds the slice cache of another data folder, "
                       f"{phantom_dir.resolve()}, not --data {other}"):
        resolve_cache(other, smoke(), cache=cache)
    assert (cache / "manifest.json").read_bytes() == before  # nothing written
    # evaluate (split_free) takes a cache whose split alone differs as --data, not as --cache
    reseeded = smoke(**{"data.split_seed": smoke().data.split_seed + 1})
    with pytest.raises(ValueError, match=f"or `--data {cache}` evaluates on it as it is, "
                       "with its own split"):
        resolve_cache(phantom_dir, reseeded, cache=cache, split_free=True)
    assert resolve_cache(cache, reseeded, split_free=True) == cache
    resolve_cache(phantom_dir, smoke(**{"data.slice_stride": stride}), cache=cache,
                  progress=False, replace_other=True)
    assert load_manifest(cache)["settings"]["slice_stride"] == stride


def test_resume_with_no_run_to_continue_says_so(phantom_cache, tmp_path, capsys):
    """``train --resume`` where no run of these settings was started trained a new run
    without a word (helper review): a changed setting names another folder, so the user
    thought they were continuing. The command line says so on stderr before it trains; a
    resume that finds the run says nothing."""
    from fuse4seg.cli import main

    args = ["train", "--method", "average", "--profile", "smoke", "--data", str(phantom_cache),
            "--out", str(tmp_path), "--no-progress", "--resume",
            *("--set", "train.warmup_epochs=1", "--set", "train.rollout_epochs=0"),
            *("--set", f"data.split_fractions={SPLIT['data.split_fractions']}")]
    assert main(args) == 0
    err = capsys.readouterr().err
    run_dir = next(tmp_path.glob("average-smoke-*"))
    assert (f"fuse4seg: --resume: {run_dir} does not exist: no run of these settings, method "
            f"and data was started in {tmp_path}; training a new run\n") in err
    assert main(args) == 0  # found and finished: nothing to say
    assert "--resume" not in capsys.readouterr().err
    (run_dir / "checkpoints" / "last.pt").unlink()  # started, no checkpoint written yet
    seen = []
    train(smoke(**{"train.warmup_epochs": 1, "train.rollout_epochs": 0}), "average",
          data=phantom_cache, out=tmp_path, resume=True, progress=False, on_new_run=seen.append)
    assert seen == [run_dir]


def test_environment_summary_names_the_cpu_and_its_threads(monkeypatch):
    """A chapter's setup cell names the CPU model (``platform.processor()`` is empty on Linux)
    and torch's thread count, on which a CPU run's numbers depend."""
    import platform

    from fuse4seg import utils

    monkeypatch.setattr(platform, "processor", lambda: "")
    device = utils.environment_summary("cpu")["device"]
    assert device.startswith(f"cpu ({utils.cpu_name()}, ")
    assert utils.cpu_name() and f"{torch.get_num_threads()} torch threads)" in device


def test_a_run_records_its_numerics_and_each_resume(phantom_cache, tmp_path, monkeypatch):
    """run.json records the versions, the command line and what moves the last float bits
    (threads, device type, FUSE4SEG_* switches); a resume under other numerics is warned
    about and recorded (a review resumed a 1-thread run on 2 threads without a word), and a
    warm-up is shared only under the same numerics."""
    from fuse4seg.train.runs import read_run_json, warmup_key

    config = smoke(**{"train.warmup_epochs": 2, "train.rollout_epochs": 0})

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, "average", data=phantom_cache, out=tmp_path, progress=False,
              callback=stop)
    (run_dir,) = tmp_path.glob("average-*")
    info = read_run_json(run_dir)
    threads = torch.get_num_threads()
    assert info["threads"] == threads and info["switches"] == {}
    assert info["device"] == "cpu" and info["numpy"] == np.__version__
    assert {"python", "fuse4seg", "argv", "torch"} <= set(info)
    monkeypatch.setenv("FUSE4SEG_ADAMW", "loop")
    other = 2 if threads == 1 else 1
    try:
        torch.set_num_threads(other)
        with pytest.warns(UserWarning, match=rf"resumed with other numerics than it started "
                          rf"with \(threads {threads} -> {other}; switches \{{\}} -> "):
            train(config, "average", data=phantom_cache, out=tmp_path, progress=False,
                  resume=True)
        key_other = warmup_key(config, "average", "x")
    finally:
        torch.set_num_threads(threads)
    (resumed,) = read_run_json(run_dir)["resumed"]
    assert resumed["epoch"] == 2 and resumed["step_in_epoch"] == 0
    assert resumed["threads"] == other and resumed["switches"] == {"FUSE4SEG_ADAMW": "loop"}
    assert key_other != warmup_key(config, "average", "x")  # threads and switch
    monkeypatch.delenv("FUSE4SEG_ADAMW")
    assert warmup_key(config, "average", "x") != warmup_key(config, "average", "x", 1, "cuda")


def test_the_data_checksum_is_of_the_data_not_of_its_path(phantom_cache, tmp_path):
    """The same data given as a relative or an absolute path, or moved, keeps its checksum
    (a review found --resume from another folder started a new run); a changed source file
    changes it."""
    from fuse4seg.train.runs import data_checksum

    manifest = json.loads((phantom_cache / "manifest.json").read_text())
    moved = json.loads(json.dumps(manifest))
    moved["data_dir"] = "/elsewhere/phantom"
    for case in moved["case_info"]:
        case["sources"] = {k: f"/elsewhere/{v}" for k, v in case["sources"].items()}
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "manifest.json").write_text(json.dumps(moved, indent=1))
    assert data_checksum(tmp_path / "moved") == data_checksum(phantom_cache)
    changed = json.loads(json.dumps(manifest))
    case = changed["case_info"][0]
    key = next(iter(case["checksums"]))
    case["checksums"][key] = "0" * 40
    (tmp_path / "changed").mkdir()
    (tmp_path / "changed" / "manifest.json").write_text(json.dumps(changed))
    assert data_checksum(tmp_path / "changed") != data_checksum(phantom_cache)


def test_resume_records_and_warm_up_donors_follow_the_run_records(tmp_path, monkeypatch):
    """A diff review's cases: a resume without a readable run.json writes no stub over it;
    an older run.json without ``switches`` is not compared on them; a warm-up donor resumed
    under other numerics is not shared; skipped cases' paths leave the checksum alone."""
    from fuse4seg.train.runs import (
        code_digest,
        data_checksum,
        note_resume,
        numerics,
        shared_warmup,
    )

    gone = tmp_path / "gone"
    gone.mkdir()
    with pytest.warns(UserWarning, match="run.json is missing or unreadable"):
        assert note_resume(gone, "cpu", 2, 0) == []
    assert not (gone / "run.json").exists()
    old = tmp_path / "old"
    old.mkdir()
    now = numerics("cpu")
    (old / "run.json").write_text(json.dumps({k: now[k] for k in ("torch", "threads")}))
    monkeypatch.setenv("FUSE4SEG_ADAMW", "loop")
    assert note_resume(old, "cpu", 2, 0) == []  # no switches recorded: not compared
    monkeypatch.delenv("FUSE4SEG_ADAMW")
    out = tmp_path / "runs"
    donor = out / "donor"
    (donor / "checkpoints").mkdir(parents=True)
    (donor / "checkpoints" / "warmup.pt").write_bytes(b"")
    same = {**numerics("cpu"), "code": code_digest()}
    for resumed, shared in (([], True), ([same], True),
                            ([{**same, "threads": same["threads"] + 1}], False)):
        (donor / "run.json").write_text(json.dumps({"warmup_key": "k", "resumed": resumed}))
        found = shared_warmup(out, "k", exclude=out / "me")
        assert (found == donor / "checkpoints" / "warmup.pt") is shared, resumed
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "manifest.json").write_text(json.dumps(
            {"cases": ["X"], "skipped": [{"case_id": "Y", "error": f"/{where}/Y: bad"}]}))
    assert data_checksum(tmp_path / "a") == data_checksum(tmp_path / "b")
