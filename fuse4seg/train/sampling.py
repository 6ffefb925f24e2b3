"""Which slices each training step sees: warm-up batches and the patient-level D_tr / D_val split.

Algorithm 1 (line 6) splits every rollout batch **by patient** into D_tr (the follower's K inner
steps) and D_val (the leader's step), so the leader is judged on patients the follower has just
not been fitted to. A batch of 8 random slices from ~1,000 patients rarely repeats a patient, but
small datasets (the phantom, a handful of real cases) would often draw one patient twice, or
only one patient. We therefore draw the two halves from two *disjoint patient pools*: each step
permutes the training patients and gives the first ⌈n/2⌉ to the D_tr pool and the rest to the
D_val pool, then draws ``n_tr`` slices from the first pool and ``B - n_tr`` from the second
(without replacement while a pool has enough slices). No patient is ever in both halves.

The sizes are our reading: the paper gives "a batch size of 8" (§4.1) and splits the batch
(Algorithm 1, line 6) without saying how. We take ``n_tr = ⌈B/2⌉``, so at B = 8 the follower's
rollout updates see 4 slices and the leader's step 4, while its warm-up updates see 8.

Single training patient: a patient-level split is impossible. We then split that patient's
slices into two contiguous blocks of axial slices (the inferior half feeds D_tr, the superior
half D_val) and say so once with a warning; the :class:`RolloutSampler`'s ``patient_level``
is ``False``.

Every draw is a pure function of ``(seed, rank, epoch, step)``: a fresh ``torch.Generator`` is
seeded from those numbers, so a resumed run redraws exactly the batches of the uninterrupted one,
and each DDP rank draws its own splits. Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["RolloutSampler", "SplitBatch", "derived_seed", "step_generator", "warmup_batches"]


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed hashed (SHA-256) from ``parts``, so nearby parts give unrelated seeds."""
    blob = ",".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A ``torch.Generator`` seeded from ``seed`` and integer keys (rank, epoch, step, ...)
    through :func:`derived_seed`."""
    gen = torch.Generator()
    gen.manual_seed(derived_seed(*(int(k) for k in (seed, *keys))))
    return gen


def warmup_batches(
    num_items: int,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    steps: int | None = None,
) -> list[np.ndarray]:
    """The batches of one warm-up (or single-level) epoch: a seeded shuffle, sharded by rank.

    Args:
        num_items: number of training slices N.
        batch_size: slices per batch per rank.
        seed, epoch: the shuffle is a function of these only (same on every rank).
        rank, world_size: rank ``r`` takes batches ``r, r + W, r + 2W, ...`` of the shuffle.
        steps: number of batches to return (``None``: one pass, ``ceil(N / (B·W))``). When more
            batches are asked for than one pass holds, further shuffles are appended.

    Returns:
        A list of int64 index arrays, each of length ``min(batch_size, N)``.

    Raises:
        ValueError: ``num_items`` < 1.
    """
    if num_items < 1:
        raise ValueError("warmup_batches: the training split has no slices")
    per_step = batch_size * world_size
    if steps is None:
        steps = max(1, math.ceil(num_items / per_step))
    order: list[int] = []
    round_ = 0
    while len(order) < steps * per_step:
        gen = step_generator(seed, 0x57A, epoch, round_)
        order.extend(torch.randperm(num_items, generator=gen).tolist())
        round_ += 1
    batches = []
    for s in range(steps):
        start = (s * world_size + rank) * batch_size
        batches.append(np.asarray(order[start : start + batch_size], dtype=np.int64))
    return batches


@dataclass(frozen=True)
class SplitBatch:
    """One rollout batch: item indices of D_tr and D_val and the patients behind them."""

    train: np.ndarray  # (n_tr,) item indices for the K follower steps
    val: np.ndarray  # (B - n_tr,) item indices for the leader step
    train_patients: tuple[int, ...]
    val_patients: tuple[int, ...]


class RolloutSampler:
    """Draws the patient-level D_tr / D_val split of every rollout step (Algorithm 1, line 6).

    Args:
        slice_case: ``(N,)`` patient index of every training item (``SliceDataset.slice_case``).
        batch_size: B, slices per outer step per rank; D_tr gets ``ceil(B/2)``, D_val the rest.
        seed: the run's seed.
        rank: the DDP rank (each rank draws its own splits).
        slice_order: ``(N,)`` axial position of each item (``slice_index``), used only by the
            single-patient fallback to cut the patient into contiguous blocks.

    Raises:
        ValueError: fewer than 2 items, or a batch size < 2.
    """

    def __init__(
        self,
        slice_case: np.ndarray,
        batch_size: int,
        seed: int,
        rank: int = 0,
        slice_order: np.ndarray | None = None,
    ):
        slice_case = np.asarray(slice_case, dtype=np.int64)
        if slice_case.size < 2:
            raise ValueError("RolloutSampler: need at least 2 training slices to split a batch")
        if batch_size < 2:
            raise ValueError("RolloutSampler: batch_size must be >= 2 (D_tr and D_val)")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.patients = np.unique(slice_case)
        self.items_of = {int(p): np.flatnonzero(slice_case == p) for p in self.patients}
        self.patient_level = len(self.patients) >= 2
        self.n_train = math.ceil(batch_size / 2)
        if not self.patient_level:
            order = np.arange(slice_case.size) if slice_order is None else np.asarray(slice_order)
            items = np.argsort(order, kind="stable")
            half = items.size // 2
            self._blocks = (items[:half], items[half:])
            warnings.warn(
                "only one training patient: D_tr and D_val are two contiguous blocks of its "
                "axial slices (inferior / superior half), not a patient-level split",
                stacklevel=2,
            )

    @staticmethod
    def _draw(pool: np.ndarray, n: int, gen: torch.Generator) -> np.ndarray:
        if pool.size >= n:
            pick = torch.randperm(pool.size, generator=gen)[:n].numpy()
        else:  # a small pool: sample with replacement
            pick = torch.randint(pool.size, (n,), generator=gen).numpy()
        return pool[pick]

    def draw(self, epoch: int, step: int) -> SplitBatch:
        """The split batch of outer step ``step`` of ``epoch`` (a pure function of both)."""
        gen = step_generator(self.seed, 0xB1, self.rank, epoch, step)
        n_val = self.batch_size - self.n_train
        if not self.patient_level:
            tr_pool, val_pool = self._blocks
            p = (int(self.patients[0]),)
            return SplitBatch(
                self._draw(tr_pool, self.n_train, gen), self._draw(val_pool, n_val, gen), p, p
            )
        perm = self.patients[torch.randperm(self.patients.size, generator=gen).numpy()]
        cut = math.ceil(perm.size / 2)
        tr_patients, val_patients = perm[:cut], perm[cut:]
        tr_pool = np.concatenate([self.items_of[int(p)] for p in tr_patients])
        val_pool = np.concatenate([self.items_of[int(p)] for p in val_patients])
        return SplitBatch(
            train=self._draw(tr_pool, self.n_train, gen),
            val=self._draw(val_pool, n_val, gen),
            train_patients=tuple(sorted(int(p) for p in tr_patients)),
            val_patients=tuple(sorted(int(p) for p in val_patients)),
        )
