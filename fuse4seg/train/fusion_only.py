"""Fusion-only training of the leader on image pairs, and the fusion benchmarks (chapter 5).

The Harvard and GFP-PC pairs have no segmentation labels, so the leader Φ (§3.3) is trained
with the physical losses alone: ``α L_decomp + β L_grad + γ L_recon`` (Eq. 3 without L_seg,
``fuse4seg.losses.physical_loss``) — the same objective as the ``disjoint_ae`` baseline on BraTS.
Colour sources are fused on their Y channel (``fuse4seg.data.pairs``); the colour result puts
B's chroma back.

Choices where the paper is silent (also stated in chapter 5):

- **Schedule.** The paper gives no fusion-only schedule. We train for a fixed number of steps
  on random square crops with random flips and 90° rotations, AdamW + cosine decay, gradient
  clipping, and evaluate the EMA weights. :data:`FUSION_SCHEDULE` lists the values per profile
  (``paper``: 120 epochs over the training pairs at the §4.1 batch size and leader learning
  rate, on 128×128 crops as CDDFuse trains its fusion model; ``smoke`` and ``default``: a few
  dozen steps of a small leader so the chapter runs on a CPU in minutes).
- **Output polarity.** L_decomp acts on features and L_grad compares Sobel *magnitudes*, which
  are the same for x_f and 1 − x_f (both in [0, 1] after the min-max output), so only the light
  γ L_recon (γ = 0.05) says which way up the output is. On Harvard MRI-PET the leader trained
  on the plain objective settled, run after run, on a contrast-inverted image (sharp edges,
  high Q^AB/F, correlation ≈ −0.95 with the MRI, PSNR ≈ 3 dB) — also with γ = 1, with a
  reconstruction-only warm-up and with 128-pixel crops. After training we therefore evaluate
  the paper's objective for x_f and for 1 − x_f on a fixed set of training crops; the two
  differ in L_recon only, and the leader keeps the orientation with the lower loss
  (``polarity`` −1 = output inverted; stored in the checkpoint and applied by
  :class:`OrientedLeader`). This can only lower the training objective, and no test pair is
  used.
- **EMA warm-up.** Eq. 4's EMA with m = 0.99 from the first step would keep 80 % of the random
  initialisation after 20 steps, so the decay ramps up as ``min(m, (1 + t) / (10 + t))``
  (the usual EMA warm-up); after ~1000 steps it equals m.
- **GFP-PC has six pairs.** Training and testing on them would measure memorisation, so
  :func:`cross_validate` evaluates every pair with a leader that never saw it (leave-one-out
  with ``folds = n``, or k folds to save time), and the strong augmentation (crops, flips,
  rotations) and the short schedule limit over-fitting further.
- **Inference** runs on the whole image (reflect-padded to the leader's stride); the output
  x_f ∈ [0, 1] is scaled to 0..255 and rounded to uint8, i.e. scored exactly as a saved PNG.

Run folders: ``RUNS/fusion-<kind>-<profile>-<hash>/`` with ``config.yaml``, ``run.json``
(kind, training pairs, schedule, commit), ``metrics.jsonl`` (losses during training) and
``checkpoints/leader.pt`` (EMA leader + config; ``weights_only``-safe). The hash covers the
config, the schedule, the seed and the training pair names, so the same call finds the same
folder and reuses a finished run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fuse4seg.config import Config, get_config, parse_overrides
from fuse4seg.data.pairs import ImagePair, colorize, find_pairs, load_pair
from fuse4seg.fusion_baselines import BASELINES, fuse_baseline
from fuse4seg.metrics.fusion import CONVENTIONS, FusionMeter, nan_to_none, to_uint8
from fuse4seg.utils import code_digest

__all__ = [
    "FUSION_SCHEDULE",
    "FusionRun",
    "OrientedLeader",
    "choose_polarity",
    "PairSampler",
    "cross_validate",
    "evaluate_fusion",
    "fuse_pair",
    "fuse_with_leader",
    "fusion_evaluate_arguments",
    "fusion_evaluate_main",
    "fusion_schedule",
    "fusion_train_arguments",
    "fusion_train_main",
    "load_fusion_leader",
    "train_fusion",
]

FUSION_SCHEDULE: dict[str, dict[str, Any]] = {
    # steps None = rollout_epochs × ceil(pairs / batch_size) of the profile's config
    "paper": {"steps": None, "crop": 128, "batch_size": None, "lr": None, "log_every": 50},
    "default": {"steps": 40, "crop": 64, "batch_size": 4, "lr": 1e-3, "log_every": 5},
    "smoke": {"steps": 20, "crop": 48, "batch_size": 4, "lr": 1e-3, "log_every": 5},
}
"""Fusion-only schedule per profile (module docstring). ``None`` = take the profile's config:
``train.batch_size``, ``train.lr_leader``, ``train.rollout_epochs``."""

CHECKPOINT_FORMAT = 1


def fusion_schedule(config: Config, n_pairs: int, **overrides: Any) -> dict[str, Any]:
    """The resolved fusion-only schedule for ``config.profile`` and ``n_pairs`` training pairs.

    Args:
        overrides: ``steps``, ``crop``, ``batch_size``, ``lr``, ``log_every`` (``None`` = keep).

    Returns:
        ``{"steps", "crop", "batch_size", "lr", "log_every"}`` with every value set.

    Raises:
        ValueError: an unknown override name or a non-positive value.
    """
    base = dict(FUSION_SCHEDULE.get(config.profile, FUSION_SCHEDULE["paper"]))
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ValueError(f"unknown schedule setting(s) {unknown}; valid: {sorted(base)}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    if base["batch_size"] is None:
        base["batch_size"] = config.train.batch_size
    if base["lr"] is None:
        base["lr"] = config.train.lr_leader
    if base["steps"] is None:
        per_epoch = max(1, math.ceil(n_pairs / base["batch_size"]))
        if config.train.steps_per_epoch is not None:
            per_epoch = min(per_epoch, config.train.steps_per_epoch)
        base["steps"] = config.train.rollout_epochs * per_epoch
    for key in ("steps", "crop", "batch_size", "log_every"):
        if int(base[key]) < 1:
            raise ValueError(f"fusion schedule: {key} must be >= 1, got {base[key]}")
        base[key] = int(base[key])
    if not base["lr"] > 0:
        raise ValueError(f"fusion schedule: lr must be > 0, got {base['lr']}")
    base["lr"] = float(base["lr"])
    return base


# --------------------------------------------------------------------------- data


class PairSampler:
    """Random training crops of the pairs' fusion channels, as tensors in [0, 1].

    Args:
        pairs: loaded pairs (``fuse4seg.data.pairs.load_pair``); sizes may differ between pairs.
        crop: square crop side (reduced to the smallest image side, rounded down to ``stride``).
        stride: crops are a multiple of it (``leader.stride``).
        seed: seed of the sampler's own generator.

    ``sample(batch_size)`` returns ``(x1, x2)``, each ``(B, 1, crop, crop)`` float32: x1 = A
    (MRI / phase contrast), x2 = B's Y. The same crop, flip and rotation are applied to both.
    """

    def __init__(self, pairs: list[ImagePair], crop: int, stride: int = 1, seed: int = 0):
        if not pairs:
            raise ValueError("PairSampler: no training pairs")
        self.images = [
            np.stack([p.a, p.b]).astype(np.float32) / 255.0 for p in pairs
        ]  # each (2, H, W)
        side = min(min(x.shape[1:]) for x in self.images)
        crop = min(int(crop), side)
        self.crop = crop - crop % stride
        if self.crop < 1:
            raise ValueError(f"PairSampler: crop {crop} is smaller than the stride {stride}")
        self.rng = np.random.default_rng(seed)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = np.empty((batch_size, 2, self.crop, self.crop), np.float32)
        for i in range(batch_size):
            img = self.images[self.rng.integers(len(self.images))]
            y = self.rng.integers(img.shape[1] - self.crop + 1)
            x = self.rng.integers(img.shape[2] - self.crop + 1)
            patch = img[:, y : y + self.crop, x : x + self.crop]
            if self.rng.random() < 0.5:
                patch = patch[:, :, ::-1]
            out[i] = np.rot90(patch, int(self.rng.integers(4)), axes=(1, 2))
        t = torch.from_numpy(out)
        return t[:, :1], t[:, 1:]  # (B, 2, S, S) -> 2 × (B, 1, S, S)


# --------------------------------------------------------------------------- training


@dataclass
class FusionRun:
    """A trained (or reused) fusion-only run: the EMA leader in eval mode and its records."""

    run_dir: Path
    leader: nn.Module
    config: Config
    info: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    reused: bool = False


def _run_hash(config: Config, kind: str, schedule: dict, seed: int, names: list[str]) -> str:
    cfg = config.to_dict()
    cfg["train"].pop("device", None)
    cfg["train"].pop("num_workers", None)
    key = {"config": cfg, "kind": kind, "schedule": schedule, "seed": seed, "pairs": names}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def _build_leader(config: Config) -> nn.Module:
    from fuse4seg.models import create_fusion

    return create_fusion(
        config.model.fusion,
        inn_squeeze=config.model.inn_squeeze,
        source_skip=config.model.source_skip,
    )


def train_fusion(
    train_pairs: list[ImagePair],
    config: Config,
    runs_dir: str | Path,
    kind: str | None = None,
    *,
    steps: int | None = None,
    crop: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    device: str | None = None,
    force: bool = False,
    reuse_other_code: bool = False,
    progress: bool = False,
) -> FusionRun:
    """Train the leader ``config.model.fusion`` on ``train_pairs`` with the physical losses.

    Each step: a batch of random crops (:class:`PairSampler`), ``x_f, feats = leader(x1, x2)``,
    ``loss = physical_loss(x_f, x1, x2, feats, config.loss)`` (α L_decomp + β L_grad +
    γ L_recon, Eq. 3 without the segmentation term), AdamW (``train.weight_decay``) with a
    cosine learning rate, gradient clipping (``train.grad_clip``), then the EMA update (Eq. 4,
    with the warm-up of the module docstring). Afterwards the output polarity is chosen on
    training crops (module docstring, :func:`choose_polarity`).

    Args:
        train_pairs: loaded pairs (``load_pair``); never the test pairs.
        config: profile config (model, loss weights, optimiser, seed, device).
        runs_dir: parent folder of the run folder.
        kind: ``"PET-MRI"``, ..., ``"GFP-PC"`` (default: the pairs' own kind); names the run.
        steps, crop, batch_size, lr: override :data:`FUSION_SCHEDULE`.
        seed: default ``config.train.seed``.  device: default ``config.train.device``.
        force: retrain even when a finished run with the same settings exists. A finished run
            written by other package code (``run.json``'s ``code``,
            :func:`fuse4seg.utils.code_digest`) is retrained too, so reused numbers always come
            from the code that reports them, unless ``reuse_other_code``.

    Returns:
        A :class:`FusionRun` (``reused`` True when a finished run was loaded instead).

    Raises:
        ValueError: no pairs; a bad schedule value; a non-finite loss (the step is named).

    Explained in chapter 5 (``book/05_fusion_benchmarks.md``).
    """
    from fuse4seg.losses import physical_loss
    from fuse4seg.utils import (
        atomic_write_json,
        atomic_write_text,
        git_commit,
        resolve_device,
        set_seed,
    )

    if not train_pairs:
        raise ValueError("train_fusion: no training pairs")
    kind = kind or train_pairs[0].kind
    seed = config.train.seed if seed is None else int(seed)
    sched = fusion_schedule(
        config,
        len(train_pairs),
        steps=steps,
        crop=crop,
        batch_size=batch_size,
        lr=lr,
    )
    names = sorted(p.name for p in train_pairs)
    run_dir = Path(runs_dir) / (
        f"fusion-{kind}-{config.profile}-{_run_hash(config, kind, sched, seed, names)}"
    )
    ckpt = run_dir / "checkpoints" / "leader.pt"
    dev = resolve_device(device or config.train.device)
    if ckpt.is_file() and not force:
        leader, cfg, info = load_fusion_leader(run_dir, device=str(dev))
        if reuse_other_code or info.get("code") == code_digest():
            return FusionRun(run_dir, leader, cfg, info, _read_history(run_dir), reused=True)
        if progress:
            print(f"{run_dir}: trained by other fuse4seg code; training again", flush=True)

    set_seed(seed)
    leader = _build_leader(config).to(dev)
    ema = _build_leader(config).to(dev)
    ema.load_state_dict(leader.state_dict())
    ema.eval().requires_grad_(False)
    sampler = PairSampler(train_pairs, sched["crop"], getattr(leader, "stride", 1), seed)
    opt = torch.optim.AdamW(
        leader.parameters(), lr=sched["lr"], weight_decay=config.train.weight_decay
    )
    total = sched["steps"]
    history: list[dict[str, Any]] = []
    run_dir.mkdir(parents=True, exist_ok=True)
    config.to_yaml(run_dir / "config.yaml")
    info = {
        "kind": kind,
        "profile": config.profile,
        "model": config.model.fusion,
        "schedule": sched,
        "seed": seed,
        "train_pairs": names,
        "data": sorted({str(p.paths.a.parent.parent) for p in train_pairs}),
        "commit": git_commit(),
        "code": code_digest(),
        "device": str(dev),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished": False,
        "objective": "alpha*L_decomp + beta*L_grad + gamma*L_recon (Eq. 3 without L_seg)",
    }
    atomic_write_json(run_dir / "run.json", info)
    t0 = time.perf_counter()
    iterator = range(total)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"fusion {kind}", leave=False)
    leader.train()
    for step in iterator:
        lr_now = 0.5 * sched["lr"] * (1 + math.cos(math.pi * step / total))  # cosine to 0
        for group in opt.param_groups:
            group["lr"] = lr_now
        x1, x2 = (x.to(dev) for x in sampler.sample(sched["batch_size"]))
        x_fused, feats = leader(x1, x2)
        loss, terms = physical_loss(x_fused, x1, x2, feats, config.loss)
        if not torch.isfinite(loss):
            raise ValueError(f"fusion training ({kind}): non-finite loss at step {step}: {terms}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.train.grad_clip and config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(leader.parameters(), config.train.grad_clip)
        opt.step()
        decay = min(config.train.ema_decay, (1 + step) / (10 + step))  # Eq. 4 with warm-up
        with torch.no_grad():
            for p_ema, p in zip(
                ema.state_dict().values(), leader.state_dict().values(), strict=True
            ):
                if p_ema.dtype.is_floating_point:
                    p_ema.mul_(decay).add_(p.detach(), alpha=1 - decay)
                else:
                    p_ema.copy_(p)
        if (step + 1) % sched["log_every"] == 0 or step + 1 == total:
            history.append(
                {
                    "step": step + 1,
                    "lr": lr_now,
                    **terms,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    ema.eval()
    polarity, losses = choose_polarity(ema, train_pairs, sched["crop"], config, seed)
    info.update(polarity=polarity, polarity_losses=losses)
    from fuse4seg.train.checkpoint import save_checkpoint

    save_checkpoint(
        ckpt,
        {
            "format": CHECKPOINT_FORMAT,
            "kind": "fusion_leader",
            "config": config.to_dict(),
            "leader": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
            "polarity": polarity,
            "info": json.loads(json.dumps(info)),
        },
    )
    info.update(finished=True, seconds=round(time.perf_counter() - t0, 2))
    atomic_write_json(run_dir / "run.json", info)
    return FusionRun(run_dir, OrientedLeader(ema, polarity).eval(), config, info, history)


class OrientedLeader(nn.Module):
    """A leader whose output is used as is (``polarity`` 1) or inverted, ``1 − x_f`` (−1).

    Forward: as the wrapped leader, ``x_fused, feats = leader(x1, x2)``; ``stride`` is the
    wrapped leader's. See the module docstring for why fusion-only training needs this.
    """

    def __init__(self, leader: nn.Module, polarity: int = 1):
        super().__init__()
        if polarity not in (1, -1):
            raise ValueError(f"polarity must be 1 or -1, got {polarity}")
        self.leader = leader
        self.polarity = int(polarity)
        self.stride = int(getattr(leader, "stride", 1))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        x_fused, feats = self.leader(x1, x2)
        return (x_fused if self.polarity == 1 else 1.0 - x_fused), feats


@torch.no_grad()
def choose_polarity(
    leader: nn.Module,
    pairs: list[ImagePair],
    crop: int,
    config: Config,
    seed: int = 0,
    batches: int = 4,
    batch_size: int = 4,
) -> tuple[int, dict[str, float]]:
    """Pick the orientation of the leader's output with the lower training objective.

    Evaluates ``physical_loss`` for x_f and for 1 − x_f on ``batches`` fixed batches of
    training crops (seeded, independent of training). L_decomp and L_grad are the same for
    both; the choice is decided by L_recon.

    Returns:
        ``(polarity, {"as_is": loss, "inverted": loss})`` with ``polarity`` 1 or −1.
    """
    from fuse4seg.losses import physical_loss

    dev = next(leader.parameters()).device
    sampler = PairSampler(pairs, crop, int(getattr(leader, "stride", 1)), seed + 1)
    totals = {"as_is": 0.0, "inverted": 0.0}
    for _ in range(batches):
        x1, x2 = (x.to(dev) for x in sampler.sample(batch_size))
        x_fused, feats = leader(x1, x2)
        for name, img in (("as_is", x_fused), ("inverted", 1.0 - x_fused)):
            loss, _ = physical_loss(img, x1, x2, feats, config.loss)
            totals[name] += float(loss) / batches
    return (1 if totals["as_is"] <= totals["inverted"] else -1), totals


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_fusion_leader(path: str | Path, device: str = "auto") -> tuple[nn.Module, Config, dict]:
    """Load a leader for fusion: a fusion-only run (folder or ``leader.pt``), or the leader of
    a BraTS training run (``fuse4seg train``: ``fuse4seg``/``disjoint_ae`` run folder or
    bundle), e.g. the ``disjoint_ae`` baseline applied to Harvard pairs.

    Returns:
        ``(leader in eval mode on the device, its config, info dict)``.

    Raises:
        FileNotFoundError: nothing at ``path``. ValueError: not a checkpoint with a leader.
    """
    from fuse4seg.config import config_from_dict
    from fuse4seg.train.checkpoint import load_checkpoint
    from fuse4seg.utils import resolve_device

    path = Path(path)
    dev = resolve_device(device)
    own = path / "checkpoints" / "leader.pt" if path.is_dir() else path
    if own.is_file():
        state = load_checkpoint(own, map_location="cpu")
        if state.get("kind") == "fusion_leader":
            config = config_from_dict(state["config"])
            leader = _build_leader(config)
            leader.load_state_dict(state["leader"])
            info = dict(state.get("info", {}), checkpoint=str(own))
            polarity = int(state.get("polarity", 1))
            return OrientedLeader(leader, polarity).to(dev).eval(), config, info
    if not path.exists():
        raise FileNotFoundError(f"{path}: no fusion run folder or checkpoint here")
    from fuse4seg.train.inference import load_bundle

    bundle = load_bundle(path, device=str(dev))
    if bundle.leader is None:
        raise ValueError(f"{path}: method {bundle.method!r} has no fusion leader")
    info = {
        "kind": "BraTS",
        "method": bundle.method,
        "checkpoint": str(bundle.path),
        "epoch": bundle.epoch,
        "profile": bundle.config.profile,
    }
    return bundle.leader.eval(), bundle.config, info


# --------------------------------------------------------------------------- inference


@torch.no_grad()
def fuse_with_leader(leader: nn.Module, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fuse one pair with a leader on the whole image.

    Args:
        leader: eval-mode leader (its device is used).
        a, b: ``(H, W)`` uint8 (or 0..255) source A and B's Y channel.

    Returns:
        float64 ``(H, W)`` on 0..255 (x_f × 255; round with ``to_uint8`` to score as a PNG).
    """
    a = np.asarray(a, dtype=np.float32) / 255.0
    b = np.asarray(b, dtype=np.float32) / 255.0
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"fuse_with_leader: need two (H, W) images of one shape, got {a.shape}, {b.shape}"
        )
    dev = next(leader.parameters()).device
    stride = int(getattr(leader, "stride", 1))
    h, w = a.shape
    ph, pw = (-h) % stride, (-w) % stride
    x = torch.from_numpy(np.stack([a, b]))[:, None]  # (2, 1, H, W)
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect")
    x = x.to(dev)
    x_fused, _ = leader(x[:1], x[1:])  # (1, 1, H', W') in [0, 1]
    return 255.0 * x_fused[0, 0, :h, :w].double().cpu().numpy()


def fuse_pair(method: str, pair: ImagePair, leader: nn.Module | None = None) -> np.ndarray:
    """Fuse one pair with a classical rule (``average``, ``max``, ``dwt``) or a leader.

    Returns:
        uint8 ``(H, W)``: the fused Y channel as a PNG would hold it.

    Raises:
        ValueError: unknown method, or a leader method without ``leader``.
    """
    if method in BASELINES:
        return to_uint8(fuse_baseline(method, pair.a, pair.b))
    if leader is None:
        raise ValueError(
            f"method {method!r}: not a fusion rule ({sorted(BASELINES)}) and no leader given"
        )
    return to_uint8(fuse_with_leader(leader, pair.a, pair.b))


def evaluate_fusion(
    pairs: list[ImagePair],
    method: str,
    leader: nn.Module | dict[str, nn.Module] | None = None,
    conventions: tuple[str, ...] | list[str] = ("standard",),
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fuse and score every pair with one method.

    Args:
        pairs: loaded test pairs.
        method: a rule of :data:`fuse4seg.fusion_baselines.BASELINES` or a label for the leader.
        leader: the leader, or ``{pair name: leader}`` (cross-validation: each pair fused by a
            leader that never saw it).
        conventions: metric conventions to score with.
        out_dir: when given, write ``<out_dir>/<method>/<name>.png`` (fused Y) and
            ``<out_dir>/<method>/color/<name>.png`` (chroma put back) for every pair.

    Returns:
        ``{"method", "pairs": [names], "metrics": {convention: FusionMeter.compute()},
        "fused": {name: uint8 Y}}``.
    """
    from PIL import Image

    meters = {c: FusionMeter(c) for c in conventions}
    fused_all: dict[str, np.ndarray] = {}
    for pair in pairs:
        lead = leader.get(pair.name) if isinstance(leader, dict) else leader
        if isinstance(leader, dict) and lead is None:
            raise ValueError(f"evaluate_fusion: no leader for pair {pair.name!r}")
        fused = fuse_pair(method, pair, lead)
        fused_all[pair.name] = fused
        for meter in meters.values():
            meter.update(fused, pair.a, pair.b, name=pair.name)
        if out_dir is not None:
            import io

            from fuse4seg.utils import atomic_write_bytes

            for sub, img in (("", fused), ("color", colorize(fused, pair.chroma))):
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                atomic_write_bytes(
                    Path(out_dir) / method / sub / f"{pair.name}.png", buf.getvalue()
                )
    return {
        "method": method,
        "pairs": [p.name for p in pairs],
        "metrics": {c: m.compute() for c, m in meters.items()},
        "fused": fused_all,
    }


def cross_validate(
    pairs: list[ImagePair],
    config: Config,
    runs_dir: str | Path,
    folds: int | None = None,
    **train_kwargs: Any,
) -> dict[str, nn.Module]:
    """Train one leader per fold so that every pair has a leader that never saw it.

    Args:
        pairs: all pairs (GFP-PC: six).
        folds: number of folds (``None`` or ``len(pairs)`` = leave-one-out). Pairs are assigned
            to folds in sorted-name order, round robin.
        train_kwargs: passed to :func:`train_fusion` (``steps``, ``crop``, ``device``, ...).

    Returns:
        ``{pair name: leader trained without that pair}`` for :func:`evaluate_fusion`.

    Raises:
        ValueError: ``folds`` < 2 or > number of pairs.
    """
    n = len(pairs)
    folds = n if folds is None else int(folds)
    if not 2 <= folds <= n:
        raise ValueError(f"cross_validate: folds must be in [2, {n}], got {folds}")
    ordered = sorted(pairs, key=lambda p: p.name)
    leaders: dict[str, nn.Module] = {}
    for k in range(folds):
        held = [p for i, p in enumerate(ordered) if i % folds == k]
        train = [p for i, p in enumerate(ordered) if i % folds != k]
        run = train_fusion(train, config, runs_dir, **train_kwargs)
        for p in held:
            leaders[p.name] = run.leader
    return leaders


# --------------------------------------------------------------------------- CLI


def _load_pairs(
    root: Path,
    kind: str,
    split: str,
    names: list[str] | None,
    exclude: list[str],
    max_pairs: int | None,
) -> list[ImagePair]:
    found = find_pairs(root, kind, split)
    if names:
        known = {p.name for p in found}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"--only: no {kind} {split} pair(s) named {missing} in {root}")
        found = [p for p in found if p.name in names]
    bad = [n for n in exclude if n not in {p.name for p in found}]
    if bad:
        raise ValueError(f"--exclude: no {kind} pair(s) named {bad} in {root}")
    found = [p for p in found if p.name not in exclude]
    if max_pairs is not None:
        found = found[:max_pairs]
    if not found:
        raise ValueError(f"{root}: no {kind} {split} pairs left to use")
    return [load_pair(p) for p in found]


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _common_pair_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pairs",
        type=Path,
        required=True,
        help="Harvard folder (holding PET-MRI/, ...) or the GFP folder (GFP/, PC/)",
    )
    parser.add_argument(
        "--kind", required=True, choices=["CT-MRI", "PET-MRI", "SPECT-MRI", "GFP-PC"]
    )
    parser.add_argument("--only", help="comma-separated pair names to use (default: all)")
    parser.add_argument("--exclude", help="comma-separated pair names to leave out")
    parser.add_argument("--max-pairs", type=int, help="use at most N pairs (sorted by name)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, ... (default: config)")


def fusion_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fuse4seg fusion train``."""
    _common_pair_args(parser)
    parser.add_argument(
        "--split",
        default="train",
        choices=["train", "test"],
        help="Harvard split to train on (GFP-PC has one set; use --exclude)",
    )
    parser.add_argument("--profile", default="default", help="smoke, default or paper")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="runs folder")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--crop", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a config setting, e.g. --set loss.beta_grad=2 (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="retrain even if the run exists")


def fusion_train_main(args: argparse.Namespace) -> int:
    """Train the fusion leader on image pairs with the physical losses only (no labels).

    Writes RUNS/fusion-<kind>-<profile>-<hash>/ (config, run.json, metrics.jsonl,
    checkpoints/leader.pt) and prints its path; a finished run with the same settings is reused.
    """
    if args.kind == "GFP-PC" and args.split != "train":
        raise ValueError("--split: GFP-PC has a single set; choose pairs with --only/--exclude")
    config = get_config(args.profile, parse_overrides(args.set))
    pairs = _load_pairs(
        args.pairs, args.kind, args.split, _names(args.only), _names(args.exclude), args.max_pairs
    )
    run = train_fusion(
        pairs,
        config,
        args.out,
        args.kind,
        steps=args.steps,
        crop=args.crop,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        force=args.force,
        progress=True,
    )
    last = run.history[-1] if run.history else {}
    state = "reused" if run.reused else "trained"
    print(
        f"{state} {run.run_dir} on {len(pairs)} {args.kind} pairs; last logged loss: "
        f"{last.get('total', float('nan')):.4g}"
    )
    return 0


def fusion_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fuse4seg fusion evaluate``."""
    parser.add_argument(
        "method",
        help="a fusion run folder / leader checkpoint (fusion-only or a BraTS "
        f"run), or a rule: {', '.join(BASELINES)}",
    )
    _common_pair_args(parser)
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--convention", default="standard", choices=[*CONVENTIONS, "all"])
    parser.add_argument("--json", type=Path, help="write the metrics (per pair and mean) here")
    parser.add_argument("--images", type=Path, help="write fused grey and colour PNGs here")


def fusion_evaluate_main(args: argparse.Namespace) -> int:
    """Fuse the test pairs with a trained leader or a classical rule and score them.

    Prints the mean of every metric under the chosen convention(s); --json writes per-pair and
    mean values, --images the fused Y and colour PNGs.
    """
    conventions = list(CONVENTIONS) if args.convention == "all" else [args.convention]
    split = "all" if args.kind == "GFP-PC" else args.split
    pairs = _load_pairs(
        args.pairs, args.kind, split, _names(args.only), _names(args.exclude), args.max_pairs
    )
    leader, label, source = None, args.method, None
    if args.method not in BASELINES:
        leader, _, info = load_fusion_leader(args.method, device=args.device or "auto")
        label = f"leader:{Path(args.method).name}"
        source = info
    result = evaluate_fusion(
        pairs, label if leader is None else "leader", leader, conventions, args.images
    )
    out = {
        "method": label,
        "leader": source,
        "kind": args.kind,
        "split": split,
        "data": str(args.pairs),
        "pairs": result["pairs"],
        "metrics": result["metrics"],
    }
    if args.json is not None:
        from fuse4seg.utils import atomic_write_json

        atomic_write_json(args.json, nan_to_none(out))
    for conv, res in result["metrics"].items():
        print(
            f"{label} on {len(pairs)} {args.kind} {split} pairs of {args.pairs}; convention: {conv}"
        )
        for k, v in res["mean"].items():
            print(f"  {k:>20}: {v:.6g}")
    return 0
