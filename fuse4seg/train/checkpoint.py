"""Checkpoints that survive a crash and load safely: atomic writes, ``weights_only`` loads, RNGs.

A run folder keeps three files under ``checkpoints/``, and a fourth in some runs:

- ``last.pt``: the full training state (networks, EMA leader, both optimisers, gradient
  scalers, counters, the metrics history and every RNG state) — what ``--resume`` reads;
- ``best.pt``: an *inference bundle* (EMA leader, follower, config) at the best validation mean
  Dice;
- ``ema.pt``: the inference bundle of the latest state;
- ``warmup.pt`` (bi-level runs whose warm-up another method or ablation can share): the full
  training state at the end of the warm-up, which a run with the same warm-up continues from
  instead of training it again (:func:`fuse4seg.train.runs.shared_warmup`).

Each file is written to a temporary file beside its target and renamed (``os.replace``), so a
SIGKILL mid-write leaves the previous file intact. Files hold only tensors, plain dicts, lists,
numbers and strings, and are read with ``torch.load(..., weights_only=True)``, which refuses to
run code from a tampered file. Bi-level runs and fusion-only runs (``leader.pt``) use this one
format. Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fuse4seg.utils import atomic_write_bytes

__all__ = [
    "CHECKPOINT_FORMAT",
    "capture_rng",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise ``state`` with ``torch.save`` and write it atomically to ``path``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a fuse4seg checkpoint (unreadable, or unsafe content).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch's pickler warnings say nothing more than below
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, truncation, unsafe globals
        text = str(exc)
        if "Weights only load failed" in text and "Unsupported operand" not in text:
            why = ("it holds Python objects other than tensors and plain values, which are "
                   "not loaded, for safety")
        elif "Weights only load failed" in text or not text.strip() or text.strip().isdigit():
            why = f"not a file written by torch.save ({type(exc).__name__})"
        else:
            why = text.strip().splitlines()[0]
        raise ValueError(f"{path}: not a readable fuse4seg checkpoint: {why}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a fuse4seg checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def capture_rng() -> dict[str, Any]:
    """Every global RNG state as tensors and plain lists (``weights_only``-safe)."""
    mt_name, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": mt_name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` saved (the CUDA part only where CUDA is in use)."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
