"""Fusion-only training of the leader on image pairs, and the fusion benchmarks (chapter 5).

The Harvard and GFP-PC pairs have no segmentation labels, so the leader Φ (§3.3) is trained
with the physical losses alone: ``α L_decomp + β L_grad + γ L_recon`` (Eq. 3 without L_seg,
``fuse4seg.losses.physical_loss``) — the same objective as the ``disjoint_ae`` baseline on BraTS.
Colour sources are fused on their Y channel (``fuse4seg.data.pairs``); the colour result puts
B's chroma back.

Choices where the paper is silent (also stated in chapter 5):

- **Schedule.** The paper gives no fusion-only schedule. We train for a fixed number of steps
  on random square crops with random flips and 90° rotations, AdamW + cosine decay, gradient
  clipping where the profile sets ``train.grad_clip`` (``smoke`` and ``default``; none under
  ``paper``, as §4.1 names none), and evaluate the EMA weights. The ``fusion`` section of the config
  (:class:`fuse4seg.config.FusionConfig`) holds the values per profile (``paper``: 120 epochs
  over the training pairs at the §4.1 batch size and leader learning rate, on 128×128 crops as
  CDDFuse trains its fusion model; ``smoke`` and ``default``: a few dozen steps of a small
  leader so the chapter runs on a CPU in minutes). Training is a one-stage plan (``fusion``)
  of the same engine as Algorithm 1 (:class:`fuse4seg.train.bilevel.Engine`): the same
  optimiser step, schedule, EMA and non-finite guard.
- **Output polarity.** L_decomp acts on features and L_grad compares Sobel *magnitudes*, which
  are the same for x_f and 1 − x_f (both in [0, 1] after the min-max output), so only the light
  γ L_recon (γ = 0.05) says which way up the output is. Without the decoder's source skip
  the sign is left to the initial weights: ``benchmarks/probe_polarity.py`` trained the
  ``default`` leader on the physical losses alone on the phantom, and 4 of 5 seeds ended
  contrast-inverted (correlation −0.92 to −0.96 with x_avg; ``benchmarks/RESULTS.md``, "The
  polarity of x_f"). Inverted leaders were first seen on Harvard MRI-PET pairs, in runs that
  were never recorded, so nothing here measures how often. After training we therefore evaluate
  the paper's objective for x_f and for 1 − x_f on a fixed set of training crops; the two
  differ in L_recon only, and the leader keeps the orientation with the lower loss
  (``polarity`` −1 = output inverted; stored in the checkpoint and applied by
  :class:`OrientedLeader`). This can only lower the training objective, and no test pair is
  used. With the source skip (``model.source_skip``, on in every profile) x_f stayed upright
  in 5 of 5 seeds of the same probe, and the default book's three Harvard leaders keep
  polarity 1 (chapter 5 prints it). The check stays as a guard.
- **EMA warm-up.** Eq. 4's EMA with m = 0.99 from the first step would keep 80 % of the random
  initialisation after 20 steps, so the decay ramps up as ``min(m, (1 + t) / (10 + t))``
  (the usual EMA warm-up, :class:`fuse4seg.train.engine.ModelEMA` with ``warmup=True``).
- **GFP-PC has few pairs** (six in the development copy) and no train/test split. Training
  and testing on the same pairs would measure memorisation, so
  :func:`cross_validate` evaluates every pair with a leader that never saw it (leave-one-out
  with ``folds = n``, or k folds to save time), and the strong augmentation (crops, flips,
  rotations) and the short schedule limit over-fitting further.
- **Inference** runs on the whole image (reflect-padded to the leader's stride); the output
  x_f ∈ [0, 1] is scaled to 0..255 and rounded to uint8, i.e. scored exactly as a saved PNG.

Run folders: ``RUNS/fusion-<kind>-<profile>-<hash>/`` with ``config.yaml``, ``run.json``
(kind, training pairs, schedule, commit, code digest), ``metrics.jsonl`` (losses during
training) and ``checkpoints/leader.pt`` (EMA leader + config; the one checkpoint format of
:mod:`fuse4seg.train.checkpoint`). The name comes from :func:`fuse4seg.train.runs.fusion_run_name`
(config, schedule, seed, training pair names), so the same call finds the same folder and
reuses a finished run.

The ``fuse4seg fusion train`` and ``fusion evaluate`` verbs are in :mod:`fuse4seg.cli.fusion`.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fuse4seg.config import Config
from fuse4seg.data.pairs import ImagePair, colorize, find_pairs, load_pair
from fuse4seg.fusion_baselines import BASELINES, fuse_baseline
from fuse4seg.metrics.fusion import FusionMeter, to_uint8
from fuse4seg.models import build_leader, place_leader
from fuse4seg.train import runs
from fuse4seg.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from fuse4seg.train.methods import MethodSpec
from fuse4seg.utils import atomic_write_json

__all__ = [
    "FUSION_ONLY",
    "FusionRun",
    "OrientedLeader",
    "PairSampler",
    "choose_polarity",
    "cross_validate",
    "evaluate_fusion",
    "fuse_pair",
    "fuse_with_leader",
    "fusion_schedule",
    "load_fusion_leader",
    "load_pairs",
    "pairs_trained_on",
    "smallest_side",
    "train_fusion",
]

FUSION_ONLY = MethodSpec("fusion_only", "Fusion-only leader", leader="disjoint", follower=None)
"""The leader alone with the physical losses: a one-stage plan (``fusion``) of the engine."""


def fusion_schedule(config: Config, n_pairs: int, **overrides: Any) -> dict[str, Any]:
    """The resolved fusion-only schedule of ``config.fusion`` for ``n_pairs`` training pairs.

    Args:
        overrides: ``steps``, ``crop``, ``batch_size``, ``lr``, ``log_every`` (``None`` = keep).

    Returns:
        ``{"steps", "crop", "batch_size", "lr", "log_every"}`` with every value set.

    Raises:
        ValueError: an unknown override name or a non-positive value.
    """
    f, t = config.fusion, config.train
    base: dict[str, Any] = {
        "steps": f.steps,
        "crop": f.crop,
        "batch_size": f.batch,
        "lr": f.lr,
        "log_every": f.log_every,
    }
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ValueError(f"unknown schedule setting(s) {unknown}; valid: {sorted(base)}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    if base["batch_size"] is None:
        base["batch_size"] = t.batch_size
    if base["lr"] is None:
        base["lr"] = t.lr_leader
    if base["steps"] is None:
        per_epoch = max(1, math.ceil(n_pairs / base["batch_size"]))
        if t.steps_per_epoch is not None:
            per_epoch = min(per_epoch, t.steps_per_epoch)
        base["steps"] = t.rollout_epochs * per_epoch
    for key in ("steps", "crop", "batch_size", "log_every"):
        least = 2 if key == "crop" else 1  # the leader reflect-pads by one pixel
        if int(base[key]) < least:
            raise ValueError(f"fusion schedule: {key} must be >= {least}, got {base[key]}")
        base[key] = int(base[key])
    if not (math.isfinite(base["lr"]) and base["lr"] > 0):
        raise ValueError(f"fusion schedule: lr must be a finite number > 0, got {base['lr']}")
    base["lr"] = float(base["lr"])
    return base


# --------------------------------------------------------------------------- data


def smallest_side(pairs: list[ImagePair]) -> int:
    """The shortest side, in pixels, of any image of ``pairs``: the largest square crop all of
    them allow."""
    return min(min(x.shape[:2]) for p in pairs for x in (p.a, p.b))


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
        crop = min(int(crop), smallest_side(pairs))
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

    Each step: a batch of random crops (:class:`PairSampler`), then the engine's
    :meth:`~fuse4seg.train.bilevel.Engine.fusion_step`: ``x_f, feats = leader(x1, x2)``,
    ``physical_loss`` (α L_decomp + β L_grad + γ L_recon, Eq. 3 without the segmentation term),
    the shared optimiser step (AdamW, cosine learning rate, gradient clipping by
    ``train.grad_clip`` where it is above 0, non-finite guard), then the EMA update (Eq. 4, with
    the warm-up of the module docstring). Afterwards the output polarity is chosen on training
    crops (:func:`choose_polarity`).

    Args:
        train_pairs: loaded pairs (``load_pair``); never the test pairs.
        config: profile config (model, loss weights, optimiser, ``fusion`` schedule, seed).
        runs_dir: parent folder of the run folder.
        kind: ``"PET-MRI"``, ..., ``"GFP-PC"`` (default: the pairs' own kind); names the run.
        steps, crop, batch_size, lr: override ``config.fusion``.
        seed: default ``config.train.seed``.  device: default ``config.train.device``.
        force: retrain even when a finished run with the same settings exists. A finished run
            written by other package code (``run.json``'s ``code``,
            :func:`fuse4seg.utils.code_digest`) is retrained too, so reused numbers always come
            from the code that reports them, unless ``reuse_other_code`` (then it is reused
            with a warning that names both codes; ``fuse4seg fusion train`` does that unless
            ``--restart-if-code-changed``).

    Returns:
        A :class:`FusionRun` (``reused`` True when a finished run was loaded instead).

    Raises:
        ValueError: no pairs; a bad schedule value; a negative seed.
        NonFiniteLossError: a non-finite loss (the step is named).

    Explained in chapter 5 (``book/05_fusion_benchmarks.md``).
    """
    from fuse4seg.models.registry import check_model_names
    from fuse4seg.train.bilevel import Engine
    from fuse4seg.utils import resolve_device

    if not train_pairs:
        raise ValueError("train_fusion: no training pairs")
    check_model_names(config)
    kind = kind or train_pairs[0].kind
    seed = config.train.seed if seed is None else int(seed)
    if seed < 0:
        raise ValueError(f"train_fusion: seed must be >= 0, got {seed}")
    sched = fusion_schedule(
        config, len(train_pairs), steps=steps, crop=crop, batch_size=batch_size, lr=lr
    )
    side = smallest_side(train_pairs)
    if sched["crop"] > side:  # the largest crop there is; the run records (and hashes) it
        warnings.warn(
            f"fusion training: crop {sched['crop']} is larger than the smallest training "
            f"image side ({side}); training on {side}-pixel crops",
            stacklevel=2,
        )
        sched["crop"] = side
    names = sorted(p.name for p in train_pairs)
    run_dir = Path(runs_dir) / runs.fusion_run_name(config, kind, sched, seed, names)
    ckpt = run_dir / "checkpoints" / "leader.pt"
    dev = resolve_device(device or config.train.device)
    if ckpt.is_file() and not force:
        leader, cfg, info = load_fusion_leader(run_dir, device=str(dev))
        same = runs.check_code(run_dir, restart=False, quiet=True)
        recorded = runs.read_run_json(run_dir)
        if same or reuse_other_code:
            if not same:
                warnings.warn(runs.other_code_message(run_dir, recorded, "reusing it anyway"),
                              stacklevel=2)
            return FusionRun(run_dir, leader, cfg, info, _read_history(run_dir), reused=True)
        if progress:
            print(runs.other_code_message(run_dir, recorded, "training it again"), flush=True)

    total = sched["steps"]
    step_now = [0]
    engine = Engine(
        config,
        FUSION_ONLY,
        dev,
        steps_per_epoch=total,
        where=lambda: f"fusion training ({kind}), step {step_now[0] + 1}",
        plan=[("fusion", 1)],
        leader_lr=sched["lr"],
        ema_warmup=True,
        seed=seed,
    )
    stride = int(getattr(engine.leader_module, "stride", 1))
    sampler = PairSampler(train_pairs, sched["crop"], stride, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.to_yaml(run_dir / "config.yaml")
    info = runs.write_run_json(
        run_dir,
        kind=kind,
        profile=config.profile,
        model=config.model.fusion,
        schedule=sched,
        seed=seed,
        train_pairs=names,
        data=sorted({str(p.paths.a.parent.parent.resolve()) for p in train_pairs}),
        device=str(dev),
        finished=False,
        objective="alpha*L_decomp + beta*L_grad + gamma*L_recon (Eq. 3 without L_seg)",
    )
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    iterator = range(total)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"fusion {kind}", leave=False)
    for step in iterator:
        step_now[0] = step
        lr_now = engine.leader.lr()
        x1, x2 = (x.to(dev) for x in sampler.sample(sched["batch_size"]))
        values = engine.fusion_step(x1, x2)
        if (step + 1) % sched["log_every"] == 0 or step + 1 == total:
            terms = {k.split("/", 1)[1]: v for k, v in values.items() if "/" in k}
            history.append(
                {"step": step + 1, "lr": lr_now, **terms,
                 "seconds": round(time.perf_counter() - t0, 3)}
            )
    runs.write_metrics(run_dir, history)
    ema = engine.ema.module.eval()
    polarity, losses = choose_polarity(ema, train_pairs, sched["crop"], config, seed)
    info.update(polarity=polarity, polarity_losses=losses)
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
    return runs.read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []


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
    from fuse4seg.utils import resolve_device

    path = Path(path)
    dev = resolve_device(device)
    own = path / "checkpoints" / "leader.pt" if path.is_dir() else path
    if own.is_file():
        state = load_checkpoint(own, map_location="cpu")
        if state.get("kind") == "fusion_leader":
            config = config_from_dict(state["config"])
            leader = build_leader(config)
            leader.load_state_dict(state["leader"])
            info = dict(state.get("info", {}), checkpoint=str(own))
            polarity = int(state.get("polarity", 1))
            # channels-last on a CPU, as in training (place_leader)
            return OrientedLeader(place_leader(leader, dev), polarity).eval(), config, info
    if not path.exists():
        raise FileNotFoundError(f"{path}: no fusion run folder or checkpoint here")
    from fuse4seg.inference import load_bundle

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


def pairs_trained_on(info: dict[str, Any], pairs: list[ImagePair]) -> list[str]:
    """The names of ``pairs`` that a fusion-only leader trained on: a pair of one of its
    ``train_pairs`` names in one of its ``data`` folders (the ``info`` of
    :func:`load_fusion_leader`, its ``run.json``). A BraTS run's leader trained on no pair:
    ``[]``.

    GFP-PC comes as one set, so ``fusion evaluate`` scores it whole and a leader trained on
    some of it scores its own training pairs; Harvard's ``--split train`` does the same. The
    command warns, and records the names in its ``--json`` (``trained_on``).
    """
    names = set(info.get("train_pairs") or ())
    folders = [Path(folder) for folder in info.get("data") or ()]

    def trained_in(folder: Path) -> bool:
        if any(f.is_absolute() and f == folder for f in folders):
            return True
        # a run.json of older code, which wrote the folder as given (relative to where it
        # trained): the same last parts (``PET-MRI/train``)
        return any(not f.is_absolute() and folder.parts[-len(f.parts):] == f.parts
                   for f in folders if f.parts)

    return [p.name for p in pairs
            if p.name in names and trained_in(p.paths.a.parent.parent.resolve())]


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
        ``{"method", "pairs": [names], "metrics": {convention: FusionMeter.compute()},``
        ``"fused": {name: uint8 Y}}``.
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
        pairs: all pairs (GFP-PC: the whole set).
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


def load_pairs(
    root: Path,
    kind: str,
    split: str,
    names: list[str] | None = None,
    exclude: list[str] | None = None,
    max_pairs: int | None = None,
) -> list[ImagePair]:
    """Find and load the ``kind`` pairs of ``split`` under ``root``, optionally only ``names``,
    without ``exclude``, and at most ``max_pairs`` (sorted by name).

    Raises:
        ValueError: a named pair that does not exist, or no pair left.
    """
    exclude = exclude or []
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
