"""The parts every training loop shares: one optimiser step, one schedule, one EMA, one guard.

Bi-level training (:mod:`fuse4seg.train.bilevel`), the baselines and fusion-only training
(:mod:`fuse4seg.train.fusion_only`) all update a network through :class:`Learner`, so they share

- the **schedule**: cosine annealing without restarts to 0 (§4.1 names cosine annealing
  without a floor), :func:`cosine_lr`, indexed by the learner's own update counter;
- the **optimiser step**: AdamW (``train.weight_decay``; torch's fused kernel,
  :func:`adamw`), backward through a gradient scaler
  (a no-op unless fp16 AMP), gradient-norm clipping (``train.grad_clip``), one check, in one
  host read, that the loss terms and the gradient norm are finite, the step;
- the **EMA** of Eq. 4, :class:`ModelEMA` (optionally with the usual warm-up of the decay);
- the **non-finite guard**, :func:`check_finite`, which raises :class:`NonFiniteLossError`
  naming the step and the loss term before any parameter or checkpoint is touched;
- **AMP**: :func:`amp_dtype` and :func:`autocast` (bf16 on GPUs that support it, else fp16 with
  a scaler; off on CPU, §4.1);
- **the allocator on a CPU**: :func:`tune_malloc` keeps freed activations in the heap for the
  next step instead of giving them back to the kernel and faulting them in again.

Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

from __future__ import annotations

import copy
import ctypes
import math
import os
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from fuse4seg.utils import env_setting

__all__ = [
    "Learner",
    "ModelEMA",
    "NonFiniteLossError",
    "adamw",
    "amp_dtype",
    "autocast",
    "check_finite",
    "compile_net",
    "cosine_lr",
    "fetch",
    "to_float",
    "tune_malloc",
    "unwrap",
]

# mallopt(3) parameters of glibc (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest mmap threshold on 64-bit
MALLOC_TRIM_THRESHOLD = 2**31 - 1  # an int; in effect: never trim the heap's top
_malloc_state: dict[str, bool] = {}


class NonFiniteLossError(RuntimeError):
    """A loss term or gradient became NaN or inf; the message names the step and the term."""


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine annealing without restarts: ``base · ½(1 + cos(π·step/total))``, step 0-based."""
    if total <= 0:
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def to_float(value: Any) -> float:
    """A Python float from a tensor (one host sync) or a number."""
    return float(value.detach().float().item()) if torch.is_tensor(value) else float(value)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside a ``DistributedDataParallel`` or ``torch.compile`` wrapper."""
    inner = getattr(model, "module", None)  # DDP
    if isinstance(inner, nn.Module):
        return unwrap(inner)
    inner = getattr(model, "_orig_mod", None)  # torch.compile
    return unwrap(inner) if isinstance(inner, nn.Module) else model


def compile_wanted(requested: bool) -> bool:
    """Whether to ``torch.compile``: ``train.compile``, unless ``FUSE4SEG_EAGER=1``, which
    forces eager code for debugging (``0`` or unset: as ``train.compile`` says)."""
    return requested and env_setting("FUSE4SEG_EAGER") != "1"


def compile_net(net: nn.Module, dynamic: bool | None = None) -> nn.Module:
    """``torch.compile(net, dynamic=dynamic)`` with inductor's cache in
    ``~/.cache/fuse4seg/inductor`` unless ``TORCHINDUCTOR_CACHE_DIR`` names another folder (a
    second run loads the compiled kernels and graphs instead of compiling them again).
    :func:`unwrap` returns ``net`` again, and the state dict of ``unwrap(compiled)`` keeps the
    plain keys. ``dynamic=None`` is torch's default (a second, dynamic-shape graph when a
    shape changes, as the batch does from the warm-up's B to the rollout's B/2); ``False``
    compiles one static graph per shape (``bench_train_step.py``'s ``compile_static``)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, "fuse4seg", "inductor")
    return torch.compile(net, dynamic=dynamic)


def tune_malloc() -> bool:
    """Keep the memory of freed tensors up to 32 MB in the heap (Linux with glibc; CPU training).

    glibc gives a freed block above its *mmap threshold* back to the kernel at once, and trims
    the top of the heap when more than its *trim threshold* is free there. Both start small
    (128 KB) and grow only as blocks are freed, so a training step, which frees and allocates
    activations of many sizes, keeps returning memory that the next step faults in again, page
    by page: on the ``default`` profile, 13,000-16,000 minor page faults and 23-36 ms of
    kernel CPU time per warm-up step of 100-145 ms (``benchmarks/RESULTS.md``, "The
    allocator").
    This sets the mmap threshold to 32 MB (glibc's largest) and the trim threshold to 2 GB,
    as ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...``
    would at start-up. The values computed do not change; the heap keeps its peak size until
    the process ends (blocks above 32 MB still go back at once).

    Called by :class:`fuse4seg.train.bilevel.Engine` on a CPU, so it applies to every run on a
    CPU once it is built; it is process-wide and happens once. ``FUSE4SEG_MALLOC=system``
    leaves glibc's defaults. Returns whether the settings are in force (``False`` where the C
    library is not glibc, where ``FUSE4SEG_MALLOC=system``, or where ``mallopt`` refused).
    """
    if "tuned" in _malloc_state:
        return _malloc_state["tuned"]
    tuned = False
    if env_setting("FUSE4SEG_MALLOC") != "system":
        try:
            glibc = bool(os.confstr("CS_GNU_LIBC_VERSION"))
        except (AttributeError, ValueError, OSError):
            glibc = False
        if glibc:
            try:
                mallopt = ctypes.CDLL(None).mallopt
                mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                tuned = bool(
                    mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
                    and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
                )
            except (OSError, AttributeError):
                tuned = False
    _malloc_state["tuned"] = tuned
    return tuned


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype for ``device`` (§4.1 trains with AMP): bf16 where the GPU supports it,
    else fp16; ``None`` (no autocast) on CPU or when ``enabled`` is false."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype``, or a no-op context when ``dtype`` is ``None``."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fetch(values: dict[str, Any]) -> dict[str, float]:
    """``{name: float}`` from tensors and numbers, with at most one host sync for all of them.

    An update reads its checked losses, its gradient norm and its logged values back through
    here in one transfer instead of one ``.item()`` each; the physical losses hand over their
    terms as tensors for it (``as_tensors=True``). The only other read of an update is
    L_lower's check of the labels' range (their minimum and maximum in one transfer; on a CPU,
    not on a GPU, ``F.one_hot`` reads them again). The
    first version of this, which left six reads of the physical terms in a leader update,
    made, together with the EMA's ``foreach`` update, the ``default`` profile's outer step on
    a 2-vCPU AMD EPYC 1.01× and 1.11× faster in two runs of six process pairs (a small gain
    at most), and the paper's outer step on an H200 no faster measurably: its host is busy
    launching kernels rather than waiting (``benchmarks/RESULTS.md``, "Where the GPU outer
    step's time goes"). The later removal of those six reads and of one of the label check's
    two has not been timed on a GPU; on a CPU a read waits for nothing. Training computes the
    same numbers either way.
    """
    names = [k for k, v in values.items() if torch.is_tensor(v)]
    out = {k: float(v) for k, v in values.items() if not torch.is_tensor(v)}
    if names:
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in names])
        out.update(zip(names, stacked.tolist(), strict=True))
    return {k: out[k] for k in values}


def check_finite(
    terms: dict[str, Any],
    where: Callable[[], str],
    all_ranks: Callable[[bool], bool] | None = None,
    also: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Raise :class:`NonFiniteLossError` when any term is NaN/inf; else return the values.

    Args:
        terms: ``{name: tensor or number}``.
        where: builds the location for the message (epoch, step, stage, checkpoint folder);
            called only on failure.
        all_ranks: under DDP, reduces this rank's verdict over every rank (so all ranks stop
            together); ``None`` for a single process.
        also: values to read back in the same sync (for logging) but not to check; no name
            may be in both.

    Returns:
        ``{name: float}`` for ``terms`` and then ``also`` (:func:`fetch`: one host sync).

    Raises:
        ValueError: a name in both ``terms`` and ``also`` (one value would hide the other).
    """
    both = sorted(set(terms) & set(also or {}))
    if both:
        raise ValueError(f"check_finite: {both} are both checked terms and logged values")
    values = fetch({**terms, **(also or {})})
    bad = [k for k in terms if not math.isfinite(values[k])]
    ok = not bad
    if all_ranks is not None:
        ok = all_ranks(ok)
    if not ok:
        bad = bad or ["(on another rank)"]
        raise NonFiniteLossError(
            f"non-finite loss at {where()}: {', '.join(bad)} = "
            f"{[values[k] for k in bad if k in values]}"
        )
    return values


class ModelEMA:
    """Exponential moving average of a network's weights, Eq. 4: θ̂ ← m·θ̂ + (1 − m)·θ.

    Floating-point parameters and buffers are averaged; integer buffers are copied. The average
    is kept in float32 even when the model trains under AMP.

    Args:
        model: the network to track (the leader); an unwrapped copy is made.
        decay: m in Eq. 4 (0.99 in §4.1).
        warmup: ramp the decay as ``min(m, (1 + t) / (10 + t))`` over the update count t (the
            usual EMA warm-up). Bi-level training starts the EMA from the initial leader
            without it, as Eq. 4 is written; fusion-only training, which starts from random
            weights, uses it (with m = 0.99 from the first step the EMA would still hold 80 % of
            the random initialisation after 20 steps).

    Explained in chapter 4.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay m must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The m used by the next :meth:`update`."""
        return self.decay_at(self.updates, self.decay, self.warmup)

    @staticmethod
    def decay_at(t: int, decay: float, warmup: bool) -> float:
        """The m of update ``t`` (0-based) of an EMA with ``decay`` and ``warmup``."""
        return min(decay, (1 + t) / (10 + t)) if warmup else decay

    @staticmethod
    def initial_share(updates: int, decay: float, warmup: bool) -> float:
        """The weight the average still gives the weights it started from after ``updates``
        updates: the product of the decays used (m ** updates without the warm-up)."""
        return math.prod(ModelEMA.decay_at(t, decay, warmup) for t in range(updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One Eq. 4 step towards ``model``'s current weights."""
        decay = self.current_decay()
        current = unwrap(model).state_dict()
        avgs, values = [], []
        for name, avg in self.module.state_dict().items():
            value = current[name].detach()
            if avg.dtype.is_floating_point:
                avgs.append(avg)
                values.append(value.to(avg.dtype))
            else:
                avg.copy_(value)
        # the same two operations as avg.mul_(m).add_(v, alpha=1 - m) per tensor, launched
        # once for all tensors (on a GPU a few kernels instead of two per tensor)
        if avgs:
            torch._foreach_mul_(avgs, decay)
            torch._foreach_add_(avgs, values, alpha=1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int | None = None) -> None:
        self.module.load_state_dict(state)
        if updates is not None:
            self.updates = int(updates)


def adamw(net: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``net``'s parameters, with torch's fused kernel.

    torch's default AdamW on CPU tensors runs a Python loop of about ten operations per
    parameter tensor: on an AMD EPYC with 2 threads, 4.4 ms per step for the ``default``
    follower's 134 tensors and 2.9 ms for the leader's 70, whose 5,492 weights need almost none
    of it. The fused kernel (``fused=True``, one C++ call for all tensors) takes 0.7 and 0.4 ms
    there (``benchmarks/bench_optimizer.py``); the ``default`` profile's warm-up and outer steps
    become 1.05-1.07× faster (``benchmarks/RESULTS.md``, "The fused AdamW"). It computes the
    same update in another order, so its results differ from the loop's in the last bit of
    some weights; whole runs stay within the spread between seeds
    (``benchmarks/equiv_train.py --change adamw``).
    On a CUDA GPU the fused kernel replaces torch's default multi-tensor (``foreach``) path,
    which launches a few kernels for each of the update's operations. On an H200 the paper's
    outer step was no faster or slower for it, within the spread between runs (measured
    together with :meth:`Learner.step`'s single sync and the EMA's ``foreach`` update:
    ``benchmarks/RESULTS.md``, "Where the GPU outer step's time goes"); it is kept because it
    does less work for the same update. ``FUSE4SEG_ADAMW=loop`` keeps torch's default on
    either device.
    """
    params = list(net.parameters())
    loop = env_setting("FUSE4SEG_ADAMW") == "loop"
    fused = not loop and bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    kernel = {"fused": True} if fused else {}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kernel)


class Learner:
    """A network with its AdamW optimiser, cosine schedule, gradient scaler and update count.

    :meth:`step` is the only place in the package where a training loss becomes a parameter
    update.

    Args:
        net: the network (possibly DDP-wrapped).
        lr: the base learning rate.
        total_updates: the length of the cosine schedule.
        weight_decay: AdamW's decoupled weight decay.
        grad_clip: the gradient-norm clip (``<= 0`` = none).
        fp16_scaler: use a gradient scaler (fp16 autocast only).
        name: ``"leader"`` or ``"follower"`` (messages).
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float,
        total_updates: int,
        weight_decay: float,
        grad_clip: float,
        fp16_scaler: bool = False,
        name: str = "network",
    ):
        self.net = net
        self.base_lr = lr
        self.total_updates = total_updates
        self.excess: tuple[float, int] | None = None
        """``(extra, span)``: add ``cosine_lr(extra, u, span)`` to the rate of update ``u <
        span`` (the follower's annealed warm-up, ``train.warmup_anneal``); ``None``: none."""
        self.grad_clip = grad_clip
        self.name = name
        self.opt = adamw(net, lr, weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16_scaler)
        self.updates = 0

    def lr(self, update: int | None = None) -> float:
        """The learning rate of update ``update`` (default: the next one)."""
        u = self.updates if update is None else update
        lr = cosine_lr(self.base_lr, u, self.total_updates)
        if self.excess is not None and u < self.excess[1]:
            lr += cosine_lr(self.excess[0], u, self.excess[1])
        return lr

    def zero_grad(self) -> None:
        """Set the learning rate of the coming update and clear the gradients."""
        lr = self.lr()
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)

    def step(
        self,
        loss: torch.Tensor,
        loss_name: str,
        guard: Callable[..., dict[str, float]],
        terms: dict[str, Any] | None = None,
        also: dict[str, Any] | None = None,
    ) -> dict[str, float]:
        """Backpropagate ``loss`` and take one clipped AdamW step.

        ``guard`` checks ``terms`` (the loss and its parts) and the gradient norm together,
        after the backward and before the step, so a non-finite value stops the run before any
        parameter moves (under fp16 the scaler skips a step with a non-finite gradient
        instead, as AMP intends, and only ``terms`` are checked). The check reads ``terms``,
        the norm and ``also`` back in one host sync (:func:`fetch`).

        Returns:
            ``{name: float}`` for ``terms``, the gradient norm (``"gradient norm of
            <loss_name>"``, unless fp16) and ``also`` (values only logged).
        """
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        params: Iterable[torch.Tensor] = self.net.parameters()
        if self.grad_clip and self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        checked = dict(terms or {})
        if not self.scaler.is_enabled():
            checked[f"gradient norm of {loss_name}"] = norm
        values = guard(checked, also)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.updates += 1
        return values

    def state_dict(self) -> dict[str, Any]:
        return {
            "opt": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the optimiser, scaler and update count. AdamW's moments take the memory
        layout of their parameters: a checkpoint written with the leader in one layout may be
        resumed with it in the other (:func:`fuse4seg.models.registry.place_leader`), and
        torch's fused AdamW reads a moment with other strides than its parameter as if they
        were the same, which corrupts the update silently (tested)."""
        self.opt.load_state_dict(state["opt"])
        for param, moments in self.opt.state.items():
            for key, value in moments.items():
                if (torch.is_tensor(value) and value.shape == param.shape
                        and value.stride() != param.stride()):
                    moments[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.updates = int(state["updates"])
