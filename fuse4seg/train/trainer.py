"""The loop around Algorithm 1: data, the stage plan, validation, checkpoints, resume.

:class:`Trainer` runs any method's stage plan (:mod:`fuse4seg.train.methods`) on a prepared slice
cache with the steps of :class:`fuse4seg.train.bilevel.Engine`; :func:`train` is the entry point
(CLI ``fuse4seg train``) that resolves the data and the run folder (:mod:`fuse4seg.train.runs`).

Reproducibility: one seed (``train.seed``) seeds every RNG through ``fuse4seg.utils.set_seed``;
every batch and split is drawn from a generator seeded by (seed, rank, epoch, step); the RNG
states, optimisers, counters and metrics history go into ``last.pt`` (written every epoch and,
with ``checkpoint_every_steps``, every N outer steps), so a CPU run killed and resumed ends with
the same weights and metrics as an uninterrupted one. On CUDA, cuDNN autotuning is on and runs
are seeded but not bit-identical. Multi-GPU: :mod:`fuse4seg.train.distributed`.

Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fuse4seg.config import Config, get_config
from fuse4seg.train import runs
from fuse4seg.train.bilevel import Engine, steps_per_epoch
from fuse4seg.train.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from fuse4seg.train.distributed import (
    all_ranks_agree,
    barrier,
    dist_info,
    init_distributed,
)
from fuse4seg.train.methods import get_ablation, get_method
from fuse4seg.train.sampling import RolloutSampler, warmup_batches
from fuse4seg.train.validation import collate, glassbox, validate

__all__ = ["TrainResult", "Trainer", "train"]


@dataclass
class TrainResult:
    """What :func:`train` returns: the run folder, its metrics rows and the best validation."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    best: dict[str, Any] | None
    finished: bool = True
    notes: list[str] = field(default_factory=list)


class SliceBatches:
    """The trainer's :class:`fuse4seg.train.bilevel.Batches`: seeded warm-up batches and the
    patient-level rollout splits of a :class:`~fuse4seg.data.slices.SliceDataset`.

    ``on_split(train_patients, val_patients)`` (optional) sees every rollout split.
    """

    def __init__(self, dataset, config: Config, rank: int, world: int, steps: int, device,
                 on_split: Callable[[list[int], list[int]], None] | None = None):
        t = config.train
        self.dataset, self.config, self.rank, self.world = dataset, config, rank, world
        self.steps, self.device, self.on_split = steps, device, on_split
        slice_order = np.array(
            [dataset.case_slices[c][r]
             for c, r in zip(dataset.slice_case, dataset._row, strict=False)]
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.sampler = RolloutSampler(dataset.slice_case, t.batch_size, t.seed, rank,
                                          slice_order)
        self.notes = [str(w.message) for w in caught]

    def single(self, stage: str, epoch: int, step: int) -> dict[str, Any]:
        t = self.config.train
        seed = t.seed + (0 if stage == "warmup" else 7)  # the fusion stage shuffles apart
        batches = warmup_batches(len(self.dataset), t.batch_size, seed, epoch, self.rank,
                                 self.world, self.steps)
        return collate(self.dataset, batches[step], self.device)

    def split(self, epoch: int, step: int, need_val: bool):
        split = self.sampler.draw(epoch, step)
        if self.on_split is not None:
            val_patients = [int(self.dataset.slice_case[i]) for i in split.val]
            tr_patients = [int(self.dataset.slice_case[i]) for i in split.train]
            self.on_split(tr_patients, val_patients)
        tr = collate(self.dataset, split.train, self.device)
        return tr, (collate(self.dataset, split.val, self.device) if need_val else None)


class Trainer:
    """One training run of any method (:mod:`fuse4seg.train.methods`).

    Args:
        config: the resolved config.
        method: a method name.
        cache_dir: a prepared slice cache.
        run_dir: the run folder (created).
        checkpoint_every_steps: also write ``last.pt`` every this many outer steps (the
            end-of-epoch checkpoint is always written).
        progress: show a progress bar (rank 0 only).
        ablation: the Table 3 variant name, recorded in ``run.json``.
        device: overrides ``config.train.device``.
        on_split: called with the patients of D_tr and D_val of every rollout step.

    Explained in chapter 4.
    """

    def __init__(
        self,
        config: Config,
        method: str,
        cache_dir: str | Path,
        run_dir: str | Path,
        checkpoint_every_steps: int | None = None,
        progress: bool = True,
        ablation: str | None = None,
        device: str | None = None,
        on_split: Callable[[list[int], list[int]], None] | None = None,
    ):
        from fuse4seg.data.slices import SliceDataset
        from fuse4seg.utils import resolve_device

        self.spec = get_method(method)
        self.config, self.method, self.ablation = config, method, ablation
        self.cache_dir, self.run_dir = Path(cache_dir), Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if checkpoint_every_steps is not None and checkpoint_every_steps < 1:
            raise ValueError("--checkpoint-every-steps must be >= 1")
        self.checkpoint_every_steps = checkpoint_every_steps
        t = config.train

        self.rank, local_rank, self.world_size = dist_info()
        self.distributed = self.world_size > 1
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        dev = resolve_device(device or t.device)
        if self.distributed and dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if self.distributed:
            init_distributed(dev)
        self.device = dev

        # data: the same patient-level split for every method (the manifest's)
        self.train_set = SliceDataset(self.cache_dir, "train")
        if len(self.train_set) < 2:
            raise ValueError(f"{self.cache_dir}: the training split has fewer than 2 slices")
        self.val_split, self.val_set = "val", SliceDataset(self.cache_dir, "val")
        if len(self.val_set) == 0:
            warnings.warn(
                "no validation patients in the split: validating on the training patients "
                "(numbers are then training-set numbers)",
                stacklevel=2,
            )
            self.val_set, self.val_split = self.train_set, "train"
        n_val, cap = len(self.val_set), t.val_max_slices
        self.val_items = (
            np.arange(n_val)
            if cap is None or cap >= n_val
            else np.unique(np.linspace(0, n_val - 1, cap).round().astype(np.int64))
        )
        S = steps_per_epoch(config, len(self.train_set), self.world_size)
        self.batches = SliceBatches(self.train_set, config, self.rank, self.world_size, S, dev,
                                    on_split)
        self.notes = list(self.batches.notes)
        if self.is_main:
            for note in self.notes:
                warnings.warn(note, stacklevel=2)
        if self.val_split == "train":
            self.notes.append("validation on the training patients (no validation split)")

        self.engine = Engine(
            config, self.spec, dev, S, where=self._where,
            all_ranks=all_ranks_agree(dev) if self.distributed else None,
            ddp=self.distributed,
            # the slices a frozen leader fuses: validation keeps its own, also when it runs on
            # the training patients (validate's cache key names its cases)
            frozen_slices=len(self.train_set) + len(self.val_items),
        )
        self.steps_per_epoch = S
        self.stage_of_epoch = self.engine.stage_of_epoch
        self.total_epochs = len(self.stage_of_epoch)
        # A plan that starts with the warm-up and continues with a rollout (not disjoint_ae,
        # whose first stage trains the leader with the loss switches) can share its warm-up
        # with the Table 3 variants of the same run (train(): runs.shared_warmup), provided no
        # warm-up validation can pick the best checkpoint (best.pt stays in the first run).
        stages = list(self.stage_of_epoch)
        self.warmup_end = stages.index("rollout") if "rollout" in stages else 0
        self.can_share_warmup = (
            self.warmup_end > 0 and set(stages[: self.warmup_end]) == {"warmup"}
            and not self.spec.validates_inference_input("warmup")
        )

        # mutable state (all of it goes into last.pt)
        self.epoch = 1  # the epoch to run next (1-based)
        self.step_in_epoch = 0  # outer steps of that epoch already done
        self.accum: dict[str, list[float]] = {}
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.elapsed = 0.0

    def _where(self) -> str:
        stage = self.stage_of_epoch[self.epoch - 1]
        return (
            f"epoch {self.epoch}, step {self.step_in_epoch + 1} ({stage} stage); stopping, the "
            f"last good checkpoint is kept in {self.ckpt_dir}"
        )

    def prior(self, x1, x2, stage: str, ema: bool) -> torch.Tensor:
        """The follower's input in ``stage`` (:meth:`~fuse4seg.train.bilevel.Engine.prior`)."""
        return self.engine.prior(x1, x2, stage, ema)

    def validate(self, stage: str, batch_size: int | None = None, ema: bool = True) -> dict:
        """Validation Dice/IoU in ``stage`` (:func:`fuse4seg.train.validation.validate`)."""
        from fuse4seg.inference import default_batch_size

        # a CPU is faster per slice on small batches (inference.default_batch_size)
        bs = batch_size or (default_batch_size(self.device) if self.device.type == "cpu"
                            else max(self.config.train.batch_size, 8))
        result = validate(self.engine, self.val_set, self.val_items, stage, bs, ema)
        return {"split": self.val_split, **result}

    # ----------------------------------------------------------------------------- state
    @property
    def scheme(self) -> str | None:
        """The label scheme of the training cases, which ``predict`` writes its labels in
        when the input's file names do not say (:func:`fuse4seg.inference.predict`):
        :func:`fuse4seg.data.slices.training_scheme` (``None`` for ``named`` cases of a
        cache prepared before it recorded their scheme)."""
        from fuse4seg.data.slices import training_scheme

        return training_scheme(self.train_set.manifest, self.train_set.case_ids)

    def bundle(self, epoch: int) -> dict[str, Any]:
        """The inference bundle after ``epoch``: EMA leader, follower (its weight average with
        ``train.follower_ema``), config (``best.pt`` / ``ema.pt``)."""
        ema = self.engine.ema
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": "bundle",
            "method": self.method,
            "config": self.config.to_dict(),
            "epoch": epoch,
            "leader": ema.state_dict() if ema is not None else None,
            "follower": self.engine.eval_follower.state_dict(),
            "scheme": self.scheme,
        }

    def state(self) -> dict[str, Any]:
        """Everything :meth:`load_state` needs to continue bit-for-bit."""
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": "training",
            "method": self.method,
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "accum": {k: list(v) for k, v in self.accum.items()},
            "history": self.history,
            "best": self.best,
            "elapsed": self.elapsed,
            "engine": self.engine.state_dict(),
            "rng": capture_rng(),
            "scheme": self.scheme,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` (networks, optimisers, counters, history, RNGs)."""
        last = self.ckpt_dir / "last.pt"
        if state.get("kind") != "training" or state.get("method") != self.method:
            raise ValueError(f"{last}: not a training state of {self.method}")
        if "engine" not in state:
            raise ValueError(f"{last}: written by an older fuse4seg; delete the run folder")
        self.engine.load_state_dict(state["engine"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.accum = {k: list(v) for k, v in state["accum"].items()}
        self.history = list(state["history"])
        self.best = state["best"]
        self.elapsed = float(state["elapsed"])
        restore_rng(state["rng"])

    def save_last(self) -> None:
        if self.is_main:
            save_checkpoint(self.ckpt_dir / "last.pt", self.state())
            save_checkpoint(self.ckpt_dir / "ema.pt", self.bundle(self.epoch - 1))

    def write_metrics(self) -> None:
        runs.write_metrics(self.run_dir, self.history)

    # ----------------------------------------------------------------------------- the loop
    def fit(self, callback: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
        """Run (or continue) the plan; returns a :class:`TrainResult`.

        Args:
            callback: called on rank 0 with each epoch's metrics row.

        Raises:
            NonFiniteLossError: a NaN/inf loss (the last good checkpoint is kept).
        """
        from tqdm.auto import tqdm

        S = self.steps_per_epoch
        done = (self.epoch - 1) * S + self.step_in_epoch
        bar = tqdm(total=self.total_epochs * S, initial=done, disable=not self.progress,
                   unit="step", dynamic_ncols=True, desc=self.method)
        started = time.perf_counter() - self.elapsed
        try:
            while self.epoch <= self.total_epochs:
                epoch = self.epoch
                stage = self.stage_of_epoch[epoch - 1]
                bar.set_description(f"{self.method} {stage} {epoch}/{self.total_epochs}")
                while self.step_in_epoch < S:
                    values = self.engine.outer_step(stage, epoch, self.step_in_epoch,
                                                    self.batches)
                    for k, v in values.items():
                        self.accum.setdefault(k, []).append(float(v))
                    self.step_in_epoch += 1
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in values.items() if "/" not in k})
                    every = self.checkpoint_every_steps
                    global_step = (epoch - 1) * S + self.step_in_epoch
                    if every and global_step % every == 0 and self.step_in_epoch < S:
                        self.elapsed = time.perf_counter() - started
                        self.save_last()
                self._end_epoch(epoch, stage, started, callback)
        finally:
            bar.close()
        if self.is_main:
            runs.mark_finished(self.run_dir, self.total_epochs, self.best)
        barrier()
        return TrainResult(self.run_dir, list(self.history), self.best, True, self.notes)

    def _end_epoch(self, epoch: int, stage: str, started: float, callback) -> None:
        t, eng = self.config.train, self.engine
        row: dict[str, Any] = {"epoch": epoch, "stage": stage, "steps": self.step_in_epoch}
        row.update({k: float(np.mean(v)) for k, v in sorted(self.accum.items())})
        row["lr_follower"] = eng.follower.lr(max(eng.follower.updates - 1, 0))
        if eng.leader is not None:
            row["lr_leader"] = eng.leader.lr(max(eng.leader.updates - 1, 0))
        if stage == "warmup" and epoch == self.warmup_end:
            # the next epoch is the first rollout epoch: the follower's loss on its D_tr halves
            # before any rollout update (Engine.stage_change_reference); rollout_targets
            # divides that epoch's L_lower_first by it
            on_split, self.batches.on_split = self.batches.on_split, None  # not a real draw
            try:
                row["L_lower_ref_next"] = eng.stage_change_reference(self.batches, epoch + 1)
            finally:
                self.batches.on_split = on_split
        row["follower_updates"] = eng.follower.updates
        row["leader_updates"] = eng.leader.updates if eng.leader is not None else 0
        due = epoch % t.val_every == 0 or epoch == self.total_epochs
        if self.is_main and due:
            if stage != "fusion":
                row["val"] = self.validate(stage)
            glassbox(eng, self.val_set, self.val_items, self.run_dir / "glassbox", epoch, stage)
            if self.spec.validates_inference_input(stage) and (
                self.best is None or row["val"]["mean_dice"] > self.best["mean_dice"]
            ):
                self.best = {
                    "epoch": epoch,
                    "mean_dice": row["val"]["mean_dice"],
                    "mean_iou": row["val"]["mean_iou"],
                }
                save_checkpoint(self.ckpt_dir / "best.pt", self.bundle(epoch))
        self.elapsed = time.perf_counter() - started
        row["elapsed_s"] = round(self.elapsed, 3)
        self.history.append(row)
        self.epoch, self.step_in_epoch = epoch + 1, 0
        self.accum = {}
        if self.is_main:
            self.write_metrics()
            self.save_last()
            if self.can_share_warmup and epoch == self.warmup_end:
                # the state a variant with the same warm-up continues from (train(): shared_warmup)
                save_checkpoint(self.ckpt_dir / "warmup.pt", self.state())
            if callback is not None:
                callback(row)
        barrier()


def train(
    config: Config | None = None,
    method: str = "fuse4seg",
    data: str | Path | None = None,
    out: str | Path = "runs",
    cache: str | Path | None = None,
    resume: bool = False,
    checkpoint_every_steps: int | None = None,
    progress: bool = True,
    ablation: str | None = None,
    device: str | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    restart_if_code_changed: bool = False,
    on_new_run: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Train ``method`` on ``data`` into ``out/<method>-<profile>-<hash>/`` (Algorithm 1).

    Args:
        config: the resolved config (default: ``get_config("default")``).
        method: one of :data:`fuse4seg.train.methods.METHODS`; ignored when ``ablation`` names
            a Table 3 variant (which fixes the method).
        data: a prepared slice cache (a folder with ``manifest.json``) or a raw BraTS/phantom
            folder, prepared into ``cache`` or ``out/cache-<hash>``.
        out: the runs folder.
        resume: continue from ``checkpoints/last.pt`` of the matching run folder (a finished run
            returns at once, from ``run.json``'s ``finished`` record, without building a model).
            Without it an existing run folder with checkpoints is an error.
        checkpoint_every_steps: also checkpoint every N outer steps.
        ablation: ``"baseline"``, ``"A"``, ``"B"`` or ``"full"`` (Table 3).
        device: overrides ``config.train.device``.
        callback: called with each epoch's metrics row (rank 0).
        restart_if_code_changed: with ``resume``, a run folder written by other package code
            (``run.json``'s ``code``, :func:`fuse4seg.utils.code_digest`) is emptied and the run
            starts again, instead of continuing (or returning) it with a warning. The book's
            chapter 4 uses it, so its numbers always come from the code beside them.
        on_new_run: with ``resume``, called (rank 0) with the run folder when there is no
            checkpoint there to continue from and a new run starts, before the folder is made
            (``fuse4seg train --resume`` says so: a changed setting names another folder).

    Returns:
        :class:`TrainResult` (run folder, metrics rows, best validation).

    Raises:
        ValueError: unknown method or ablation, bad data, a run folder that exists without
            ``resume``; :class:`~fuse4seg.train.engine.NonFiniteLossError` on NaN/inf.

    Algorithm 1 returns the final θ̂_f and θ_s; the run keeps those (``checkpoints/last.pt``,
    ``--which last``) and also the checkpoint of its best validation (``best.pt``), which
    evaluation and prediction use by default. That choice is ours: the paper does not say
    which weights its tables score.

    Explained in chapter 4 (``book/04_bilevel_training.md``).
    """
    config = config or get_config("default")
    if data is None:
        raise ValueError("train: give --data (a raw BraTS folder or a prepared cache)")
    if ablation is not None:
        variant = get_ablation(ablation)
        method = variant.method
        config = get_config(config.profile, {**runs.flatten(config), **variant.overrides})
    get_method(method)
    from fuse4seg.models.registry import check_model_names
    from fuse4seg.utils import (
        check_env_switches,
        missing_folders,
        remove_empty_folders,
        resolve_device,
    )

    # a bad --device or FUSE4SEG_* switch fails before the cache
    resolve_device(device or config.train.device)
    check_env_switches()
    check_model_names(config)
    rank, _, world_size = dist_info()
    out = Path(out)
    if rank == 0:
        made = missing_folders(out)  # a bad data folder leaves no empty --out chain behind
        try:
            cache_dir = runs.resolve_cache(data, config, cache=cache, runs_dir=out,
                                           progress=progress)
        except BaseException:
            remove_empty_folders(made)
            raise
    if world_size > 1:  # rank 0 prepares the cache; the others wait, then read it
        from fuse4seg.utils import resolve_device

        init_distributed(resolve_device(device or config.train.device))
        barrier()
        if rank != 0:
            cache_dir = runs.resolve_cache(data, config, cache=cache, runs_dir=out,
                                           progress=False)
    checksum = runs.data_checksum(cache_dir)
    run_dir = out / runs.run_name(config, method, checksum, world_size)
    last = run_dir / "checkpoints" / "last.pt"
    failure = None
    had_checkpoint = last.exists()
    if resume and had_checkpoint and rank == 0:
        try:
            runs.check_code(run_dir, restart_if_code_changed)
        except OSError as exc:  # raised after the barrier, so no rank waits for rank 0 forever
            failure = exc
    barrier()  # rank 0 may have moved the folder away
    if failure is not None:
        raise failure
    if resume and world_size == 1 and (done := runs.finished_run(run_dir)) is not None:
        # a finished run of this code: its files say everything; build no model, load nothing
        return TrainResult(run_dir, runs.read_metrics(run_dir), done["best"], True)
    if last.exists() and not resume:
        raise ValueError(
            f"{run_dir} already holds a finished run of this code; --resume reuses it, or "
            "delete the folder to train it again" if runs.finished_run(run_dir) is not None
            else f"{run_dir} already holds a run; pass --resume to continue it (or delete the "
            "folder)"
        )
    trainer = Trainer(
        config, method, cache_dir, run_dir, checkpoint_every_steps, progress, ablation, device
    )
    if resume and last.exists():
        trainer.load_state(load_checkpoint(last, map_location=trainer.device))
        if rank == 0:
            trainer.write_metrics()  # drop rows written after the checkpoint
            differ = runs.note_resume(run_dir, trainer.device, trainer.epoch,
                                      trainer.step_in_epoch)
            if differ:
                warnings.warn(f"{run_dir}: resumed with other numerics than it started with "
                              f"({'; '.join(differ)}): it will differ in the last float bits "
                              "from a run never stopped", stacklevel=2)
    elif rank == 0:
        if resume and on_new_run is not None and not had_checkpoint:  # not a restart of
            on_new_run(run_dir)  # other code's run: check_code says that one
        run_dir.mkdir(parents=True, exist_ok=True)
        config.to_yaml(run_dir / "config.yaml")
        key = runs.warmup_key(config, method, checksum, world_size, trainer.device)
        # (one process only: under DDP every rank would have to load the same state)
        donor = (runs.shared_warmup(out, key, exclude=run_dir, device=trainer.device)
                 if trainer.can_share_warmup and world_size == 1 else None)
        runs.write_run_json(
            run_dir,
            method=method,
            ablation=ablation,
            profile=config.profile,
            seed=config.train.seed,
            data=str(Path(data).resolve()),
            cache=str(Path(cache_dir).resolve()),
            data_checksum=checksum,
            split=trainer.train_set.manifest["split"],
            world_size=world_size,
            device=str(trainer.device),
            warmup_key=key,
            warmup_from=donor.parent.parent.name if donor is not None else None,
        )
        if (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()
        if donor is not None:
            # Table 3's variants differ only in the leader's upper loss, so their warm-ups are
            # the same bit for bit: continue from the one already trained, as a resumed run would
            trainer.load_state(load_checkpoint(donor, map_location=trainer.device))
            trainer.write_metrics()
            if progress:
                print(f"warm-up shared with {donor.parent.parent.name}", flush=True)
    try:
        return trainer.fit(callback)
    except KeyboardInterrupt:
        if rank == 0:  # say where the run stands and how to go on (Ctrl-C, a stopped job)
            how = (f"it continues from {last} with the same command and --resume"
                   if last.exists() else "no checkpoint was written yet; the same command "
                   "starts it again")
            print(f"\ntraining interrupted: {run_dir}: {how}", file=sys.stderr, flush=True)
        raise

