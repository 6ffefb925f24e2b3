"""Validation during training and the "glass box" snapshots of x_f (§4.3).

Validation scores the follower on the validation patients' slices with 3-D counts per patient
(:class:`fuse4seg.metrics.segmentation.SegmentationMeter`), its input made by the engine's
:meth:`~fuse4seg.train.bilevel.Engine.prior`: during the warm-up the warm-up prior (what the
follower was trained on); from the rollout on the EMA leader (Algorithm 1's output, what
inference uses). The best checkpoint is chosen only among validations whose input is what
inference will use (:meth:`fuse4seg.train.methods.MethodSpec.validates_inference_input`), by
mean Dice over NCR, ED and ET.

The glass box keeps the EMA leader's x_f of the few validation slices with the most tumour at
every validation, so chapter 4 can show how the fused image changes during training.
Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fuse4seg.metrics.segmentation import tumour_mean
from fuse4seg.train.bilevel import Engine
from fuse4seg.utils import atomic_write_bytes

__all__ = ["GLASSBOX_SLICES", "collate", "glassbox", "leader_drift", "validate"]

GLASSBOX_SLICES = 4
"""How many fixed validation slices the glass box saves x_f of (:func:`glassbox`)."""


def collate(dataset, indices: np.ndarray, device: torch.device) -> dict[str, Any]:
    """Stack slices ``indices`` of a :class:`fuse4seg.data.slices.SliceDataset` on ``device``."""
    items = [dataset[int(i)] for i in indices]
    return {
        "x1": torch.stack([it["x1"] for it in items]).to(device),  # (B, 1, S, S)
        "x2": torch.stack([it["x2"] for it in items]).to(device),  # (B, 1, S, S)
        "seg": torch.stack([it["seg"] for it in items]).to(device),  # (B, S, S)
        "case_id": [it["case_id"] for it in items],
        "case_index": [it["case_index"] for it in items],
        "index": [int(i) for i in indices],  # dataset indices (Engine.frozen_prior's keys)
    }


@torch.no_grad()
def validate(
    engine: Engine,
    dataset,
    items: np.ndarray,
    stage: str,
    batch_size: int,
    ema: bool = True,
) -> dict[str, Any]:
    """Dice/IoU per class and region over ``items`` of ``dataset`` (3-D counts per patient).

    Args:
        engine: the networks.
        dataset: the validation :class:`~fuse4seg.data.slices.SliceDataset`.
        items: slice indices to score.
        stage: the stage (decides the follower's input).
        ema: use the EMA leader (what inference uses); ``False`` uses the live leader, the one
            the follower has been trained on (``benchmarks/probe_rollout.py`` compares them).

    Returns:
        ``{"prior", "slices", "mean_dice", "mean_iou", "per_class"}``.
    """
    from fuse4seg.metrics.segmentation import SegmentationMeter

    follower = engine.eval_follower  # the follower, or its weight average (train.follower_ema)
    was_training = follower.training
    follower.eval()
    meter = SegmentationMeter()
    space = "val:" + ",".join(dataset.case_ids)  # the cache key of these slices
    for start in range(0, len(items), batch_size):
        batch = collate(dataset, items[start : start + batch_size], engine.device)
        # a frozen leader's x_f is fused once per slice (Engine.frozen_prior)
        x_in = engine.frozen_prior(batch, stage, split=space, ema=ema)
        with engine.autocast():
            logits = follower(x_in)  # (B, C, S, S) -> (B, 4, S, S)
        meter.update(logits.argmax(dim=1).cpu(), batch["seg"].cpu(), batch["case_id"])
    follower.train(was_training)
    mean = meter.compute()["mean"]
    return {
        "prior": engine.prior_label(stage, ema),
        "slices": int(len(items)),
        "mean_dice": tumour_mean(mean, "dice"),
        "mean_iou": tumour_mean(mean, "iou"),
        "per_class": {c: {k: float(v) for k, v in mean[c].items()} for c in mean},
    }


def _save_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


@torch.no_grad()
def glassbox(engine: Engine, dataset, items: np.ndarray, folder: Path, epoch: int, stage: str):
    """Save the EMA leader's x_f of a few fixed validation slices (the "glass box", §4.3).

    The slices (the :data:`GLASSBOX_SLICES` of ``items`` with the most tumour) are chosen once
    and written with their inputs to ``folder/inputs.npz``; each call adds
    ``folder/epoch_NNN.npz``. A method without a leader writes nothing.
    """
    if engine.ema is None:
        return
    inputs = folder / "inputs.npz"
    if not inputs.exists():
        sizes = [int((dataset[int(i)]["seg"] > 0).sum()) for i in items]
        order = np.argsort(-np.asarray(sizes), kind="stable")[:GLASSBOX_SLICES]
        chosen = np.sort(items[order])
        batch = collate(dataset, chosen, torch.device("cpu"))
        _save_npz(
            inputs,
            items=chosen,
            x1=batch["x1"][:, 0].numpy(),
            x2=batch["x2"][:, 0].numpy(),
            seg=batch["seg"].numpy().astype(np.uint8),
            case_id=np.array(batch["case_id"]),
        )
    else:
        with np.load(inputs) as z:
            chosen = z["items"]
    batch = collate(dataset, chosen, engine.device)
    net = engine.ema.module
    net.eval()
    x_fused, _ = net(batch["x1"], batch["x2"])
    _save_npz(
        folder / f"epoch_{epoch:03d}.npz",
        x_fused=x_fused[:, 0].float().cpu().numpy(),
        stage=np.array(stage),
    )


@torch.no_grad()
def leader_drift(run_dir: str | Path) -> dict[str, Any] | None:
    """How far a run's leaders move x_f away from x_avg, on its glass-box slices.

    From the run's ``checkpoints/last.pt`` this rebuilds three leaders: the initial one (drawn
    from the run's seed as training drew it, :func:`fuse4seg.train.bilevel.init_seed`), the
    live leader θ_f (whose x_f the follower trains on) and its EMA θ̂ (Eq. 4: what validation,
    the glass box, the test scores and the saved bundles use). Each fuses the slices of
    ``glassbox/inputs.npz`` on the CPU in float32.

    Returns ``None`` for a run without a leader, a glass box or ``checkpoints/last.pt``, else a
    dict:
    ``updates`` (the EMA's updates), ``initial_share`` (the weight θ̂ still gives the initial
    leader, :meth:`~fuse4seg.train.engine.ModelEMA.initial_share` with the run's
    ``train.ema_decay`` and ``train.ema_warmup``) and ``rows``: per leader (``"initial"``,
    ``"live"``, ``"EMA"``) the mean absolute difference of its x_f from x_avg = ½(x1 + x2)
    (``from_x_avg``) and from the live leader's x_f (``from_live``); and, for scale,
    ``max_from_x_avg``: the same difference for the ``max`` rule's image max(x1, x2), another
    fixed fusion (it is half the mean of ``|x1 − x2|``).
    """
    from fuse4seg.config import config_from_dict
    from fuse4seg.models import build_leader
    from fuse4seg.train.bilevel import init_seed
    from fuse4seg.train.checkpoint import load_checkpoint
    from fuse4seg.train.engine import ModelEMA

    run_dir = Path(run_dir)
    inputs = run_dir / "glassbox" / "inputs.npz"
    last = run_dir / "checkpoints" / "last.pt"
    if not inputs.is_file() or not last.is_file():
        return None
    state = load_checkpoint(last)
    weights = state["engine"]
    if weights.get("leader") is None or weights.get("ema") is None:
        return None
    config = config_from_dict(state["config"])
    with np.load(inputs) as z:  # (N, S, S) each
        x1, x2 = (torch.from_numpy(z[k]).float()[:, None] for k in ("x1", "x2"))
    x_avg = 0.5 * (x1 + x2)
    fused = {}
    for name, trained in (("initial", None), ("live", weights["leader"]), ("EMA", weights["ema"])):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed(config.train.seed, "leader"))
            net = build_leader(config)
        if trained is not None:
            net.load_state_dict(trained)
        fused[name] = net.eval()(x1, x2)[0].float()
    updates = int(weights.get("ema_updates") or 0)
    t = config.train
    return {
        "updates": updates,
        "initial_share": ModelEMA.initial_share(updates, t.ema_decay, t.ema_warmup),
        "max_from_x_avg": float((torch.maximum(x1, x2) - x_avg).abs().mean()),
        "rows": [{"leader": name,
                  "from_x_avg": float((x_f - x_avg).abs().mean()),
                  "from_live": float((x_f - fused["live"]).abs().mean())}
                 for name, x_f in fused.items()],
    }
