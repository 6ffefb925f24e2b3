"""Run folders: ``RUNS/<method>-<profile>-<hash>/`` and the data they were trained on.

A run folder says what made it:

- ``config.yaml``: the resolved :class:`fuse4seg.config.Config`;
- ``run.json``: method, ablation, git commit, data path, manifest checksum, start time, world size;
- ``metrics.jsonl``: one JSON object per epoch (losses, learning rates, validation Dice/IoU);
- ``checkpoints/{last,best,ema}.pt`` (:mod:`fuse4seg.train.checkpoint`);
- ``glassbox/``: the fused prior of a few fixed validation slices at each validation.

The hash covers the resolved config (less ``train.device`` and ``train.num_workers``, which do
not define the experiment), the method, the world size when > 1, and the SHA-256 of the data
manifest, so the same command on the same data finds the same folder (that is how ``--resume``
finds it) and any change of setting or data makes a new one.

Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fuse4seg.config import Config

__all__ = [
    "data_checksum",
    "read_metrics",
    "resolve_cache",
    "run_hash",
    "run_name",
]

_NOT_HASHED = {("train", "device"), ("train", "num_workers")}


def resolve_cache(
    data: str | Path,
    config: Config,
    cache: str | Path | None = None,
    runs_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """The prepared slice cache to train on.

    Args:
        data: a prepared cache (a folder holding ``manifest.json``) or a raw NIfTI folder.
        config: the run's config (its ``data`` section decides the cache settings).
        cache: where to prepare the cache of a raw folder (default
            ``runs_dir/cache-<hash of the data path and settings>``).
        runs_dir: the runs folder (needed when ``cache`` is not given for a raw folder).

    Returns:
        The cache folder.

    Raises:
        FileNotFoundError: ``data`` does not exist.
        ValueError: ``data`` is neither a cache nor a BraTS folder; a cache prepared with
            other data settings than ``config.data``.
    """
    from fuse4seg.data.slices import SETTINGS_FIELDS, load_manifest, prepare_cache

    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"--data {data}: no such folder")
    if (data / "manifest.json").exists():
        manifest = load_manifest(data)
        wanted = json.loads(
            json.dumps({name: getattr(config.data, name) for name in SETTINGS_FIELDS})
        )
        if manifest.get("settings") != wanted:
            raise ValueError(
                f"--data {data}: the cache was prepared with settings {manifest.get('settings')}"
                f", but profile {config.profile!r} needs {wanted}; prepare it again with "
                f"`fuse4seg data prepare RAW --out {data} --profile {config.profile}` or give the "
                f"raw folder"
            )
        return data
    if cache is None:
        if runs_dir is None:
            raise ValueError("resolve_cache: give `cache` or `runs_dir` for a raw data folder")
        key = json.dumps([str(data.resolve()), config.to_dict()["data"]], sort_keys=True)
        cache = Path(runs_dir) / f"cache-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    prepare_cache(data, cache, config.data, progress=progress)
    return Path(cache)


def data_checksum(cache_dir: str | Path) -> str:
    """SHA-256 of the cache's ``manifest.json`` (cases, split, settings, source checksums)."""
    return hashlib.sha256((Path(cache_dir) / "manifest.json").read_bytes()).hexdigest()


def run_hash(config: Config, method: str, checksum: str, world_size: int = 1, n: int = 8) -> str:
    """The short hash that names a run folder (see the module docstring)."""
    cfg = config.to_dict()
    for section, name in _NOT_HASHED:
        cfg[section].pop(name, None)
    key: dict[str, Any] = {"config": cfg, "method": method, "data": checksum}
    if world_size > 1:
        key["world_size"] = world_size
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:n]


def run_name(config: Config, method: str, checksum: str, world_size: int = 1) -> str:
    """``<method>-<profile>-<hash>``."""
    return f"{method}-{config.profile}-{run_hash(config, method, checksum, world_size)}"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (one per epoch), oldest first.

    Raises:
        FileNotFoundError: the run folder has no ``metrics.jsonl``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a training run folder?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
