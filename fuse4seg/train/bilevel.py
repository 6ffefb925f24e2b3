"""Algorithm 1: cooperative bi-level training of the fusion leader and the segmentation follower.

Stage 1, follower warm-up (lines 1-4): E_warm epochs of follower steps on x_avg = (x1 + x2)/2
(raw, or min-max normalised like x_f with ``train.warmup_minmax``); the leader is untouched.

Stage 2, asymmetric rollout (lines 5-18), per outer step:

1. draw a batch split **by patient** into D_tr and D_val (:mod:`fuse4seg.train.sampling`);
2. inner loop: K follower steps on D_tr with the leader frozen. The leader's weights do not move
   during the K steps, so x_f on D_tr is computed **once** under ``no_grad`` and reused (the same
   maths as line 9 repeated K times, K − 1 fewer leader forwards);
3. leader step on D_val: the follower's parameters are frozen (``requires_grad=False``: no
   gradient accumulates in them) while the gradient still flows *through* the follower into
   the leader; L_upper = L_lower|D_val + α·L_decomp + β·L_grad + γ·L_recon (Eq. 3);
4. the EMA update of the leader, θ̂ ← m·θ̂ + (1 − m)·θ (Eq. 4). Validation and export use θ̂.

Choices where the paper is silent (and why):

- The warm-up prior is the raw x_avg, as written, although the leader's x_f is min-max
  normalised per image (§3.3.2) and so brighter (a median 1.5x on phantom slices). Measured
  with ``benchmarks/probe_rollout.py`` (the book's default profile, validated every epoch): the
  warmed-up follower scores a validation mean Dice of 0.568 on x_avg but 0.115 on the
  untrained leader's x_f, and 0.000 after the first rollout epoch, before it re-adapts (0.492
  after 10 epochs). The EMA plays no part (EMA and live leader agree to +-0.01) and the leader
  moves little (mean |x_f - minmax(x_avg)| <= 0.009). Warming up on minmax(x_avg)
  (``train.warmup_minmax``) trains a weaker follower (final validation mean Dice 0.27 vs 0.49)
  and does not prevent the fall either; what drives the fall beyond the change of scale is
  not isolated (one phantom, one seed, one validation patient).
- The leader's x_f for the inner loop and the follower during the leader step run in ``eval``
  mode: "frozen" networks should not inject dropout noise into the other's update.
- Cosine schedules without restarts: the follower's over all its updates (warm-up + K per outer
  step), the leader's over its rollout updates; both decay towards 0 (§4.1 names cosine
  annealing without a floor).
- Validation during the warm-up uses the warm-up prior (what the follower was trained on); from
  the rollout on it uses the EMA leader. The best checkpoint is chosen only among validations
  whose input is what inference will use (the EMA leader for Fuse4Seg), by mean Dice over NCR,
  ED and ET.
- L_lower and L_upper are computed in float32 on the autocast outputs.
- A non-finite loss or gradient norm stops the run (:class:`NonFiniteLossError`) before any
  parameter or checkpoint is touched, naming the epoch, step and loss term.

Reproducibility: one seed (``train.seed``) seeds every RNG through ``fuse4seg.utils.set_seed``;
every batch and split is drawn from a generator seeded by (seed, rank, epoch, step); the RNG
states, optimisers, counters and metrics history go into ``last.pt`` (written every epoch and,
with ``checkpoint_every_steps``, every N outer steps), so a CPU run killed and resumed ends with
the same weights and metrics as an uninterrupted one. On CUDA, cuDNN autotuning is on and runs
are seeded but not bit-identical.

Multi-GPU: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised (NCCL on CUDA,
gloo on CPU), both networks are wrapped in ``DistributedDataParallel``, warm-up batches are
sharded by rank, each rank draws its own patient-level rollout splits, and validation, EMA
export, logs and checkpoints happen on rank 0 only (the EMA is updated on every rank from the
same all-reduced leader, so it is identical everywhere).

The same :class:`Trainer` runs every method and ablation of :mod:`fuse4seg.train.baselines`.
Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fuse4seg.config import Config, get_config
from fuse4seg.models.fusion import minmax_normalize
from fuse4seg.train.baselines import (
    ABLATIONS,
    build_follower,
    build_leader,
    fixed_prior,
    method_spec,
)
from fuse4seg.train.checkpoint import (
    CHECKPOINT_FORMAT,
    ModelEMA,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from fuse4seg.train.runs import data_checksum, resolve_cache, run_name
from fuse4seg.train.sampling import RolloutSampler, SplitBatch, warmup_batches
from fuse4seg.utils import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    code_digest,
    git_commit,
)

__all__ = [
    "NonFiniteLossError",
    "TrainResult",
    "Trainer",
    "cosine_lr",
    "train",
]

TUMOUR_CLASSES = ("NCR", "ED", "ET")
GLASSBOX_SLICES = 4


class NonFiniteLossError(RuntimeError):
    """A loss term or gradient became NaN or inf; the message names the step and the term."""


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine annealing without restarts: ``base · ½(1 + cos(π·step/total))``, step 0-based."""
    if total <= 0:
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


@dataclass
class TrainResult:
    """What :func:`train` returns: the run folder, its metrics rows and the best validation."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    best: dict[str, Any] | None
    finished: bool = True
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Distributed helpers


def dist_info() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the ``torchrun`` environment (0, 0, 1 without)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, local, world


def _init_distributed(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":  # one GPU per process, chosen by torchrun's LOCAL_RANK
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)


# ---------------------------------------------------------------------------------------------
# The trainer


def _collate(dataset, indices: np.ndarray, device: torch.device) -> dict[str, Any]:
    items = [dataset[int(i)] for i in indices]
    return {
        "x1": torch.stack([it["x1"] for it in items]).to(device),  # (B, 1, S, S)
        "x2": torch.stack([it["x2"] for it in items]).to(device),  # (B, 1, S, S)
        "seg": torch.stack([it["seg"] for it in items]).to(device),  # (B, S, S)
        "case_id": [it["case_id"] for it in items],
        "case_index": [it["case_index"] for it in items],
    }


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside a ``DistributedDataParallel`` or ``torch.compile`` wrapper."""
    inner = getattr(model, "module", None)  # DDP
    if isinstance(inner, nn.Module):
        return _unwrap(inner)
    inner = getattr(model, "_orig_mod", None)  # torch.compile
    return _unwrap(inner) if isinstance(inner, nn.Module) else model


def _float(value: Any) -> float:
    return float(value.detach().float().item()) if torch.is_tensor(value) else float(value)


class Trainer:
    """One training run of any method (see the module docstring and
    :mod:`fuse4seg.train.baselines`).

    Args:
        config: the resolved config.
        method: one of :data:`fuse4seg.train.baselines.METHODS`.
        cache_dir: a prepared slice cache.
        run_dir: the run folder (created).
        checkpoint_every_steps: also write ``last.pt`` every this many outer steps (the
            end-of-epoch checkpoint is always written).
        progress: show a progress bar (rank 0 only).
        ablation: the Table 3 variant name, recorded in ``run.json``.
        device: overrides ``config.train.device``.

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
    ):
        from fuse4seg.data.slices import SliceDataset

        self.spec = method_spec(method)
        self.config = config
        self.method = method
        self.ablation = ablation
        self.cache_dir = Path(cache_dir)
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if checkpoint_every_steps is not None and checkpoint_every_steps < 1:
            raise ValueError("--checkpoint-every-steps must be >= 1")
        self.checkpoint_every_steps = checkpoint_every_steps
        self._setup_device(device)
        self.progress = progress and self.rank == 0
        t = config.train

        # data: the same patient-level split for every method (the manifest's)
        self.train_set = SliceDataset(self.cache_dir, "train")
        if len(self.train_set) < 2:
            raise ValueError(f"{self.cache_dir}: the training split has fewer than 2 slices")
        self.val_split = "val"
        val_set = SliceDataset(self.cache_dir, "val")
        if len(val_set) == 0:
            warnings.warn(
                "no validation patients in the split: validating on the training patients "
                "(numbers are then training-set numbers)",
                stacklevel=2,
            )
            val_set, self.val_split = self.train_set, "train"
        self.val_set = val_set
        n_val = len(val_set)
        cap = t.val_max_slices
        self.val_items = (
            np.arange(n_val)
            if cap is None or cap >= n_val
            else np.unique(np.linspace(0, n_val - 1, cap).round().astype(np.int64))
        )
        slice_order = np.array(
            [
                self.train_set.case_slices[c][r]
                for c, r in zip(self.train_set.slice_case, self.train_set._row, strict=False)
            ]
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.sampler = RolloutSampler(
                self.train_set.slice_case, t.batch_size, t.seed, self.rank, slice_order
            )
        self.notes = [str(w.message) for w in caught]
        if self.is_main:
            for note in self.notes:
                warnings.warn(note, stacklevel=2)
        if self.val_split == "train":
            self.notes.append("validation on the training patients (no validation split)")
        self.steps_per_epoch = t.steps_per_epoch or max(
            1, math.ceil(len(self.train_set) / (t.batch_size * self.world_size))
        )

        self._setup_networks()
        self._setup_plan()
        self.record_splits = False
        self.split_log: list[tuple[list[int], list[int]]] = []

    def _setup_device(self, device: str | None) -> None:
        from fuse4seg.utils import resolve_device

        config = self.config
        self.rank, self.local_rank, self.world_size = dist_info()
        self.distributed = self.world_size > 1
        t = config.train
        dev = resolve_device(device or t.device)
        if self.distributed and dev.type == "cuda":
            dev = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(dev)
        self.device = dev
        if self.distributed:
            _init_distributed(dev)
        self.is_main = self.rank == 0

        # AMP (§4.1): bf16 autocast where supported, else fp16 with a gradient scaler; off on CPU
        self.amp_dtype = None
        if t.amp and dev.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        use_scaler = self.amp_dtype == torch.float16
        self.scaler_f = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.scaler_l = torch.amp.GradScaler("cuda", enabled=use_scaler)

    def _setup_networks(self) -> None:
        from fuse4seg.utils import set_seed

        config, method, t, dev = self.config, self.method, self.config.train, self.device
        # networks (one seed: the same initial weights on every rank and every run). CPU runs
        # are bit-for-bit repeatable; on CUDA we let cuDNN autotune (fixed shapes), so GPU runs
        # are seeded but not bit-identical.
        set_seed(t.seed, deterministic=dev.type != "cuda")
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.leader = build_leader(config).to(dev) if self.spec["leader"] else None
        self.follower = build_follower(config, method).to(dev)
        size = config.data.crop_size
        for name, net in (("leader", self.leader), ("follower", self.follower)):
            stride = getattr(net, "stride", 1) if net is not None else 1
            if net is not None and size % stride:
                raise ValueError(
                    f"data.crop_size {size} is not divisible by the {name}'s stride {stride}"
                )
        self.ema = ModelEMA(self.leader, t.ema_decay) if self.leader is not None else None
        self.opt_f = torch.optim.AdamW(
            self.follower.parameters(), lr=t.lr_follower, weight_decay=t.weight_decay
        )
        self.opt_l = (
            torch.optim.AdamW(self.leader.parameters(), lr=t.lr_leader, weight_decay=t.weight_decay)
            if self.leader is not None
            else None
        )
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [dev.index] if dev.type == "cuda" else None
            self.follower = DDP(self.follower, device_ids=ids)
            if self.leader is not None:
                self.leader = DDP(self.leader, device_ids=ids)

    def _setup_plan(self) -> None:
        t, method = self.config.train, self.method
        # the stage plan: (stage name, number of epochs)
        E_warm, E_roll = t.warmup_epochs, t.rollout_epochs
        if method == "disjoint_ae":
            self.plan = [("fusion", E_roll), ("warmup", E_warm), ("rollout", E_roll)]
        else:
            self.plan = [("warmup", E_warm), ("rollout", E_roll)]
        self.stage_of_epoch = [s for s, n in self.plan for _ in range(n)]
        self.total_epochs = len(self.stage_of_epoch)
        S, K = self.steps_per_epoch, t.inner_steps
        self.total_follower_updates = E_warm * S + E_roll * S * K
        self.total_leader_updates = E_roll * S if self.leader is not None else 0

        # mutable state (all of it goes into last.pt)
        self.epoch = 1  # the epoch to run next (1-based)
        self.step_in_epoch = 0  # outer steps of that epoch already done
        self.follower_updates = 0
        self.leader_updates = 0
        self.accum: dict[str, list[float]] = {}
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.elapsed = 0.0

    @classmethod
    def engine_only(
        cls,
        config: Config,
        method: str = "fuse4seg",
        device: str | None = None,
        steps_per_epoch: int = 1,
    ) -> Trainer:
        """A trainer without data (networks, optimisers, AMP and the step methods), for
        ``benchmarks/bench_train_step.py``; :meth:`fit` and validation need the full one."""
        self = cls.__new__(cls)
        self.spec = method_spec(method)
        self.config, self.method, self.ablation = config, method, None
        self.run_dir = self.ckpt_dir = Path(".")
        self.checkpoint_every_steps = None
        self._setup_device(device)
        self.progress = False
        self.steps_per_epoch = steps_per_epoch
        self._setup_networks()
        self._setup_plan()
        self.record_splits = False
        self.split_log = []
        return self

    # ----------------------------------------------------------------------------- helpers
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def leader_module(self) -> nn.Module | None:
        return _unwrap(self.leader) if self.leader is not None else None

    @property
    def follower_module(self) -> nn.Module:
        return _unwrap(self.follower)

    def _check_finite(self, terms: dict[str, Any], where: str) -> None:
        """Raise :class:`NonFiniteLossError` when any term is NaN/inf (on any rank)."""
        values = torch.tensor([_float(v) for v in terms.values()], dtype=torch.float64)
        finite = torch.isfinite(values)
        if self.distributed:
            import torch.distributed as dist

            flag = finite.all().to(torch.int32).reshape(1)
            if self.device.type == "cuda":
                flag = flag.to(self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            all_ok = bool(flag.item())
        else:
            all_ok = bool(finite.all())
        if not all_ok:
            bad = [k for k, ok in zip(terms, finite.tolist(), strict=True) if not ok]
            bad = bad or ["(on another rank)"]
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.epoch}, step {self.step_in_epoch + 1} "
                f"({self.stage_of_epoch[self.epoch - 1]} stage): {', '.join(bad)} = "
                f"{[_float(terms[k]) for k in bad if k in terms]}; stopping, the last good "
                f"checkpoint is kept in {self.ckpt_dir}"
            )

    def _enabled_terms(self, terms: dict[str, float]) -> dict[str, float]:
        """The physical terms that enter the total (switched-off ones are only logged)."""
        cfg = self.config.loss
        used = {"decomp": cfg.use_decomp, "grad": cfg.use_grad, "recon": cfg.use_recon}
        return {f"L_{k}": v for k, v in terms.items() if used.get(k, False)}

    def _log(self, **values: float) -> None:
        for k, v in values.items():
            self.accum.setdefault(k, []).append(float(v))

    def prior(self, x1: torch.Tensor, x2: torch.Tensor, stage: str, ema: bool) -> torch.Tensor:
        """The follower's input for a stage: x_avg / a fixed rule / the (EMA) leader's x_f.

        Runs under ``no_grad``; ``(B, 1, H, W)`` pairs in, ``(B, C, H, W)`` out (C = 1 or 2).
        """
        if self.leader is None:
            return fixed_prior(self.method, x1, x2)
        if self.method == "fuse4seg" and stage == "warmup":
            x_avg = fixed_prior("average", x1, x2)  # Algorithm 1, line 2
            # optionally in x_f's domain (min-max, §3.3.2): see TrainConfig.warmup_minmax
            return minmax_normalize(x_avg) if self.config.train.warmup_minmax else x_avg
        net = self.ema.module if ema or self.method == "disjoint_ae" else self.leader_module
        was_training = net.training
        net.eval()
        with torch.no_grad(), self._autocast():
            x_fused, _ = net(x1, x2)  # (B, 1, H, W) x2 -> (B, 1, H, W)
        net.train(was_training)
        return x_fused.float()

    # ----------------------------------------------------------------------------- steps
    def follower_step(self, x_in: torch.Tensor, target: torch.Tensor, stage: str) -> float:
        """One follower update on ``x_in (B, C, H, W)``, ``target (B, H, W)`` (Eq. 2)."""
        from fuse4seg.losses import lower_loss

        t, loss_cfg = self.config.train, self.config.loss
        lr = cosine_lr(t.lr_follower, self.follower_updates, self.total_follower_updates)
        for group in self.opt_f.param_groups:
            group["lr"] = lr
        self.follower.train()
        self.opt_f.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self.follower(x_in)  # (B, C, H, W) -> (B, 4, H, W)
        loss = lower_loss(
            logits.float(),
            target,
            class_weights=loss_cfg.dice_class_weights,
            smooth=loss_cfg.dice_smooth,
        )
        self._check_finite({"L_lower": loss}, "follower")
        self._optimiser_step(loss, "L_lower", "follower")
        self.follower_updates += 1
        return _float(loss)

    def _optimiser_step(self, loss: torch.Tensor, name: str, who: str) -> None:
        """Backpropagate ``loss`` and take one clipped AdamW step of ``who`` (``"follower"``
        or ``"leader"``), through its gradient scaler (a no-op unless fp16 AMP). A non-finite
        gradient norm stops the run before the step (under fp16 the scaler skips it instead)."""
        net, opt, scaler = (
            (self.follower, self.opt_f, self.scaler_f)
            if who == "follower"
            else (self.leader, self.opt_l, self.scaler_l)
        )
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), self.config.train.grad_clip)
        if not scaler.is_enabled():
            self._check_finite({f"gradient norm of {name}": norm}, who)
        scaler.step(opt)
        scaler.update()

    def leader_step(self, x1, x2, target) -> dict[str, float]:
        """One leader update on D_val with L_upper (Eq. 3), then the EMA update (Eq. 4).

        The follower's parameters get ``requires_grad=False`` for the step, so no gradient
        accumulates in them, yet ∂L_lower/∂x_f flows through the follower into the leader.
        """
        from fuse4seg.losses import lower_loss, upper_loss

        t, loss_cfg = self.config.train, self.config.loss
        for group in self.opt_l.param_groups:
            group["lr"] = cosine_lr(t.lr_leader, self.leader_updates, self.total_leader_updates)
        follower = self.follower_module  # unwrapped: no DDP all-reduce for frozen weights
        frozen = [p for p in follower.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        follower.eval()
        try:
            self.leader.train()
            self.opt_l.zero_grad(set_to_none=True)
            with self._autocast():
                x_fused, feats = self.leader(x1, x2)  # (B, 1, H, W) x2 -> (B, 1, H, W), feats
                logits = follower(x_fused)  # (B, 1, H, W) -> (B, 4, H, W)
            seg = lower_loss(
                logits.float(),
                target,
                class_weights=loss_cfg.dice_class_weights,
                smooth=loss_cfg.dice_smooth,
            )
            total, terms = upper_loss(
                seg, x_fused.float(), x1, x2, tuple(f.float() for f in feats), loss_cfg
            )
            self._check_finite(
                {"L_lower|D_val": seg, **self._enabled_terms(terms), "L_upper": total}, "leader"
            )
            self._optimiser_step(total, "L_upper", "leader")
        finally:
            for p in frozen:
                p.requires_grad_(True)
            follower.train()
        self.ema.update(self.leader_module)  # Eq. 4
        self.leader_updates += 1
        out = {"L_upper": _float(total), "L_lower_val": _float(seg)}
        out.update({f"upper/{k}": _float(v) for k, v in terms.items()})
        return out

    def fusion_step(self, x1, x2) -> dict[str, float]:
        """One leader update with the physical losses alone (the ``disjoint_ae`` baseline)."""
        from fuse4seg.losses import physical_loss

        t = self.config.train
        for group in self.opt_l.param_groups:
            group["lr"] = cosine_lr(t.lr_leader, self.leader_updates, self.total_leader_updates)
        self.leader.train()
        self.opt_l.zero_grad(set_to_none=True)
        with self._autocast():
            x_fused, feats = self.leader(x1, x2)
        result = physical_loss(
            x_fused.float(), x1, x2, tuple(f.float() for f in feats), self.config.loss
        )
        total, terms = result if isinstance(result, tuple) else (result, {})
        self._check_finite({**self._enabled_terms(terms), "L_physical": total}, "leader")
        self._optimiser_step(total, "L_physical", "leader")
        self.ema.update(self.leader_module)
        self.leader_updates += 1
        out = {"L_physical": _float(total)}
        out.update({f"physical/{k}": _float(v) for k, v in terms.items()})
        return out

    def outer_step(self, stage: str, epoch: int, step: int) -> dict[str, float]:
        """One step of a stage; returns the values to log."""
        t = self.config.train
        ds = self.train_set
        if stage in ("warmup", "fusion"):
            batches = warmup_batches(
                len(ds),
                t.batch_size,
                t.seed + (0 if stage == "warmup" else 7),
                epoch,
                self.rank,
                self.world_size,
                self.steps_per_epoch,
            )
            batch = _collate(ds, batches[step], self.device)
            if stage == "fusion":
                return self.fusion_step(batch["x1"], batch["x2"])
            x_in = self.prior(batch["x1"], batch["x2"], stage, ema=False)
            return {"L_lower": self.follower_step(x_in, batch["seg"], stage)}
        # rollout: Algorithm 1 lines 6-17
        split: SplitBatch = self.sampler.draw(epoch, step)
        tr = _collate(ds, split.train, self.device)
        if self.record_splits:  # what the tests check: no patient in both halves
            self.split_log.append((tr["case_index"], [int(ds.slice_case[i]) for i in split.val]))
        x_tr = self.prior(tr["x1"], tr["x2"], stage, ema=False)  # x_f^(tr), computed once
        inner = [self.follower_step(x_tr, tr["seg"], stage) for _ in range(t.inner_steps)]
        out = {"L_lower": float(np.mean(inner))}
        if self.spec["bilevel"]:
            val = _collate(ds, split.val, self.device)
            out.update(self.leader_step(val["x1"], val["x2"], val["seg"]))
        return out

    # ----------------------------------------------------------------------------- validation
    def inference_prior_stage(self, stage: str) -> bool:
        """Whether validation in ``stage`` uses the input inference will use."""
        if self.method == "fuse4seg":
            return stage == "rollout"
        if self.method == "disjoint_ae":
            return stage != "fusion"
        return True

    @torch.no_grad()
    def validate(
        self, stage: str, batch_size: int | None = None, ema: bool = True
    ) -> dict[str, Any]:
        """Dice/IoU per class and region over the validation slices (3-D counts per patient).

        The prior comes from the EMA leader (what inference uses, Algorithm 1's output);
        ``ema=False`` uses the live leader instead, the one the follower has been trained on
        (``benchmarks/probe_rollout.py`` compares the two).
        """
        from fuse4seg.metrics.segmentation import SegmentationMeter

        follower = self.follower_module
        follower.eval()
        meter = SegmentationMeter()
        bs = batch_size or max(self.config.train.batch_size, 8)
        for start in range(0, len(self.val_items), bs):
            idx = self.val_items[start : start + bs]
            batch = _collate(self.val_set, idx, self.device)
            x_in = self.prior(batch["x1"], batch["x2"], stage, ema=ema)
            with self._autocast():
                logits = follower(x_in)  # (B, C, S, S) -> (B, 4, S, S)
            meter.update(logits.argmax(dim=1).cpu(), batch["seg"].cpu(), batch["case_id"])
        follower.train()
        result = meter.compute()
        mean = result["mean"]
        dice = [mean[c]["dice"] for c in TUMOUR_CLASSES]
        iou = [mean[c]["iou"] for c in TUMOUR_CLASSES]
        prior = (
            ("ema_leader" if ema or self.method == "disjoint_ae" else "leader")
            if self.leader is not None and not (self.method == "fuse4seg" and stage == "warmup")
            else (
                "minmax(x_avg)"
                if self.method == "fuse4seg" and self.config.train.warmup_minmax
                else "x_avg"
                if self.method in ("fuse4seg", "average")
                else self.method
            )
        )
        return {
            "split": self.val_split,
            "prior": prior,
            "slices": int(len(self.val_items)),
            "mean_dice": float(np.mean(dice)),
            "mean_iou": float(np.mean(iou)),
            "per_class": {c: {k: float(v) for k, v in mean[c].items()} for c in mean},
        }

    def _glassbox(self, epoch: int) -> None:
        """Save the EMA leader's x_f of a few fixed validation slices (the "glass box", §4.3)."""
        if self.leader is None:
            return
        folder = self.run_dir / "glassbox"
        inputs = folder / "inputs.npz"
        if not inputs.exists():
            seg_sizes = []
            for i in self.val_items:
                seg = self.val_set[int(i)]["seg"]
                seg_sizes.append(int((seg > 0).sum()))
            order = np.argsort(-np.asarray(seg_sizes), kind="stable")[:GLASSBOX_SLICES]
            self.glass_items = np.sort(self.val_items[order])
            batch = _collate(self.val_set, self.glass_items, torch.device("cpu"))
            self._save_npz(
                inputs,
                items=self.glass_items,
                x1=batch["x1"][:, 0].numpy(),
                x2=batch["x2"][:, 0].numpy(),
                seg=batch["seg"].numpy().astype(np.uint8),
                case_id=np.array(batch["case_id"]),
            )
        else:
            with np.load(inputs) as z:
                self.glass_items = z["items"]
        batch = _collate(self.val_set, self.glass_items, self.device)
        net = self.ema.module
        net.eval()
        with torch.no_grad():
            x_fused, _ = net(batch["x1"], batch["x2"])
        self._save_npz(
            folder / f"epoch_{epoch:03d}.npz",
            x_fused=x_fused[:, 0].float().cpu().numpy(),
            stage=np.array(self.stage_of_epoch[epoch - 1]),
        )

    @staticmethod
    def _save_npz(path: Path, **arrays) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())

    # ----------------------------------------------------------------------------- state
    def bundle(self, epoch: int) -> dict[str, Any]:
        """The inference bundle after ``epoch``: EMA leader, follower, config (``best.pt`` /
        ``ema.pt``)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": "bundle",
            "method": self.method,
            "config": self.config.to_dict(),
            "epoch": epoch,
            "leader": self.ema.state_dict() if self.ema is not None else None,
            "follower": self.follower_module.state_dict(),
            "scheme": self.scheme,
        }

    @property
    def scheme(self) -> str:
        info = self.train_set.manifest.get("case_info", [])
        return info[0].get("layout", "brats2021") if info else "brats2021"

    def state(self) -> dict[str, Any]:
        """Everything :meth:`load_state` needs to continue bit-for-bit."""
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": "training",
            "method": self.method,
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "follower_updates": self.follower_updates,
            "leader_updates": self.leader_updates,
            "accum": {k: list(v) for k, v in self.accum.items()},
            "history": self.history,
            "best": self.best,
            "elapsed": self.elapsed,
            "leader": self.leader_module.state_dict() if self.leader is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "follower": self.follower_module.state_dict(),
            "opt_follower": self.opt_f.state_dict(),
            "opt_leader": self.opt_l.state_dict() if self.opt_l is not None else None,
            "scaler_follower": self.scaler_f.state_dict(),
            "scaler_leader": self.scaler_l.state_dict(),
            "rng": capture_rng(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` (networks, optimisers, counters, history, RNGs)."""
        if state.get("kind") != "training" or state.get("method") != self.method:
            raise ValueError(f"{self.ckpt_dir / 'last.pt'}: not a training state of {self.method}")
        if self.leader is not None:
            self.leader_module.load_state_dict(state["leader"])
            self.ema.load_state_dict(state["ema"])
            self.opt_l.load_state_dict(state["opt_leader"])
        self.follower_module.load_state_dict(state["follower"])
        self.opt_f.load_state_dict(state["opt_follower"])
        if state["scaler_follower"]:
            self.scaler_f.load_state_dict(state["scaler_follower"])
        if state["scaler_leader"]:
            self.scaler_l.load_state_dict(state["scaler_leader"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.follower_updates = int(state["follower_updates"])
        self.leader_updates = int(state["leader_updates"])
        self.accum = {k: list(v) for k, v in state["accum"].items()}
        self.history = list(state["history"])
        self.best = state["best"]
        self.elapsed = float(state["elapsed"])
        restore_rng(state["rng"])

    def save_last(self) -> None:
        if self.is_main:
            save_checkpoint(self.ckpt_dir / "last.pt", self.state())
            save_checkpoint(self.ckpt_dir / "ema.pt", self.bundle(self.epoch - 1))

    def _write_metrics(self) -> None:
        text = "".join(json.dumps(row) + "\n" for row in self.history)
        atomic_write_text(self.run_dir / "metrics.jsonl", text)

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
        total_steps = self.total_epochs * S
        done = (self.epoch - 1) * S + self.step_in_epoch
        bar = tqdm(
            total=total_steps,
            initial=done,
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
        )
        started = time.perf_counter() - self.elapsed
        try:
            while self.epoch <= self.total_epochs:
                epoch = self.epoch
                stage = self.stage_of_epoch[epoch - 1]
                bar.set_description(f"{self.method} {stage} {epoch}/{self.total_epochs}")
                while self.step_in_epoch < S:
                    values = self.outer_step(stage, epoch, self.step_in_epoch)
                    self._log(**values)
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
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
        return TrainResult(self.run_dir, list(self.history), self.best, True, self.notes)

    def _end_epoch(self, epoch: int, stage: str, started: float, callback) -> None:
        t = self.config.train
        row: dict[str, Any] = {"epoch": epoch, "stage": stage, "steps": self.step_in_epoch}
        row.update({k: float(np.mean(v)) for k, v in sorted(self.accum.items())})
        row["lr_follower"] = cosine_lr(
            t.lr_follower, max(self.follower_updates - 1, 0), self.total_follower_updates
        )
        if self.leader is not None:
            row["lr_leader"] = cosine_lr(
                t.lr_leader, max(self.leader_updates - 1, 0), self.total_leader_updates
            )
        row["follower_updates"] = self.follower_updates
        row["leader_updates"] = self.leader_updates
        due = epoch % t.val_every == 0 or epoch == self.total_epochs
        if self.is_main and due and stage != "fusion":
            row["val"] = self.validate(stage)
            self._glassbox(epoch)
            if self.inference_prior_stage(stage) and (
                self.best is None or row["val"]["mean_dice"] > self.best["mean_dice"]
            ):
                self.best = {
                    "epoch": epoch,
                    "mean_dice": row["val"]["mean_dice"],
                    "mean_iou": row["val"]["mean_iou"],
                }
                save_checkpoint(self.ckpt_dir / "best.pt", self.bundle(epoch))
        elif self.is_main and due and stage == "fusion":
            self._glassbox(epoch)
        self.elapsed = time.perf_counter() - started
        row["elapsed_s"] = round(self.elapsed, 3)
        self.history.append(row)
        self.epoch, self.step_in_epoch = epoch + 1, 0
        self.accum = {}
        if self.is_main:
            self._write_metrics()
            self.save_last()
            if callback is not None:
                callback(row)
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


# ---------------------------------------------------------------------------------------------
# The entry point


def _write_run_files(
    run_dir: Path,
    config: Config,
    method: str,
    ablation,
    data,
    cache,
    checksum: str,
    world_size: int,
) -> None:
    config.to_yaml(run_dir / "config.yaml")
    atomic_write_json(
        run_dir / "run.json",
        {
            "method": method,
            "ablation": ablation,
            "profile": config.profile,
            "commit": git_commit(),
            "code": code_digest(),
            "data": str(Path(data).resolve()),
            "cache": str(Path(cache).resolve()),
            "data_checksum": checksum,
            "world_size": world_size,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )


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
) -> TrainResult:
    """Train ``method`` on ``data`` into ``out/<method>-<profile>-<hash>/`` (Algorithm 1).

    Args:
        config: the resolved config (default: ``get_config("default")``).
        method: one of :data:`fuse4seg.train.baselines.METHODS`; ignored when ``ablation`` names
            a Table 3 variant (which fixes the method).
        data: a prepared slice cache (a folder with ``manifest.json``) or a raw BraTS/phantom
            folder, prepared into ``cache`` or ``out/cache-<hash>``.
        out: the runs folder.
        resume: continue from ``checkpoints/last.pt`` of the matching run folder (a finished run
            returns at once). Without it an existing run folder with checkpoints is an error.
        checkpoint_every_steps: also checkpoint every N outer steps.
        ablation: ``"baseline"``, ``"A"``, ``"B"`` or ``"full"`` (Table 3).
        device: overrides ``config.train.device``.
        callback: called with each epoch's metrics row (rank 0).
        restart_if_code_changed: with ``resume``, a run folder written by other package code
            (``run.json``'s ``code``, :func:`fuse4seg.utils.code_digest`) is emptied and the run
            starts again, instead of continuing (or returning) it with a warning. The book's
            chapter 4 uses it, so its numbers always come from the code beside them.

    Returns:
        :class:`TrainResult` (run folder, metrics rows, best validation).

    Raises:
        ValueError: unknown method or ablation, bad data, a run folder that exists without
            ``resume``; :class:`NonFiniteLossError` on NaN/inf.

    Explained in chapter 4 (``book/04_bilevel_training.md``).
    """
    config = config or get_config("default")
    if data is None:
        raise ValueError("train: give --data (a raw BraTS folder or a prepared cache)")
    if ablation is not None:
        if ablation not in ABLATIONS:
            raise ValueError(f"--ablation {ablation!r}: choose one of {', '.join(ABLATIONS)}")
        method, overrides = ABLATIONS[ablation]
        flat = {}
        for key, value in overrides.items():
            flat[key] = value
        config = get_config(config.profile, {**_flatten(config), **flat})
    method_spec(method)
    rank, _, world_size = dist_info()
    out = Path(out)
    if rank == 0:
        cache_dir = resolve_cache(data, config, cache=cache, runs_dir=out, progress=progress)
    if world_size > 1:  # rank 0 prepares the cache; the others wait, then read it
        import torch.distributed as dist

        from fuse4seg.utils import resolve_device

        dev = resolve_device(device or config.train.device)
        _init_distributed(dev)
        dist.barrier()
        if rank != 0:
            cache_dir = resolve_cache(data, config, cache=cache, runs_dir=out, progress=False)
    checksum = data_checksum(cache_dir)
    run_dir = out / run_name(config, method, checksum, world_size)
    last = run_dir / "checkpoints" / "last.pt"
    failure = None
    if resume and last.exists() and rank == 0:
        try:
            _check_code(run_dir, restart_if_code_changed)
        except OSError as exc:  # raised after the barrier, so no rank waits for rank 0 forever
            failure = exc
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0 may have moved the folder away
    if failure is not None:
        raise failure
    if last.exists() and not resume:
        raise ValueError(
            f"{run_dir} already holds a run; pass --resume to continue it (or delete the folder)"
        )
    trainer = Trainer(
        config, method, cache_dir, run_dir, checkpoint_every_steps, progress, ablation, device
    )
    if resume and last.exists():
        trainer.load_state(load_checkpoint(last, map_location=trainer.device))
        if rank == 0:
            trainer._write_metrics()  # drop rows written after the checkpoint
    elif rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_run_files(run_dir, config, method, ablation, data, cache_dir, checksum, world_size)
        if (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()
    return trainer.fit(callback)


def _check_code(run_dir: Path, restart: bool) -> None:
    """Compare the run's recorded code digest with this package's (see :func:`train`)."""
    import shutil

    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        info = {}
    recorded, current = info.get("code"), code_digest()
    if recorded == current:
        return
    what = (
        f"{run_dir} was trained by other fuse4seg code (code {recorded or 'not recorded'}, "
        f"commit {info.get('commit', 'unknown')}; this is code {current}, commit {git_commit()})"
    )
    if restart:
        print(f"{what}: starting it again", file=sys.stderr, flush=True)
        # one rename first, so an interruption never leaves a mix of old and new files
        stale = run_dir.with_name(f"{run_dir.name}.stale-{os.getpid()}")
        os.replace(run_dir, stale)
        shutil.rmtree(stale)
    else:
        warnings.warn(f"{what}: resuming it anyway", stacklevel=3)


def _flatten(config: Config) -> dict[str, Any]:
    return {
        f"{section}.{name}": value
        for section, values in config.to_dict().items()
        if isinstance(values, dict)
        for name, value in values.items()
    }
