"""Algorithm 1: cooperative bi-level training of the fusion leader and the segmentation follower.

This file holds the steps and little else; the loop over epochs, validation, checkpoints and run
folders live beside it (:mod:`fuse4seg.train.trainer`, :mod:`fuse4seg.train.validation`,
:mod:`fuse4seg.train.runs`), the shared optimiser step, schedule, EMA and guard in
:mod:`fuse4seg.train.engine`, and what each method trains in :mod:`fuse4seg.train.methods`.

Stage 1, follower warm-up (lines 1-4): E_warm epochs of follower steps on x_avg = (x1 + x2)/2
(raw, or min-max normalised like x_f with ``train.warmup_minmax``); the leader is untouched.

Stage 2, asymmetric rollout (lines 5-18), per outer step (:meth:`Engine.outer_step`):

1. draw a batch split **by patient** into D_tr and D_val (:mod:`fuse4seg.train.sampling`);
2. inner loop: K follower steps on D_tr with the leader frozen. The leader's weights do not move
   during the K steps, so x_f on D_tr is computed **once** under ``no_grad`` and reused (the same
   maths as line 9 repeated K times, K − 1 fewer leader forwards);
3. leader step on D_val (:meth:`Engine.leader_step`): the follower's parameters are frozen
   (``requires_grad=False``: no gradient accumulates in them) while the gradient still flows
   *through* the follower into the leader; L_upper = L_lower|D_val + α·L_decomp + β·L_grad +
   γ·L_recon (Eq. 3);
4. the EMA update of the leader, θ̂ ← m·θ̂ + (1 − m)·θ (Eq. 4). Validation and export use θ̂.

Choices where the paper is silent (and why):

- The warm-up prior is the raw x_avg, as written, although the leader's x_f is min-max
  normalised per image (§3.3.2) and so brighter. That change of scale is the main cause of the
  validation collapse at the start of the rollout: ``benchmarks/probe_collapse.py`` restarts
  the rollout from one warmed-up follower under one change at a time, over 3 seeds, on the
  phantom and on six real cases (table in ``benchmarks/RESULTS.md``, chapter 4). Putting x_f on
  x_avg's intensity range (``model.anchor_range``) prevents the fall to zero; with x_f anchored,
  the rest of the fall came from the follower's K inner steps on half a batch at the warm-up's
  high learning rate, which ``train.lr_follower_rollout`` lowers. Both are on in the
  ``default`` profile and off in ``paper``. The leader's first updates and the follower's
  carried-over AdamW moments play no part. Warming up on minmax(x_avg)
  (``train.warmup_minmax``) or with brightness augmentation (``train.augment``) avoids the
  change of scale but trains a much weaker follower in the default profile's 240 warm-up
  steps: per-image min-max takes away the absolute intensity the follower reads tumour classes
  from.
- The leader's x_f for the inner loop and the follower during the leader step run in ``eval``
  mode. Neither network has dropout or batch normalisation, so today this changes nothing; it
  keeps a frozen network deterministic should a layer that behaves differently in training be
  added.
- Cosine schedules without restarts: the follower's over all its updates (warm-up + K per outer
  step), the leader's over its rollout updates; both decay towards 0 (§4.1 names cosine
  annealing without a floor).
- L_lower and L_upper are computed in float32 on the autocast outputs.
- What the stage change does to the follower is logged on the same slices: at the end of the
  warm-up, :meth:`Engine.stage_change_reference` scores the follower, with no update, on the
  D_tr halves of the first rollout epoch (``L_lower_ref_next``), and every rollout step logs
  its first inner loss (``L_lower_first``). The epochs' logged ``L_lower`` are not comparable
  across the change: the batch soft Dice of Eq. 2 is higher on D_tr's B/2 slices from half
  the patients than on B random slices, for the same follower.
- Each network's initial weights come from its own seed, derived from ``train.seed``
  (:func:`init_seed`). The paper does not say how its runs were seeded. We chose this so that
  the methods of one seed are a paired comparison: ``fuse4seg``, ``average``, ``max`` and
  ``disjoint_ae`` start from the same follower, ``fuse4seg`` and ``disjoint_ae`` from the same
  leader, and since every batch and augmentation is drawn from (seed, epoch, step), Fuse4Seg's
  warm-up on x_avg is ``average``'s warm-up bit for bit (on the same device and thread count).
  A difference between the two is then the rollout's, not the luck of two initialisations.
- A non-finite loss or gradient norm stops the run (``NonFiniteLossError``) before any
  parameter or checkpoint is touched, naming the epoch, step and loss term.

Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from fuse4seg.config import Config
from fuse4seg.fusion_baselines import RULE_LABELS, RULES
from fuse4seg.models import build_leader, minmax_normalize, place_leader
from fuse4seg.train.engine import (
    Learner,
    ModelEMA,
    amp_dtype,
    autocast,
    check_finite,
    compile_net,
    compile_wanted,
    to_float,
    tune_malloc,
    unwrap,
)
from fuse4seg.train.methods import MethodSpec, build_follower, get_method
from fuse4seg.train.sampling import derived_seed

__all__ = ["Batches", "Engine", "init_seed"]


class Batches(Protocol):
    """Where the steps get their data (the trainer's slice cache, or a benchmark's tensors).

    ``single(stage, epoch, step)`` returns a batch dict (``x1``, ``x2`` ``(B, 1, S, S)``,
    ``seg`` ``(B, S, S)``) for a warm-up or fusion step; ``split(epoch, step, need_val)``
    returns the patient-disjoint ``(D_tr, D_val)`` pair of batch dicts of a rollout step (D_val
    ``None`` unless ``need_val``).
    """

    def single(self, stage: str, epoch: int, step: int) -> dict[str, Any]: ...

    def split(
        self, epoch: int, step: int, need_val: bool
    ) -> tuple[dict[str, Any], dict[str, Any] | None]: ...


def init_seed(seed: int, network: str) -> int:
    """The seed of ``network``'s initial weights (``"leader"`` or ``"follower"``) in a run of
    seed ``seed``: a hash of both, so the two networks draw unrelated weights and each one's
    draw does not depend on whether the other exists (the module docstring says why)."""
    return derived_seed(int(seed), "init", network)


class Engine:
    """The networks, their learners and the steps of Algorithm 1 for one method.

    Args:
        config: the resolved config.
        method: a method name or :class:`fuse4seg.train.methods.MethodSpec`.
        device: the torch device.
        steps_per_epoch: outer steps per epoch (sets the lengths of the cosine schedules).
        where: builds the location of a failure for error messages (epoch, step, stage).
        all_ranks: the DDP reducer of :func:`fuse4seg.train.engine.check_finite` (or ``None``).
        ddp: wrap both networks in ``DistributedDataParallel``.
        plan: the stage plan (default: the method's, from E_warm and E_roll).
        leader_lr: the leader's base learning rate (default ``train.lr_leader``).
        ema_warmup: ramp the EMA decay up (:class:`~fuse4seg.train.engine.ModelEMA`); also
            on with ``train.ema_warmup``.
        seed: the seed of the initial weights (default ``train.seed``).
        frozen_slices: how many distinct slices (training and validation) the run fuses
            with a frozen leader; :meth:`frozen_prior` keeps their x_f when all of them fit
            (``None``: it keeps nothing).

    Explained in chapter 4.
    """

    def __init__(
        self,
        config: Config,
        method: str | MethodSpec,
        device: torch.device,
        steps_per_epoch: int,
        where: Callable[[], str] = lambda: "a step",
        all_ranks: Callable[[bool], bool] | None = None,
        ddp: bool = False,
        plan: list[tuple[str, int]] | None = None,
        leader_lr: float | None = None,
        ema_warmup: bool = False,
        seed: int | None = None,
        frozen_slices: int | None = None,
    ):
        from fuse4seg.utils import check_env_switches, set_seed

        check_env_switches()  # a misspelt FUSE4SEG_* fails here, not once half a run is built
        self.spec = method if isinstance(method, MethodSpec) else get_method(method)
        self.config, self.device = config, device
        self.where, self.all_ranks = where, all_ranks
        t = config.train
        self.amp_dtype = amp_dtype(device, t.amp)
        fp16 = self.amp_dtype == torch.float16

        # one seed: the same initial weights on every rank and every run. CPU runs are
        # bit-for-bit repeatable; on CUDA cuDNN autotunes (fixed shapes): seeded, not identical.
        self.seed = t.seed if seed is None else seed
        set_seed(self.seed, deterministic=device.type != "cuda")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        else:  # freed activations stay in the heap for the next step (glibc)
            tune_malloc()
        # each network draws its initial weights from its own seed (init_seed), so whether a
        # method has a leader does not change its follower's start: fuse4seg and average
        # (disjoint_ae, max) start from the same follower, fuse4seg and disjoint_ae from the
        # same leader, and with the seeded batches fuse4seg's warm-up equals average's
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed(self.seed, "leader"))
            leader = place_leader(build_leader(config), device) if self.spec.leader else None
            torch.manual_seed(init_seed(self.seed, "follower"))
            follower = (build_follower(config, self.spec).to(device)
                        if self.spec.follower else None)
        for name, net in (("leader", leader), ("follower", follower)):
            stride = getattr(net, "stride", 1) if net is not None else 1
            if self.spec.follower and config.data.crop_size % stride:
                raise ValueError(
                    f"data.crop_size {config.data.crop_size} is not divisible by the {name}'s "
                    f"stride {stride}"
                )
        # the leader's EMA (Eq. 4), ramped with ema_warmup (fusion-only) or train.ema_warmup
        ema_warmup = ema_warmup or t.ema_warmup
        self.ema = ModelEMA(leader, t.ema_decay, ema_warmup) if leader is not None else None
        # train.follower_ema: what is validated and saved; it starts from random weights, so
        # its decay ramps up (ModelEMA's warm-up)
        self.follower_ema = (
            ModelEMA(follower, t.follower_ema, warmup=True)
            if follower is not None and t.follower_ema is not None
            else None
        )
        if ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            follower = DDP(follower, device_ids=ids) if follower is not None else None
            leader = DDP(leader, device_ids=ids) if leader is not None else None
        self.ddp = ddp
        self.compiled = compile_wanted(t.compile)
        if self.compiled:  # train.compile (TrainConfig); FUSE4SEG_EAGER=1 forces eager
            follower = compile_net(follower) if follower is not None else None
            leader = compile_net(leader) if leader is not None else None

        self.plan = plan or self.spec.plan(t.warmup_epochs, t.rollout_epochs)
        self.stage_of_epoch = [s for s, n in self.plan for _ in range(n)]
        epochs = {stage: n for stage, n in self.plan}
        S, K = steps_per_epoch, t.inner_steps
        self.steps_per_epoch = S
        # schedule lengths: every update each learner takes over the plan
        follower_updates = S * (epochs.get("warmup", 0) + K * epochs.get("rollout", 0))
        self.warmup_updates = S * epochs.get("warmup", 0)  # train.warmup_anneal's span
        leader_updates = S * epochs.get("fusion", 0)
        if self.spec.learns_leader_from_follower:
            leader_updates += S * epochs.get("rollout", 0)
        common = {"weight_decay": t.weight_decay, "grad_clip": t.grad_clip, "fp16_scaler": fp16}
        self.follower = (
            Learner(follower, t.lr_follower, follower_updates, name="follower", **common)
            if follower is not None
            else None
        )
        self.leader = (
            Learner(leader, leader_lr or t.lr_leader, leader_updates, name="leader", **common)
            if leader is not None
            else None
        )
        # x_f of a frozen leader per (split, slice) (see frozen_prior); emptied on load
        self._frozen_xf: dict[tuple[str, int], torch.Tensor] = {}
        self.frozen_slices = frozen_slices

    # ----------------------------------------------------------------------------- helpers
    @property
    def leader_module(self) -> nn.Module | None:
        return unwrap(self.leader.net) if self.leader is not None else None

    @property
    def follower_module(self) -> nn.Module:
        return unwrap(self.follower.net)

    @property
    def eval_follower(self) -> nn.Module:
        """The follower that validation scores and the saved bundles hold: the average of its
        weights with ``train.follower_ema``, else the follower itself."""
        if self.follower_ema is not None:
            return self.follower_ema.module
        return self.follower_module

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def guard(self, terms: dict[str, Any], also: dict[str, Any] | None = None) -> dict[str, float]:
        """Stop on a non-finite term (:func:`~fuse4seg.train.engine.check_finite`); return all
        values as floats."""
        return check_finite(terms, self.where, self.all_ranks, also)

    def lower_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """L_lower (§3.5.1) with this run's class weights and smoothing, in float32: what the
        follower minimises (also scored by ``benchmarks/probe_loss_ratio.py``)."""
        from fuse4seg.losses import lower_loss

        cfg = self.config.loss
        return lower_loss(
            logits.float(), target, class_weights=cfg.dice_class_weights, smooth=cfg.dice_smooth
        )

    def _enabled_terms(self, terms: dict[str, Any]) -> dict[str, Any]:
        """The physical terms that enter the total (switched-off ones are only logged)."""
        cfg = self.config.loss
        used = {"decomp": cfg.use_decomp, "grad": cfg.use_grad, "recon": cfg.use_recon}
        return {f"L_{k}": v for k, v in terms.items() if used.get(k, False)}

    def prior(self, x1: torch.Tensor, x2: torch.Tensor, stage: str, ema: bool) -> torch.Tensor:
        """The follower's input in ``stage``: a fixed rule (x_avg, max, [x1, x2]) or x_f of the
        leader (its EMA weights with ``ema``, or when the method trains on them).

        Runs under ``no_grad``; ``(B, 1, H, W)`` pairs in, ``(B, C, H, W)`` out (C = 1 or 2).
        """
        rule = self.spec.input_rule(stage)
        if rule is not None:
            x_in = RULES[rule](x1, x2)  # x_avg: Algorithm 1, line 2
            if self.spec.leader and self.config.train.warmup_minmax:
                x_in = minmax_normalize(x_in)  # in x_f's domain: TrainConfig.warmup_minmax
            return x_in
        net = self.ema.module if ema or self.spec.trains_on_ema else self.leader_module
        was_training = net.training
        net.eval()
        with torch.no_grad(), self.autocast():
            x_fused, _ = net(x1, x2)  # (B, 1, H, W) x2 -> (B, 1, H, W)
        net.train(was_training)
        return x_fused.float()

    FROZEN_CACHE_BYTES = 1 << 30
    """Most bytes of x_f :meth:`frozen_prior` keeps (1 GiB: the default profile's slices need
    ~20 MB; the paper's BraTS 2021 ones would not fit, and are fused every step)."""

    @classmethod
    def frozen_cache_holds(cls, slices: int, slice_bytes: int) -> bool:
        """Whether :meth:`frozen_prior` keeps x_f of ``slices`` slices of ``slice_bytes``
        each (also :func:`fuse4seg.book.run_hours`' rule)."""
        return cls.FROZEN_CACHE_BYTES // slice_bytes >= slices

    def frozen_prior(self, batch: dict[str, Any], stage: str, split: str = "train",
                     ema: bool = False) -> torch.Tensor:
        """:meth:`prior` of a batch, remembered per slice when the leader is frozen.

        ``disjoint_ae`` trains its follower on the EMA leader, which no longer changes once its
        fusion stage is over (:meth:`MethodSpec.reads_frozen_leader
        <fuse4seg.train.methods.MethodSpec.reads_frozen_leader>`): x_f of a slice is then the
        same at every step and at every validation, so it is computed once and kept (keyed by
        ``split`` and the batch's ``index``, the dataset indices). All or nothing: the slices
        are kept when all ``frozen_slices`` the run meets (training and validation) fit in
        :data:`FROZEN_CACHE_BYTES` as float32, else every batch is fused at every step, as a
        whole. A slice is fused alone when it is first kept, so its x_f does not depend on the
        slices it happened to be drawn with: a resumed run, whose cache starts empty, refills
        it bit for bit (the leader's output changes in the last float bits with the batch's
        size and makeup). Without ``index`` or ``frozen_slices`` (an engine used on its own),
        and in every other case, it calls :meth:`prior` (with ``ema``).
        """
        indices = batch.get("index")
        if (not self.spec.reads_frozen_leader(stage) or indices is None
                or self.frozen_slices is None
                or not self.frozen_cache_holds(self.frozen_slices,
                                               batch["x1"][0].numel() * 4)):  # one channel
            return self.prior(batch["x1"], batch["x2"], stage, ema=ema)
        keys = [(split, int(i)) for i in indices]
        for j, key in enumerate(keys):
            if key not in self._frozen_xf:
                one = slice(j, j + 1)
                self._frozen_xf[key] = self.prior(batch["x1"][one], batch["x2"][one], stage,
                                                  ema=ema)[0]
        return torch.stack([self._frozen_xf[k] for k in keys])

    def prior_label(self, stage: str, ema: bool = True) -> str:
        """What :meth:`prior` feeds the follower in ``stage`` (recorded with validations)."""
        rule = self.spec.input_rule(stage)
        if rule is None:
            return "ema_leader" if ema or self.spec.trains_on_ema else "leader"
        label = RULE_LABELS[rule]
        warm = self.spec.leader and self.config.train.warmup_minmax
        return f"minmax({label})" if warm else label

    # ----------------------------------------------------------------------------- steps
    def follower_step(
        self, x_in: torch.Tensor, target: torch.Tensor, draw: tuple[int, ...] | None = None
    ) -> float:
        """One follower update on ``x_in (B, C, H, W)``, ``target (B, H, W)`` (Eq. 2).

        With ``train.augment`` and ``draw`` (the update's ``(epoch, step, k)``), the batch is
        augmented first (:func:`fuse4seg.train.augment.augment`, seeded by ``train.seed`` and
        ``draw``).
        """
        x_in, target = self._augmented(x_in, target, draw)
        f = self.follower
        f.zero_grad()
        f.net.train()
        with self.autocast():
            logits = f.net(x_in)  # (B, C, H, W) -> (B, 4, H, W)
        loss = self.lower_loss(logits, target)
        values = f.step(loss, "L_lower", self.guard, {"L_lower": loss})
        if self.follower_ema is not None:
            self.follower_ema.update(self.follower_module)
        return values["L_lower"]

    def _augmented(self, x_in, target, draw):
        """``(x_in, target)`` augmented for update ``draw`` when ``train.augment`` is on."""
        if draw is None or not self.config.train.augment:
            return x_in, target
        from fuse4seg.train.augment import augment
        from fuse4seg.train.sampling import step_generator

        return augment(x_in, target, step_generator(self.seed, 0xA06, *draw))

    def follower_loss(
        self, x_in: torch.Tensor, target: torch.Tensor, draw: tuple[int, ...] | None = None
    ) -> float:
        """L_lower of the follower on a batch **without updating it**: the value
        :meth:`follower_step` would log for the same ``x_in``, ``target`` and ``draw`` (same
        augmentation, same train mode; the follower has no dropout, so nothing random is drawn).
        """
        x_in, target = self._augmented(x_in, target, draw)
        net = self.follower.net
        was_training = net.training
        net.train()
        with torch.no_grad(), self.autocast():
            logits = net(x_in)
        net.train(was_training)
        return to_float(self.lower_loss(logits, target))

    def stage_change_reference(self, batches: Batches, epoch: int) -> float:
        """The follower's L_lower, with no update, on the D_tr halves the rollout epoch
        ``epoch`` will draw, fed the **warm-up's** prior (x_avg), with the augmentation of each
        step's first inner update. The rollout logs ``L_lower_first``, the loss of that same
        first inner update (before the K updates on its D_tr), so

            mean L_lower_first of the first rollout epoch / this reference

        compares the follower before and after the stage change on the same slices: a change of
        prior, learning rate or leader that undid the warm-up raises it. The logged ``L_lower``
        of the two stages is not comparable: warm-up batches are B random slices, D_tr is B/2
        slices from half the patients, and the batch soft Dice of Eq. 2 is higher on the latter
        for the same follower (``benchmarks/probe_loss_ratio.py``: 1.21× on average, phantom).
        """
        losses = []
        for step in range(self.steps_per_epoch):
            tr, _ = batches.split(epoch, step, False)
            x_in = self.prior(tr["x1"], tr["x2"], "warmup", ema=False)
            losses.append(self.follower_loss(x_in, tr["seg"], (epoch, step, 0)))
        return float(np.mean(losses))

    def leader_step(self, x1, x2, target) -> dict[str, float]:
        """One leader update on D_val with L_upper (Eq. 3), then the EMA update (Eq. 4).

        The follower's parameters get ``requires_grad=False`` for the step, so no gradient
        accumulates in them, yet ∂L_lower/∂x_f flows through the follower into the leader.
        """
        from fuse4seg.losses import upper_loss

        # unwrapped under DDP: no all-reduce for frozen weights; else the (compiled) network
        follower = self.follower_module if self.ddp else self.follower.net
        frozen = [p for p in follower.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        follower.eval()
        lead = self.leader
        try:
            lead.zero_grad()
            lead.net.train()
            with self.autocast():
                x_fused, feats = lead.net(x1, x2)  # (B, 1, H, W) x2 -> (B, 1, H, W), feats
                logits = follower(x_fused)  # (B, 1, H, W) -> (B, 4, H, W)
            seg = self.lower_loss(logits, target)
            total, terms = upper_loss(seg, x_fused.float(), x1, x2,
                                      tuple(f.float() for f in feats), self.config.loss,
                                      as_tensors=True)  # read back in lead.step's one sync
            checked = {"L_lower|D_val": seg, **self._enabled_terms(terms), "L_upper": total}
            logged = {f"upper/{k}": v for k, v in terms.items()}
            values = lead.step(total, "L_upper", self.guard, checked, logged)
        finally:
            for p in frozen:
                p.requires_grad_(True)
            follower.train()
        self.ema.update(self.leader_module)  # Eq. 4
        out = {"L_upper": values["L_upper"], "L_lower_val": values["L_lower|D_val"]}
        out.update({k: values[k] for k in logged})
        return out

    def fusion_step(self, x1, x2) -> dict[str, float]:
        """One leader update with the physical losses alone (``disjoint_ae``, fusion-only)."""
        from fuse4seg.losses import physical_loss

        lead = self.leader
        lead.zero_grad()
        lead.net.train()
        with self.autocast():
            x_fused, feats = lead.net(x1, x2)
        total, terms = physical_loss(
            x_fused.float(), x1, x2, tuple(f.float() for f in feats), self.config.loss,
            as_tensors=True,
        )
        logged = {f"physical/{k}": v for k, v in terms.items()}
        checked = {**self._enabled_terms(terms), "L_physical": total}
        values = lead.step(total, "L_physical", self.guard, checked, logged)
        self.ema.update(self.leader_module)
        out = {"L_physical": values["L_physical"]}
        out.update({k: values[k] for k in logged})
        return out

    def _set_follower_rate(self, stage: str) -> None:
        """The follower's rate for ``stage``: ``train.lr_follower`` in the warm-up and
        ``train.lr_follower_rollout`` (if set) in the rollout, on one cosine over all its
        updates that keeps its position across the change. With ``train.warmup_anneal`` the
        warm-up instead runs on the rollout's base plus the difference of the two bases on a
        cosine of its own that reaches 0 at the warm-up's last update: it starts at
        ``lr_follower`` and arrives, without a jump, at the rate the rollout starts with."""
        t, follower = self.config.train, self.follower
        rollout = t.lr_follower_rollout or t.lr_follower
        anneal = stage == "warmup" and t.warmup_anneal and rollout != t.lr_follower
        follower.base_lr = rollout if stage == "rollout" or anneal else t.lr_follower
        follower.excess = (t.lr_follower - rollout, self.warmup_updates) if anneal else None

    def outer_step(self, stage: str, epoch: int, step: int, batches: Batches) -> dict[str, float]:
        """One step of a stage (Algorithm 1 lines 3 and 6-17); returns the values to log."""
        if stage == "fusion":
            batch = batches.single(stage, epoch, step)
            return self.fusion_step(batch["x1"], batch["x2"])
        t = self.config.train
        self._set_follower_rate(stage)
        if stage == "warmup":
            batch = batches.single(stage, epoch, step)
            x_in = self.frozen_prior(batch, stage)
            return {"L_lower": self.follower_step(x_in, batch["seg"], (epoch, step, 0))}
        bilevel = self.spec.learns_leader_from_follower
        tr, val = batches.split(epoch, step, bilevel)  # D_tr, D_val: no patient in both
        x_tr = self.frozen_prior(tr, stage)  # x_f^(tr), computed once
        K = t.inner_steps
        inner = [self.follower_step(x_tr, tr["seg"], (epoch, step, k)) for k in range(K)]
        # L_lower_first: the loss on a fresh D_tr before the K updates on it (see
        # stage_change_reference); L_lower: the mean over the K updates
        out = {"L_lower": float(np.mean(inner)), "L_lower_first": inner[0]}
        if bilevel:
            out.update(self.leader_step(val["x1"], val["x2"], val["seg"]))
        return out

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Networks, EMA and learners (optimiser, scaler, update count)."""
        state: dict[str, Any] = {}
        for name, learner in (("follower", self.follower), ("leader", self.leader)):
            state[name] = unwrap(learner.net).state_dict() if learner is not None else None
            state[f"{name}_learner"] = learner.state_dict() if learner is not None else None
        for name, avg in (("ema", self.ema), ("follower_ema", self.follower_ema)):
            state[name] = avg.state_dict() if avg is not None else None
            state[f"{name}_updates"] = avg.updates if avg is not None else 0
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._frozen_xf = {}
        for name, learner in (("follower", self.follower), ("leader", self.leader)):
            if learner is not None:
                unwrap(learner.net).load_state_dict(state[name])
                learner.load_state_dict(state[f"{name}_learner"])
        for name, avg in (("ema", self.ema), ("follower_ema", self.follower_ema)):
            if avg is not None:
                if state.get(name) is None:
                    raise ValueError(f"the training state has no {name} to resume")
                avg.load_state_dict(state[name], state.get(f"{name}_updates"))


def steps_per_epoch(config: Config, train_slices: int, world_size: int = 1) -> int:
    """Outer steps per epoch: ``train.steps_per_epoch``, else one pass over the slices."""
    t = config.train
    return t.steps_per_epoch or max(1, math.ceil(train_slices / (t.batch_size * world_size)))
