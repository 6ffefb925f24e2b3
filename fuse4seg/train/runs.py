"""Run folders: ``RUNS/<method>-<profile>-<hash>/`` and the data they were trained on.

A run folder says what made it:

- ``config.yaml``: the resolved :class:`fuse4seg.config.Config`;
- ``run.json``: method, ablation, git commit, code digest, data path, manifest checksum, the
  patient split (``split``: the case ids of ``train``, ``val`` and ``test``, so the run still
  says which patients it trained on when its cache is gone), start time, world size, the
  versions, the command line and the :func:`numerics` (threads, device, switches); each
  ``--resume`` adds an entry to ``resumed`` (:func:`note_resume`);
- ``metrics.jsonl``: one JSON object per epoch (losses, learning rates, validation Dice/IoU);
- ``checkpoints/{last,best,ema}.pt``, and ``warmup.pt`` where the warm-up can be shared
  (:mod:`fuse4seg.train.checkpoint`);
- ``glassbox/``: the fused prior of a few fixed validation slices at each validation.

The hash covers the resolved config (less ``train.device``, which does not define the
experiment, and the ``fusion`` section, which only fusion-only runs read), the method, the world
size when > 1, and the data's :func:`data_checksum` (not their path), so the same command on the
same data finds the same folder (that is how ``--resume`` finds it) and any change of setting or
data makes a new one. Fusion-only runs (``RUNS/fusion-<kind>-<profile>-<hash>/``) are named the
same way from the config, their kind, schedule, seed and training pairs
(:func:`fusion_run_name`).

Every run folder records the package's code digest (:func:`fuse4seg.utils.code_digest`) in
``run.json``; :func:`check_code` compares it when a run is resumed or reused.

Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fuse4seg.config import Config
from fuse4seg.utils import (
    atomic_write_json,
    atomic_write_text,
    code_digest,
    cpu_name,
    git_commit,
)

__all__ = [
    "check_code",
    "other_code_message",
    "cpu_name",
    "data_checksum",
    "flatten",
    "fusion_run_name",
    "note_resume",
    "numerics",
    "read_metrics",
    "read_run_json",
    "remove_run",
    "resolve_cache",
    "run_hash",
    "run_name",
    "write_metrics",
    "write_run_json",
]

_NOT_HASHED = {("train", "device")}


def resolve_cache(
    data: str | Path,
    config: Config,
    cache: str | Path | None = None,
    runs_dir: str | Path | None = None,
    progress: bool = True,
    split_free: bool = False,
    replace_other: bool = False,
) -> Path:
    """The prepared slice cache to train on.

    Args:
        data: a prepared cache (a folder holding ``manifest.json``) or a raw NIfTI folder.
        config: the run's config (its ``data`` section decides the cache settings).
        cache: where to prepare the cache of a raw folder (default
            ``runs_dir/cache-<hash of the data path and settings>``).
        runs_dir: the runs folder (needed when ``cache`` is not given for a raw folder).
        split_free: a prepared cache may differ from ``config.data`` in its split settings
            (``split_seed``, ``split_fractions``): ``evaluate``, which takes the split from
            the cache's manifest and checks it against the run's (``--split``).
        replace_other: a ``cache`` that already holds the cache of another data folder, or
            one prepared with other data settings, is prepared again in place for ``data``.
            By default it is refused instead: other runs may have trained on it, and a
            mistyped ``--cache`` would silently replace it. (The chapters' shared cache,
            :func:`fuse4seg.results.shared_cache`, follows the chapter's parameters.) A cache
            of the same folder and settings is brought up to date either way.

    Returns:
        The cache folder.

    Raises:
        FileNotFoundError: ``data`` does not exist.
        ValueError: ``data`` is neither a cache nor a BraTS folder; a cache prepared with
            other data settings than ``config.data``; a ``cache`` other than ``data`` where
            ``data`` is a prepared cache (it would be ignored); a ``cache`` that holds the
            cache of another folder or other settings, unless ``replace_other``.
    """
    from fuse4seg.data.slices import cache_settings, load_manifest, prepare_cache

    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"--data {data}: no such folder")
    if (data / "manifest.json").exists():
        if cache is not None and Path(cache).resolve() != data.resolve():
            raise ValueError(f"--cache {cache}: --data {data} is a prepared cache already (it "
                             "holds manifest.json) and is used as it is; --cache is where the "
                             "cache of a raw --data folder goes: drop --cache, or give the raw "
                             "folder as --data")
        manifest = load_manifest(data)
        free = ("split_seed", "split_fractions") if split_free else ()
        wanted = {k: v for k, v in cache_settings(config.data).items() if k not in free}
        have = {k: v for k, v in (manifest.get("settings") or {}).items() if k not in free}
        if have != wanted:
            raise ValueError(_settings_mismatch(data, have, wanted, config))
        return data
    flag = "--cache"
    if cache is None:
        if runs_dir is None:
            raise ValueError("resolve_cache: give `cache` or `runs_dir` for a raw data folder")
        if Path(runs_dir).exists() and not Path(runs_dir).is_dir():
            raise ValueError(f"--out {runs_dir}: is a file, not a folder")
        key = json.dumps([str(data.resolve()), config.to_dict()["data"]], sort_keys=True)
        cache = Path(runs_dir) / f"cache-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        flag = "the slice cache"
    elif not replace_other:
        _check_not_another_cache(Path(cache), data, config, split_free)
    prepare_cache(data, cache, config.data, progress=progress, flag=flag)
    return Path(cache)


def _check_not_another_cache(cache: Path, data: Path, config: Config,
                             split_free: bool = False) -> None:
    """Refuse a ``--cache`` folder that holds the cache of another data folder, or one
    prepared with other data settings than ``config.data`` (:func:`resolve_cache`). With
    ``split_free`` (``evaluate``), a cache that differs in its split alone is still refused
    here (preparing it would rewrite its split), and the message says that ``--data CACHE``
    evaluates on it as it is.

    A folder that is not a cache at all is left for :func:`~fuse4seg.data.slices.prepare_cache`
    to judge (it refuses one with other files in it).
    """
    from fuse4seg.data.layouts import DataError
    from fuse4seg.data.slices import cache_settings, load_manifest

    try:
        manifest = load_manifest(cache)
    except (DataError, OSError, UnicodeDecodeError):
        return
    if not isinstance(manifest, dict) or "settings" not in manifest:
        return
    source = manifest.get("data_dir")
    keep = ("it is not prepared again in place, since runs trained on it read it: give a new "
            "--cache folder, or leave --cache out (the runs folder's own cache of --data)")
    if source is not None and Path(source) != data.resolve():
        raise ValueError(f"--cache {cache}: holds the slice cache of another data folder, "
                         f"{source}, not --data {data}; {keep}")
    wanted, have = cache_settings(config.data), manifest["settings"]
    if have != wanted:
        names, differ = _differences(have, wanted)
        if split_free and set(names) <= {"split_seed", "split_fractions"}:
            keep += f"; or `--data {cache}` evaluates on it as it is, with its own split"
        raise ValueError(f"--cache {cache}: holds a slice cache of --data {data} prepared "
                         f"with other data settings: {differ}; {keep}")


def _differences(have: dict[str, Any], wanted: dict[str, Any]) -> tuple[list[str], str]:
    """The data settings in which a cache's manifest (``have``) and a config (``wanted``)
    differ, and the words that list them (``data.crop_size 64 (needed: 80)``)."""
    names = [n for n in wanted if have.get(n) != wanted[n]]
    names += [n for n in have if n not in wanted]
    return names, ", ".join(
        f"data.{n} {json.dumps(have.get(n))} (needed: {json.dumps(wanted.get(n))})"
        for n in names)


def _settings_mismatch(data: Path, have: dict[str, Any], wanted: dict[str, Any],
                       config: Config) -> str:
    """The error for a cache prepared with other data settings: only the settings that
    differ, where the wanted ones come from (the profile, or ``--set`` on top of it), and the
    command that prepares a matching cache in a new folder (other runs may use this one)."""
    from fuse4seg.config import ConfigError, get_config

    def setting(name: str, value: Any) -> str:
        return f"data.{name}={json.dumps(value, separators=(',', ':'))}"

    names, differ = _differences(have, wanted)
    name = config.profile
    try:
        base = get_config(name)
    except ConfigError:  # a config file's own profile name: its settings sit on paper's
        name, base = "paper", get_config("paper")
    profile = json.loads(json.dumps(base.to_dict()["data"]))
    overridden = [n for n in wanted if profile.get(n) != wanted[n]]
    source = f"profile {name!r}" + (
        " with --set " + ", ".join(setting(n, wanted[n]) for n in overridden)
        if overridden else "")
    sets = "".join(f" --set {setting(n, wanted[n])}" for n in overridden)
    return (f"--data {data}: the cache was prepared with other data settings than {source} "
            f"needs: {differ}. Prepare a matching cache in a new folder, `fuse4seg data prepare "
            f"RAW --out NEW_CACHE --profile {name}{sets}`, or give the raw folder")


def data_checksum(cache_dir: str | Path) -> str:
    """SHA-256 of what the cache's ``manifest.json`` says of the data: cases, split, settings,
    and each source file's checksum, but not where the files were (``data_dir``, each case's
    ``sources``). So the same data prepared from a folder given as a relative path, an
    absolute one, or on another machine has the same checksum, and ``--resume`` finds its run.
    """
    manifest = json.loads((Path(cache_dir) / "manifest.json").read_text())
    manifest.pop("data_dir", None)
    for case in manifest.get("case_info", []):
        case.pop("sources", None)
    if "skipped" in manifest:  # their errors name files by path: the ids alone
        manifest["skipped"] = [e.get("case_id") for e in manifest["skipped"]]
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _hashed_config(config: Config) -> dict[str, Any]:
    cfg = config.to_dict()
    for section, name in _NOT_HASHED:
        cfg[section].pop(name, None)
    return cfg


def _short(key: dict[str, Any], n: int = 8) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:n]


def _training_config(config: Config) -> dict[str, Any]:
    """The settings a segmentation run depends on: :func:`_hashed_config` without the
    fusion-only section (chapter 5's schedule)."""
    cfg = _hashed_config(config)
    cfg.pop("fusion", None)
    return cfg


def run_hash(config: Config, method: str, checksum: str, world_size: int = 1, n: int = 8) -> str:
    """The short hash that names a run folder (see the module docstring)."""
    cfg = _training_config(config)
    key: dict[str, Any] = {"config": cfg, "method": method, "data": checksum}
    if world_size > 1:
        key["world_size"] = world_size
    return _short(key, n)


UPPER_ONLY = ("loss.alpha_decomp", "loss.beta_grad", "loss.gamma_recon", "loss.use_decomp",
              "loss.use_grad", "loss.use_recon")
"""Settings that only the leader's upper-level loss reads (Eq. 3): runs that differ in nothing
else (Table 3's variants A, B and full) have the same warm-up, bit for bit."""


def numerics(device: Any) -> dict[str, Any]:
    """What moves a run's numbers in their last float bits besides its settings, code and
    data: the torch build, torch's thread count, the device's type and the
    :data:`~fuse4seg.utils.ENV_SWITCHES` that are set. The same run under other numerics lands
    in the same folder (they do not define the experiment), so ``run.json`` records them, a
    resume under others is warned about (:func:`note_resume`), and a warm-up is shared only
    under the same (:func:`warmup_key`)."""
    import torch

    from fuse4seg.utils import ENV_SWITCHES, env_setting

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.device(device).type,
        "switches": {name: env_setting(name) for name in ENV_SWITCHES if env_setting(name)},
    }


def warmup_key(config: Config, method: str, checksum: str, world_size: int = 1,
               device: Any = "cpu") -> str:
    """What a run's warm-up depends on: :func:`run_hash`'s key without :data:`UPPER_ONLY`, plus
    the code digest and the :func:`numerics` on ``device``. Runs with the same key may share
    one warm-up (:func:`shared_warmup`): a warm-up trained on two threads is not shared with a
    run on one, whose own warm-up would differ in the last bits."""
    cfg = _training_config(config)
    for name in UPPER_ONLY:
        section, field_name = name.split(".")
        cfg.get(section, {}).pop(field_name, None)
    key = {"config": cfg, "method": method, "data": checksum, "world_size": world_size,
           "code": code_digest(), "numerics": numerics(device)}
    return _short(key, 16)


def shared_warmup(out: str | Path, key: str, exclude: Path, device: Any = "cpu") -> Path | None:
    """The ``checkpoints/warmup.pt`` of a run folder under ``out`` (other than ``exclude``)
    whose ``run.json`` has ``warmup_key == key`` and whose resumes (``resumed``) all ran with
    this process's :func:`numerics` on ``device`` and code, else ``None``."""
    now = {**numerics(device), "code": code_digest()}
    for info_path in sorted(Path(out).glob("*/run.json")):
        run_dir = info_path.parent
        if run_dir.resolve() == Path(exclude).resolve():
            continue
        state = run_dir / "checkpoints" / "warmup.pt"
        info = read_run_json(run_dir)
        if not state.is_file() or info.get("warmup_key") != key:
            continue
        if all({k: r.get(k) for k in now} == now for r in info.get("resumed", [])):
            return state
    return None


def fusion_run_name(
    config: Config, kind: str, schedule: dict[str, Any], seed: int, pairs: list[str]
) -> str:
    """``fusion-<kind>-<profile>-<hash>`` of a fusion-only run (module docstring)."""
    key = {
        "config": _hashed_config(config),
        "kind": kind,
        "schedule": schedule,
        "seed": seed,
        "pairs": sorted(pairs),
    }
    return f"fusion-{kind}-{config.profile}-{_short(key)}"


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


def write_metrics(run_dir: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write ``metrics.jsonl`` (one JSON object per row) atomically."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write_text(Path(run_dir) / "metrics.jsonl", text)


def write_run_json(run_dir: str | Path, **info: Any) -> dict[str, Any]:
    """Write ``run.json``: ``info`` plus the git commit, the code digest, the start time, the
    versions (fuse4seg, Python, numpy, torch), the command line, the seed-independent facts of
    the machine (torch threads, CPU/GPU name) and the switches set (:func:`numerics`, on
    ``info``'s ``device``). Returns the dict."""
    import platform

    import numpy as np
    import torch

    import fuse4seg

    record = {
        **info,
        "commit": git_commit(),
        "code": code_digest(),
        "fuse4seg": fuse4seg.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        # torch, threads, switches (the device as given stays: cuda:1, not only its type)
        **{k: v for k, v in numerics(info.get("device", "cpu")).items() if k != "device"},
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "argv": list(sys.argv),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(Path(run_dir) / "run.json", record)
    return record


def note_resume(run_dir: str | Path, device: Any, epoch: int, step: int) -> list[str]:
    """Record in ``run.json`` that the run is continued here (``resumed``: one entry per
    resume, with where it continues, the commit, the code digest, the :func:`numerics` and
    the command line), and return how this process's numerics differ from the ones the run
    started with (``"threads 1 -> 2"``; empty when they agree or were not recorded): the
    resumed run then differs in the last bits from one never stopped."""
    record = read_run_json(run_dir)
    if not record:  # nothing to add to: a stub would hide what the run was
        warnings.warn(f"{run_dir}: run.json is missing or unreadable, so this resume is not "
                      "recorded and its numerics are not compared", stacklevel=3)
        return []
    now = numerics(device)
    was = {"torch": record.get("torch"), "threads": record.get("threads"),
           "device": str(record["device"]).split(":")[0] if record.get("device") else None,
           "switches": record.get("switches")}  # older run.json files: not recorded
    differ = [f"{k} {was[k]} -> {now[k]}" for k in now
              if was[k] is not None and was[k] != now[k]]
    record.setdefault("resumed", []).append({
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "epoch": int(epoch), "step_in_epoch": int(step),
        "commit": git_commit(), "code": code_digest(), **now, "argv": list(sys.argv),
    })
    atomic_write_json(Path(run_dir) / "run.json", record)
    return differ


def read_run_json(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run folder, or ``{}`` when missing or unreadable."""
    try:
        return json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def mark_finished(run_dir: str | Path, epochs: int, best: dict[str, Any] | None) -> None:
    """Record in ``run.json`` that the run trained all ``epochs`` (its last checkpoint is saved)
    and its best validation, so :func:`finished_run` can reuse it without loading anything."""
    record = read_run_json(run_dir)
    record["finished"] = {
        "epochs": int(epochs),
        "best": best,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(Path(run_dir) / "run.json", record)


def finished_run(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``finished`` record of a run that trained to the end with this package's code
    (:func:`mark_finished`; same :func:`~fuse4seg.utils.code_digest`, ``last.pt`` present),
    else ``None``."""
    run_dir = Path(run_dir)
    info = read_run_json(run_dir)
    done = info.get("finished")
    if not done or info.get("code") != code_digest():
        return None
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        return None
    return done


def check_code(run_dir: Path, restart: bool, quiet: bool = False) -> bool:
    """Compare the run's recorded code digest with this package's.

    Returns ``True`` when they match. Otherwise, with ``restart``, the folder is removed (one
    rename first, so an interruption never leaves a mix of old and new files) and ``False`` is
    returned; without it a warning (unless ``quiet``) says the run is continued anyway and
    ``False`` is returned.
    """
    info = read_run_json(run_dir)
    if info.get("code") == code_digest():
        return True
    what = other_code_message(
        run_dir, info, "starting it again" if restart else "resuming it anyway"
    )
    if restart:
        print(what, file=sys.stderr, flush=True)
        remove_run(run_dir)
    elif not quiet:
        warnings.warn(what, stacklevel=3)
    return False


def remove_run(run_dir: str | Path) -> None:
    """Delete a run folder: renamed first, so an interruption never leaves a mix of old files
    under the run's name (the next run would take them for its own)."""
    run_dir = Path(run_dir)
    stale = run_dir.with_name(f"{run_dir.name}.stale-{os.getpid()}")
    os.replace(run_dir, stale)
    shutil.rmtree(stale)


def other_code_message(run_dir: Path, info: dict[str, Any], action: str) -> str:
    """What a run folder written by other fuse4seg code gets: its path, then ``action``, then
    both code digests with their commits, in short lines (a chapter shows it in an output
    block 86 characters wide)."""
    return (
        f"{run_dir}\n  was trained by other fuse4seg code: {action}"
        f"\n  that run:  code {info.get('code') or 'not recorded'}, "
        f"commit {_short_commit(info.get('commit'))}"
        f"\n  this code: code {code_digest()}, commit {_short_commit(git_commit())}"
    )


def _short_commit(commit: str | None) -> str:
    """A commit as :func:`git_commit` writes it, cut to 12 hex digits (``-dirty`` kept)."""
    if not commit or commit == "unknown":
        return "unknown"
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def flatten(config: Config) -> dict[str, Any]:
    """``{"section.name": value}`` of every setting (to rebuild a config with overrides)."""
    return {
        f"{section}.{name}": value
        for section, values in config.to_dict().items()
        if isinstance(values, dict)
        for name, value in values.items()
    }
