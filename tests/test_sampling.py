"""Warm-up batches and the patient-level D_tr / D_val split of Algorithm 1 (line 6)."""

from __future__ import annotations

import numpy as np
import pytest

from fuse4seg.train.sampling import RolloutSampler, step_generator, warmup_batches


def test_step_generator_is_a_pure_function_of_its_keys():
    import torch

    a = torch.rand(5, generator=step_generator(0, 1, 2))
    b = torch.rand(5, generator=step_generator(0, 1, 2))
    c = torch.rand(5, generator=step_generator(0, 2, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_warmup_batches_cover_every_item_once_per_epoch():
    batches = warmup_batches(10, 3, seed=0, epoch=1)
    assert [len(b) for b in batches] == [3, 3, 3, 3]
    flat = np.concatenate(batches)
    assert sorted(flat[:10].tolist()) == list(range(10))  # the first pass is a permutation
    again = warmup_batches(10, 3, seed=0, epoch=1)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again, strict=False))
    other = warmup_batches(10, 3, seed=0, epoch=2)
    assert not all(np.array_equal(x, y) for x, y in zip(batches, other, strict=False))


def test_warmup_batches_are_sharded_by_rank():
    r0 = np.concatenate(warmup_batches(16, 2, seed=3, epoch=1, rank=0, world_size=2))
    r1 = np.concatenate(warmup_batches(16, 2, seed=3, epoch=1, rank=1, world_size=2))
    assert len(r0) == len(r1) == 8
    assert not set(r0) & set(r1)
    assert sorted(np.concatenate([r0, r1]).tolist()) == list(range(16))


def test_warmup_batches_extend_past_one_pass():
    batches = warmup_batches(5, 4, seed=0, epoch=1, steps=4)
    assert len(batches) == 4 and all(len(b) == 4 for b in batches)
    # one shuffle of the 5 slices after another: each pass holds every slice once
    flat = np.concatenate(batches)
    assert sorted(flat[:5]) == sorted(flat[5:10]) == [0, 1, 2, 3, 4]
    assert not np.array_equal(flat[:5], flat[5:10])  # a new shuffle, not the same order again
    assert np.array_equal(flat[:4], warmup_batches(5, 4, seed=0, epoch=1)[0])  # one pass's start


def test_rollout_split_never_puts_a_patient_in_both_halves():
    slice_case = np.repeat(np.arange(5), [7, 3, 10, 1, 4])
    sampler = RolloutSampler(slice_case, batch_size=8, seed=0)
    assert sampler.patient_level
    for step in range(200):
        split = sampler.draw(epoch=1, step=step)
        assert len(split.train) == 4 and len(split.val) == 4
        tr = set(slice_case[split.train].tolist())
        va = set(slice_case[split.val].tolist())
        assert not tr & va
        assert tr <= set(split.train_patients) and va <= set(split.val_patients)
        assert not set(split.train_patients) & set(split.val_patients)


def test_rollout_split_two_patients_and_odd_batch():
    slice_case = np.array([0, 0, 0, 1, 1])
    sampler = RolloutSampler(slice_case, batch_size=3, seed=1)
    seen = set()
    for step in range(20):
        split = sampler.draw(1, step)
        assert len(split.train) == 2 and len(split.val) == 1
        tr, va = set(slice_case[split.train]), set(slice_case[split.val])
        assert len(tr) == 1 and len(va) == 1 and tr != va
        seen.add((min(tr), min(va)))
    assert seen == {(0, 1), (1, 0)}  # both assignments occur


def test_rollout_split_is_reproducible_and_rank_dependent():
    slice_case = np.repeat(np.arange(6), 5)
    a = RolloutSampler(slice_case, 4, seed=0, rank=0)
    b = RolloutSampler(slice_case, 4, seed=0, rank=0)
    c = RolloutSampler(slice_case, 4, seed=0, rank=1)
    same = [np.array_equal(a.draw(1, s).train, b.draw(1, s).train) for s in range(10)]
    diff = [np.array_equal(a.draw(1, s).train, c.draw(1, s).train) for s in range(10)]
    assert all(same)
    assert not all(diff)


def test_single_patient_falls_back_to_slice_blocks():
    slice_case = np.zeros(10, dtype=int)
    order = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])  # axial position of each item
    with pytest.warns(UserWarning, match="one training patient"):
        sampler = RolloutSampler(slice_case, 4, seed=0, slice_order=order)
    assert not sampler.patient_level
    for step in range(20):
        split = sampler.draw(1, step)
        assert len(split.train) == len(split.val) == 2  # B/2 each
        assert set(order[split.train]) <= {0, 1, 2, 3, 4}  # inferior half -> D_tr
        assert set(order[split.val]) <= {5, 6, 7, 8, 9}  # superior half -> D_val


def test_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match="2 training slices"):
        RolloutSampler(np.array([0]), 4, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        RolloutSampler(np.array([0, 1]), 1, seed=0)
