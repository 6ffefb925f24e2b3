"""Fusion-only training, evaluation, the classical rules and the ``fuse4seg fusion`` verbs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fuse4seg.config import get_config
from fuse4seg.data.pairs import find_harvard_pairs, load_pair
from fuse4seg.fusion_baselines import BASELINES, fuse_average, fuse_baseline, fuse_dwt, fuse_max
from fuse4seg.metrics.fusion import fusion_metrics, spatial_frequency
from fuse4seg.train.fusion_only import (
    OrientedLeader,
    PairSampler,
    choose_polarity,
    cross_validate,
    evaluate_fusion,
    fuse_pair,
    fuse_with_leader,
    fusion_schedule,
    load_fusion_leader,
    train_fusion,
)

FAST = dict(steps=3, crop=16, batch_size=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and two pytest-xdist workers with two
    threads each on a 2-core machine slow every step down by 10-100× (oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair_root(tmp_path_factory):
    """A Harvard-layout folder: 3 train and 2 test SPECT-MRI pairs of 48×48 synthetic images."""
    root = tmp_path_factory.mktemp("harvard")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    for split, names in (("train", ["t1", "t2", "t3"]), ("test", ["s1", "s2"])):
        for name in names:
            cx, cy = rng.integers(12, 36, 2)
            mri = (np.hypot(xx - cx, yy - cy) < 14) * 180 + rng.integers(0, 40, (48, 48))
            spect = np.zeros((48, 48, 3), np.uint8)
            spect[..., 0] = np.clip(255 - 6 * np.hypot(xx - cy, yy - cx), 0, 255)
            spect[..., 1] = spect[..., 0] // 2
            for sub, img in (("MRI", mri.astype(np.uint8)), ("SPECT", spect)):
                d = root / "SPECT-MRI" / split / sub
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(d / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def train_pairs(pair_root):
    return [load_pair(p) for p in find_harvard_pairs(pair_root, "SPECT-MRI", "train")]


@pytest.fixture(scope="module")
def test_pairs(pair_root):
    return [load_pair(p) for p in find_harvard_pairs(pair_root, "SPECT-MRI", "test")]


@pytest.fixture(scope="module")
def smoke():
    return get_config("smoke")


# ----------------------------------------------------------------- classical rules


def test_average_and_max_hand_values():
    a = np.array([[0, 10], [200, 255]], np.uint8)
    b = np.array([[4, 10], [100, 0]], np.uint8)
    assert fuse_average(a, b).tolist() == [[2, 10], [150, 127.5]]
    assert fuse_max(a, b).tolist() == [[4, 10], [200, 255]]
    assert fuse_baseline("max", a, b).tolist() == fuse_max(a, b).tolist()
    with pytest.raises(ValueError, match="unknown fusion rule"):
        fuse_baseline("median", a, b)
    with pytest.raises(ValueError, match="one shape"):
        fuse_average(a, b[:1])


def test_dwt_rule_properties():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 255, (40, 36))
    assert np.allclose(fuse_dwt(a, a), a, atol=1e-9)  # identical sources: perfect reconstruction
    flat = np.full_like(a, 128.0)
    fused = fuse_dwt(flat, a)
    # max-abs keeps the textured source's details: far more spatial frequency than the average
    assert spatial_frequency(fused) > 1.5 * spatial_frequency(fuse_average(flat, a))
    assert fused.min() >= a.min() and fused.max() <= a.max()  # clipped to the inputs' range
    with pytest.raises(ValueError, match="wavelet"):
        fuse_dwt(a, a, wavelet="nope")
    assert set(BASELINES) == {"average", "max", "dwt"}


# ----------------------------------------------------------------- schedule and sampler


def test_fusion_schedule(smoke):
    s = fusion_schedule(smoke, 10)
    assert s["steps"] == smoke.fusion.steps == 20 and s["crop"] == smoke.fusion.crop == 48
    paper = get_config("paper")
    p = fusion_schedule(paper, 245)
    assert p["batch_size"] == 8 and p["lr"] == 1e-4 and p["steps"] == 120 * math.ceil(245 / 8)
    assert fusion_schedule(smoke, 10, steps=7)["steps"] == 7
    with pytest.raises(ValueError, match="unknown schedule"):
        fusion_schedule(smoke, 10, epochs=3)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        fusion_schedule(smoke, 10, steps=0)


def test_pair_sampler_applies_one_transform_to_both(train_pairs):
    sampler = PairSampler(train_pairs, crop=100, stride=4, seed=0)
    assert sampler.crop == 48  # reduced to the image side, a multiple of the stride
    twin = [p.__class__(**{**p.__dict__, "b": p.a}) for p in train_pairs]  # B := A
    x1, x2 = PairSampler(twin, crop=20, seed=1).sample(5)
    assert x1.shape == (5, 1, 20, 20) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and 0 <= float(x1.min()) and float(x1.max()) <= 1
    with pytest.raises(ValueError, match="no training pairs"):
        PairSampler([], 16)


# ----------------------------------------------------------------- training and evaluation


class _InvertedAverage(torch.nn.Module):
    """A stand-in leader whose output is the inverted average, 1 − (x1 + x2)/2."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.stride = 1

    def forward(self, x1, x2):
        return 1.0 - 0.5 * (x1 + x2) + 0 * self.w, (x1, x1, x2, x2)


def test_polarity_choice_prefers_the_lower_objective(train_pairs, smoke):
    inverted = _InvertedAverage()
    polarity, losses = choose_polarity(inverted, train_pairs, 16, smoke)
    assert polarity == -1 and losses["inverted"] < losses["as_is"]
    oriented = OrientedLeader(inverted, polarity)
    x1, x2 = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    assert torch.allclose(oriented(x1, x2)[0], 0.5 * (x1 + x2))
    assert oriented.stride == 1
    with pytest.raises(ValueError, match="polarity"):
        OrientedLeader(inverted, 0)


def test_train_reuse_and_inference(train_pairs, test_pairs, smoke, tmp_path):
    run = train_fusion(train_pairs, smoke, tmp_path, **FAST, device="cpu")
    assert not run.reused and run.run_dir.name.startswith("fusion-SPECT-MRI-smoke-")
    for name in ("config.yaml", "run.json", "metrics.jsonl", "checkpoints/leader.pt"):
        assert (run.run_dir / name).is_file(), name
    info = json.loads((run.run_dir / "run.json").read_text())
    assert info["finished"] and info["train_pairs"] == ["t1", "t2", "t3"]
    assert info["polarity"] in (1, -1) and run.leader.polarity == info["polarity"]
    assert run.history[-1]["step"] == 3 and math.isfinite(run.history[-1]["total"])
    again = train_fusion(train_pairs, smoke, tmp_path, **FAST, device="cpu")
    assert again.reused and again.run_dir == run.run_dir
    for p, q in zip(
        run.leader.state_dict().values(), again.leader.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q)
    fused = fuse_with_leader(again.leader, test_pairs[0].a, test_pairs[0].b)
    assert fused.shape == (48, 48) and 0 <= fused.min() and fused.max() <= 255
    assert fused.max() == pytest.approx(255) and fused.min() == pytest.approx(0)  # min-max
    leader, cfg, info = load_fusion_leader(run.run_dir / "checkpoints" / "leader.pt", "cpu")
    assert cfg.profile == "smoke" and info["kind"] == "SPECT-MRI"
    assert leader.polarity == run.leader.polarity
    with pytest.raises(FileNotFoundError):
        load_fusion_leader(tmp_path / "nothing", "cpu")


# A value other than `smoke`'s for every setting of the model, loss and train sections: those
# in FUSION_ONLY_READS must change the trained leader, the others must leave it bit for bit.
OTHER_VALUE = {
    "model.fusion": "fuse4seg_small", "model.segmentation": "convnext_unet_small",
    "model.inn_squeeze": True, "model.source_skip": False, "model.anchor_range": True,
    "loss.alpha_decomp": 2.0, "loss.beta_grad": 1.0, "loss.gamma_recon": 1.0,
    "loss.use_decomp": False, "loss.use_grad": False, "loss.use_recon": False,
    "loss.dice_class_weights": (1.0, 1.0, 1.0, 1.0), "loss.dice_smooth": 1.0,
    "train.warmup_epochs": 3, "train.rollout_epochs": 2, "train.inner_steps": 4,
    "train.batch_size": 3, "train.lr_leader": 1e-2, "train.lr_follower": 1e-2,
    "train.lr_follower_rollout": 1e-2, "train.warmup_anneal": True, "train.weight_decay": 0.5,
    "train.ema_decay": 0.05, "train.ema_warmup": True, "train.follower_ema": 0.5,
    "train.warmup_minmax": True, "train.augment": True, "train.grad_clip": 1e-4,
    "train.steps_per_epoch": 2, "train.val_every": 3, "train.val_max_slices": 2, "train.seed": 5,
}
WITH = {"train.warmup_anneal": {"train.lr_follower_rollout": 1e-2}}
"""A setting that is valid only beside another one, which is changed with it."""
WHERE_NOT_WHAT = ("train.device", "train.amp", "train.compile")
"""Read, but with no effect on a CPU's weights: where it trains, AMP (ignored on a CPU), and
torch.compile (the same maths); so they are not trained with here."""


def test_fusion_training_reads_the_settings_it_declares_and_no_other(train_pairs, tmp_path):
    """`fusion train --set` refuses the settings outside FUSION_ONLY_READS because they change
    nothing: checked here by training, each setting changed in turn (one step each, with the
    fusion section's None values falling back to the train section's)."""
    from dataclasses import fields

    from fuse4seg.config import FUSION_FALLBACKS, FUSION_ONLY_READS, Config

    sections = ("model", "loss", "train")
    names = {f"{s}.{f.name}" for s in sections for f in fields(getattr(Config(), s))}
    assert names == set(OTHER_VALUE) | set(WHERE_NOT_WHAT)  # a new setting must be classified
    assert set(FUSION_ONLY_READS) <= names and set(WHERE_NOT_WHAT) <= set(FUSION_ONLY_READS)
    base = {"fusion.crop": 16, "fusion.steps": None, "fusion.batch": None, "fusion.lr": None,
            "train.batch_size": 2, "train.steps_per_epoch": 1}

    def leader(**changed):
        config = get_config("smoke", {**base, **changed})
        assert all(getattr(getattr(config, n.split(".")[0]), n.split(".")[1]) == v
                   for n, v in changed.items())  # the override was applied
        run = train_fusion(train_pairs, config, tmp_path, device="cpu")
        return list(run.leader.state_dict().values())

    def same(a, b):
        return len(a) == len(b) and all(
            p.shape == q.shape and torch.equal(p, q) for p, q in zip(a, b, strict=True))

    reference, start = leader(), get_config("smoke", base)
    for name, value in OTHER_VALUE.items():
        section, key = name.split(".")
        assert getattr(getattr(start, section), key) != value, name  # another value
        # the annealed warm-up needs a rollout rate of its own (validate), itself not read here
        companion = WITH.get(name, {})
        assert not set(companion) & set(FUSION_ONLY_READS)
        assert same(leader(**{name: value}, **companion), reference) != (
            name in FUSION_ONLY_READS), name
    # the fallbacks are read only where their fusion setting is null: with smoke's own
    # fusion.steps, .batch and .lr they change nothing
    base.update({"fusion.steps": 2, "fusion.batch": 2, "fusion.lr": 1e-3})
    reference = leader()
    for name in FUSION_FALLBACKS:
        assert same(leader(**{name: OTHER_VALUE[name]}), reference), name


def test_a_crop_larger_than_the_images_is_said_and_recorded(train_pairs, smoke, tmp_path):
    """--crop 100 on 48×48 pairs trains on 48-pixel crops: a warning says so, and the run
    records (and is named by) the crop it used, so it is the run of --crop 48."""
    fast = {**FAST, "crop": 100}
    with pytest.warns(UserWarning, match=r"crop 100 is larger .* side \(48\); training on 48"):
        run = train_fusion(train_pairs, smoke, tmp_path, **fast, device="cpu")
    assert json.loads((run.run_dir / "run.json").read_text())["schedule"]["crop"] == 48
    same = train_fusion(train_pairs, smoke, tmp_path, **{**FAST, "crop": 48}, device="cpu")
    assert same.reused and same.run_dir == run.run_dir


def test_a_finished_run_made_by_other_code_is_trained_again(train_pairs, smoke, tmp_path,
                                                            monkeypatch, capsys):
    import fuse4seg.train.runs as runs

    run = train_fusion(train_pairs, smoke, tmp_path, **FAST, device="cpu")
    recorded = json.loads((run.run_dir / "run.json").read_text())["code"]
    assert recorded == runs.code_digest()
    monkeypatch.setattr(runs, "code_digest", lambda: "f" * 12)  # the package changed
    capsys.readouterr()
    again = train_fusion(train_pairs, smoke, tmp_path, **FAST, device="cpu", progress=True)
    said = capsys.readouterr().out.splitlines()
    assert said[:2] == [str(run.run_dir), "  was trained by other fuse4seg code: training it again"]
    assert said[2].startswith(f"  that run:  code {recorded}, commit ")
    assert said[3].startswith(f"  this code: code {'f' * 12}, commit ")
    assert not again.reused and again.run_dir == run.run_dir
    assert json.loads((run.run_dir / "run.json").read_text())["code"] == "f" * 12
    assert train_fusion(train_pairs, smoke, tmp_path, **FAST, device="cpu").reused
    # as the command line asks (a review found `fusion train` retrained a finished run
    # without being asked): reused, with a warning naming both codes
    monkeypatch.setattr(runs, "code_digest", lambda: "e" * 12)
    leader = (run.run_dir / "checkpoints" / "leader.pt").read_bytes()
    with pytest.warns(UserWarning, match="was trained by other fuse4seg code: reusing it anyway"):
        kept = train_fusion(train_pairs, smoke, tmp_path, **FAST, device="cpu",
                            reuse_other_code=True)
    assert kept.reused and (run.run_dir / "checkpoints" / "leader.pt").read_bytes() == leader


def test_evaluate_baseline_and_images(test_pairs, tmp_path):
    res = evaluate_fusion(
        test_pairs, "average", conventions=("standard", "cddfuse"), out_dir=tmp_path
    )
    direct = fusion_metrics(fuse_pair("average", test_pairs[0]), test_pairs[0].a, test_pairs[0].b)
    assert res["metrics"]["standard"]["per_pair"]["s1"]["SSIM"] == pytest.approx(direct["SSIM"])
    assert set(res["metrics"]) == {"standard", "cddfuse"} and res["pairs"] == ["s1", "s2"]
    colour = np.asarray(Image.open(tmp_path / "average" / "color" / "s1.png"))
    grey = np.asarray(Image.open(tmp_path / "average" / "s1.png"))
    assert colour.shape == (48, 48, 3) and grey.shape == (48, 48)
    with pytest.raises(ValueError, match="no leader"):
        fuse_pair("leader", test_pairs[0])


def test_cross_validation_never_scores_a_training_pair(train_pairs, smoke, tmp_path):
    leaders = cross_validate(train_pairs, smoke, tmp_path, folds=3, **FAST, device="cpu")
    assert sorted(leaders) == ["t1", "t2", "t3"]
    runs = sorted(tmp_path.glob("fusion-*"))
    # three folds, each trained on the two pairs it does not score
    used = sorted(json.loads((run / "run.json").read_text())["train_pairs"] for run in runs)
    assert used == [["t1", "t2"], ["t1", "t3"], ["t2", "t3"]]
    with pytest.raises(ValueError, match="folds"):
        cross_validate(train_pairs, smoke, tmp_path, folds=1)


def test_each_pair_gets_the_leader_of_a_fold_that_left_it_out(train_pairs, smoke, monkeypatch):
    """Which leader each pair is scored with: one per fold, and never one trained on it."""
    from types import SimpleNamespace

    import fuse4seg.train.fusion_only as fusion_only

    trained_on: dict[int, set[str]] = {}

    def fake_train(pairs, *args, **kwargs):
        sentinel = object()
        trained_on[id(sentinel)] = {p.name for p in pairs}
        return SimpleNamespace(leader=sentinel)

    monkeypatch.setattr(fusion_only, "train_fusion", fake_train)
    for folds in (2, 3):
        trained_on.clear()
        leaders = cross_validate(train_pairs, smoke, "unused", folds=folds)
        assert sorted(leaders) == ["t1", "t2", "t3"] and len(trained_on) == folds
        for name, leader in leaders.items():
            assert name not in trained_on[id(leader)] and trained_on[id(leader)]
            if folds == 3:  # leave-one-out: trained on exactly the two other pairs
                assert trained_on[id(leader)] == {"t1", "t2", "t3"} - {name}


# ----------------------------------------------------------------- the CLI verbs


def test_fusion_cli_train_and_evaluate(pair_root, tmp_path, capsys):
    from fuse4seg.cli import main

    def fusion(verb, *args):
        return main(["fusion", verb, *map(str, args)])

    runs = tmp_path / "runs"
    spect = ("--pairs", pair_root, "--kind", "SPECT-MRI")
    fast = ("--steps", 2, "--crop", 16, "--batch-size", 2, "--device", "cpu")
    assert fusion("train", *spect, "--profile", "smoke", "--out", runs, *fast) == 0
    run_dir = next(runs.glob("fusion-SPECT-MRI-smoke-*"))
    # a finished run of other code: reused with a warning, or trained again when asked
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "code": "f" * 12}))
    capsys.readouterr()
    with pytest.warns(UserWarning, match="other fuse4seg code: reusing it anyway"):
        assert fusion("train", *spect, "--profile", "smoke", "--out", runs, *fast) == 0
    assert capsys.readouterr().out.startswith(f"reused {run_dir} on ")
    assert fusion("train", *spect, "--profile", "smoke", "--out", runs, *fast,
                  "--restart-if-code-changed") == 0
    assert f"trained {run_dir} on " in capsys.readouterr().out
    out_json = tmp_path / "ev.json"
    rc = fusion("evaluate", run_dir, *spect, "--convention", "all", "--json", out_json,
                "--device", "cpu", "--images", tmp_path / "img")
    assert rc == 0
    said = capsys.readouterr().out  # what was written, as the other verbs say it
    assert f"wrote {out_json}" in said and f"wrote the fused images to {tmp_path / 'img'}" in said
    data = json.loads(out_json.read_text())
    assert data["pairs"] == ["s1", "s2"] and data["trained_on"] == []
    assert set(data["metrics"]) == {"standard", "cddfuse", "matlab_tang"}
    assert data["metrics"]["matlab_tang"]["mean"]["SSIM"] is None  # NaN -> null
    assert (tmp_path / "img" / "leader" / "color" / "s2.png").is_file()
    assert fusion("evaluate", "dwt", *spect, "--only", "s2") == 0
    assert "convention: standard" in capsys.readouterr().out
    # the leader's own training pairs (GFP-PC is scored whole, so the same there): a warning,
    # and their names in the JSON
    with pytest.warns(UserWarning) as seen:
        assert fusion("evaluate", run_dir, *spect, "--split", "train", "--exclude", "t3",
                      "--json", out_json, "--device", "cpu") == 0
    assert [str(w.message).split(": leave")[0] for w in seen] == [
        f"2 of the 2 pairs scored are pairs {run_dir} trained on (t1, t2; its run.json's "
        "train_pairs), so their scores are not held-out scores"]
    assert json.loads(out_json.read_text())["trained_on"] == ["t1", "t2"]
    # clear errors, exit status 2
    assert fusion("evaluate", "dwt", *spect, "--only", "zz") == 2
    assert "--only: no SPECT-MRI test pair(s) named ['zz']" in capsys.readouterr().err
    assert fusion("evaluate", tmp_path / "missing", *spect) == 2
    err = capsys.readouterr().err  # a mistyped rule (or a missing run) lists the rules
    assert "missing: neither a rule (" in err and "dwt" in err and "fusion run folder" in err
    pet = ("--pairs", pair_root, "--kind", "PET-MRI")
    assert fusion("train", *pet, "--profile", "smoke", "--out", runs) == 2
    assert "PET-MRI folder not found" in capsys.readouterr().err


def test_the_pairs_a_leader_trained_on_are_found_wherever_it_is_scored_from(
        train_pairs, test_pairs, pair_root, monkeypatch):
    """A run records its pairs' folder resolved; older run.json files wrote it as given
    (``SPECT-MRI/train`` when trained from the Harvard folder), which resolved against the
    folder of the scoring command missed every pair (helper review): those match by their
    last parts."""
    from fuse4seg.train.fusion_only import pairs_trained_on

    folder = str((pair_root / "SPECT-MRI" / "train").resolve())
    info = {"train_pairs": ["t1", "t2"], "data": [folder]}
    assert pairs_trained_on(info, train_pairs) == ["t1", "t2"]
    assert pairs_trained_on(info, test_pairs) == []
    monkeypatch.chdir(pair_root.parent)  # a relative path from elsewhere
    old = {"train_pairs": ["t1", "t2"], "data": ["SPECT-MRI/train"]}
    assert pairs_trained_on(old, train_pairs) == ["t1", "t2"]
    assert pairs_trained_on({**old, "data": ["SPECT-MRI/test"]}, train_pairs) == []
    assert pairs_trained_on({"kind": "BraTS"}, train_pairs) == []  # a BraTS run's leader


def test_real_harvard_smoke_training(harvard_dir, smoke, tmp_path):
    """A smoke test on real data: a few steps on four real MRI-PET training pairs run, and the
    scores of one test pair are finite (the metrics' values are checked against the reference
    file in test_fusion_metrics.py, not here)."""
    pairs = [load_pair(p) for p in find_harvard_pairs(harvard_dir, "PET-MRI", "train")[:4]]
    run = train_fusion(pairs, smoke, tmp_path, steps=4, crop=32, batch_size=2, device="cpu")
    test = [load_pair(find_harvard_pairs(harvard_dir, "PET-MRI", "test")[0])]
    res = evaluate_fusion(test, "leader", run.leader)
    assert all(math.isfinite(v) for k, v in res["metrics"]["standard"]["mean"].items())


def test_load_leader_from_a_brats_training_bundle(tmp_path, test_pairs):
    """`fusion evaluate` accepts the leader of a `fuse4seg train` run (e.g. disjoint_ae)."""
    from fuse4seg.models import create_fusion
    from fuse4seg.train.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from fuse4seg.train.methods import build_follower

    config = get_config("smoke")
    torch.manual_seed(0)
    leader = create_fusion(config.model.fusion)
    bundle = {
        "format": CHECKPOINT_FORMAT,
        "kind": "bundle",
        "method": "disjoint_ae",
        "config": config.to_dict(),
        "epoch": 3,
        "leader": leader.state_dict(),
        "follower": build_follower(config, "disjoint_ae").state_dict(),
        "scheme": "brats2021",
    }
    save_checkpoint(tmp_path / "best.pt", bundle)
    loaded, cfg, info = load_fusion_leader(tmp_path / "best.pt", "cpu")
    assert info["method"] == "disjoint_ae" and info["kind"] == "BraTS"
    a, b = test_pairs[0].a, test_pairs[0].b
    assert np.allclose(fuse_with_leader(loaded, a, b), fuse_with_leader(leader.eval(), a, b))
