"""The follower's light augmentation (train.augment)."""

import pytest
import torch

from fuse4seg.train.augment import augment
from fuse4seg.train.sampling import step_generator


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 48, 48, generator=g)
    seg = torch.zeros(6, 48, 48, dtype=torch.int64)
    seg[:, 14:30, 10:26] = 2
    seg[:, 18:24, 14:20] = 3
    x[:, 0][seg > 0] += 0.5
    return x, seg


def test_same_draw_same_batch_other_draw_other_batch():
    x, seg = _batch()
    a = augment(x, seg, step_generator(0, 1, 2, 3))
    b = augment(x, seg, step_generator(0, 1, 2, 3))
    c = augment(x, seg, step_generator(1, 1, 2, 3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_labels_keep_their_values_and_roughly_their_area():
    x, seg = _batch()
    out, labels = augment(x, seg, step_generator(5))
    assert out.shape == x.shape and labels.shape == seg.shape and labels.dtype == seg.dtype
    assert set(labels.unique().tolist()) <= {0, 2, 3}
    area, new = (seg > 0).sum(dim=(1, 2)).float(), (labels > 0).sum(dim=(1, 2)).float()
    # scales of 0.9-1.1 change an area by at most (1/0.9)^2 = 1.23x
    assert ((new / area) > 0.75).all() and ((new / area) < 1.3).all()
    # the label moves with the image: tumour pixels stay the brightest on average
    assert out[:, 0][labels > 0].mean() > out[:, 0][labels == 0].mean()


def test_brightness_spans_the_minmax_range():
    # a flat image of 0.6: the centre pixel becomes brightness b x 0.6**gamma, so its ratio to
    # 0.6 is b x 0.6**(gamma - 1), with b in [0.75, 1/0.75] and gamma in [0.8, 1.25]
    x = torch.full((8, 1, 32, 32), 0.6)
    seg = torch.zeros(8, 32, 32, dtype=torch.int64)
    ratios = []
    for s in range(20):
        out, _ = augment(x, seg, step_generator(s))
        ratios += (out[:, 0, 16, 16] / 0.6).tolist()
    assert min(ratios) < 0.85 and max(ratios) > 1.25  # the draws spread over the range
    low, high = 0.75 * 0.6 ** 0.25, 0.6 ** -0.2 / 0.75  # ... and stay inside it
    assert low - 1e-6 <= min(ratios) and max(ratios) <= high + 1e-6, (low, high)


def test_bad_shapes_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(4, 1, 8, 8\)"):
        augment(torch.zeros(4, 1, 8, 8), torch.zeros(4, 9, 9, dtype=torch.int64),
                step_generator(0))


def test_engine_augments_only_with_the_switch():
    from fuse4seg.config import get_config
    from fuse4seg.train.bilevel import Engine

    x, seg = _batch()
    losses = {}
    for flag in (False, True, True):
        cfg = get_config("smoke", {"train.augment": flag, "data.crop_size": 48})
        eng = Engine(cfg, "average", torch.device("cpu"), steps_per_epoch=2)
        losses.setdefault(flag, []).append(eng.follower_step(x, seg, (1, 0, 0)))
    assert losses[True][0] == losses[True][1]  # seeded: repeatable
    assert losses[True][0] != losses[False][0]


class _Batches:
    """Batches of one fixed slice stack (the Engine's Batches protocol)."""

    def __init__(self):
        x, seg = _batch()
        self.batch = {"x1": x, "x2": x.clone(), "seg": seg}

    def single(self, stage, epoch, step):
        return self.batch

    def split(self, epoch, step, need_val):
        half = {k: v[:3] for k, v in self.batch.items()}
        return half, (half if need_val else None)


def test_the_rollout_has_its_own_follower_learning_rate():
    from fuse4seg.config import get_config
    from fuse4seg.train.bilevel import Engine

    cfg = get_config("smoke", {"data.crop_size": 48, "train.lr_follower": 3e-3,
                               "train.lr_follower_rollout": 3e-4})
    eng = Engine(cfg, "fuse4seg", torch.device("cpu"), steps_per_epoch=2)
    batches = _Batches()
    eng.outer_step("warmup", 1, 0, batches)
    assert eng.follower.base_lr == 3e-3
    eng.outer_step("rollout", 2, 0, batches)
    assert eng.follower.base_lr == 3e-4
    # the cosine keeps its position: the rate is the rollout base times the schedule's factor
    assert 0 < eng.follower.lr() < 3e-4
    paper = Engine(get_config("smoke", {"data.crop_size": 48}), "average", torch.device("cpu"), 2)
    paper.outer_step("rollout", 2, 0, batches)
    assert paper.follower.base_lr == get_config("smoke").train.lr_follower


def test_the_annealed_warmup_ends_at_the_rollouts_first_rate():
    """train.warmup_anneal: the warm-up starts at lr_follower and decays without a jump into
    the rate the rollout starts with; off, the rate drops by lr_follower / lr_follower_rollout
    at the stage change; without a rollout rate of its own the switch would change nothing,
    and is refused."""
    from fuse4seg.config import get_config
    from fuse4seg.train.bilevel import Engine
    from fuse4seg.train.engine import cosine_lr

    def rates(anneal, rollout_lr=3e-4):
        cfg = get_config("smoke", {"data.crop_size": 48, "train.warmup_epochs": 3,
                                   "train.rollout_epochs": 2, "train.inner_steps": 2,
                                   "train.lr_follower": 3e-3,
                                   "train.lr_follower_rollout": rollout_lr,
                                   "train.warmup_anneal": anneal})
        eng = Engine(cfg, "average", torch.device("cpu"), steps_per_epoch=4)
        eng._set_follower_rate("warmup")
        warm = [eng.follower.lr(u) for u in range(12)]
        eng._set_follower_rate("rollout")
        roll = [eng.follower.lr(u) for u in range(12, 28)]
        return warm, roll

    warm, roll = rates(True)
    total = 12 + 16
    assert warm[0] == pytest.approx(3e-3)
    assert all(a > b for a, b in zip(warm, warm[1:], strict=False))  # decays throughout
    # the rollout's base on the common cosine plus the difference on the warm-up's own
    assert warm[-1] == pytest.approx(cosine_lr(3e-4, 11, total) + cosine_lr(2.7e-3, 11, 12))
    assert roll[0] == pytest.approx(cosine_lr(3e-4, 12, total))
    assert warm[-1] / roll[0] < 1.5  # no jump at the change (4 updates an epoch here)
    plain_warm, plain_roll = rates(False)
    assert plain_roll == roll  # the rollout is unchanged
    assert plain_warm[-1] / plain_roll[0] > 9  # without it, a 10x drop
    from fuse4seg.config import ConfigError

    for rollout_lr, what in ((None, "null"), (3e-3, "train.lr_follower")):
        with pytest.raises(ConfigError, match="train.warmup_anneal anneals the warm-up into "
                           f"train.lr_follower_rollout, which is {what}: set another"):
            rates(True, rollout_lr=rollout_lr)
    # a run recorded by older code with the switch where it acted as off still loads, off
    from fuse4seg.config import config_from_dict

    recorded = get_config("smoke").to_dict()
    recorded["train"]["warmup_anneal"] = True
    assert config_from_dict(recorded) == get_config("smoke")
    recorded["train"]["lr_follower_rollout"] = 1e-4  # where it acted, it stays
    assert config_from_dict(recorded).train.warmup_anneal
