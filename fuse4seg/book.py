"""What the book's chapters share besides plotting: the default data and how it is named.

- :data:`PHANTOM_CASES`: how many phantom cases each profile uses (``make book`` and every
  chapter read it here, so a chapter run by hand sees the data the build sees);
- :func:`prepare_phantom`: write (or keep, or rewrite) the phantom in a folder, atomically;
- :func:`ensure_data`: a chapter's first data step: the phantom when ``data_dir`` is missing,
  and a label that says which data the chapter runs on;
- :func:`data_label`: that label for any folder (read from a prepared cache's manifest when
  given one);
- :func:`book_seeds`: the seeds chapters 4 and 6 train each method over, per profile
  (:data:`BOOK_SEEDS`), unless the reader passes others;
- :func:`run_hours`: the projected hours of each run chapters 4 and 6 train (chapter 7);
- :func:`chapter_device`: the device a chapter runs on, from its ``device`` parameter and a
  ``train.device`` in its ``overrides``;
- :func:`check_parameters`: a chapter's check, right after its parameters cell, that papermill
  injected no name the chapter does not declare (a misspelt ``-p profil smoke`` is an error,
  not a warning and a whole run with the default profile).

Plotting lives in :mod:`fuse4seg.plotting`; the paper's reported numbers in
:mod:`fuse4seg.paper`.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fuse4seg.config import Config

__all__ = [
    "BOOK_SEEDS",
    "PHANTOM_CASES",
    "PHANTOM_SEED",
    "UnknownParameterError",
    "book_seeds",
    "book_seeds_of",
    "chapter_device",
    "chapter_workers",
    "check_parameters",
    "data_label",
    "ensure_data",
    "phantom_case_count",
    "phantom_cases",
    "prepare_phantom",
    "run_hours",
]

PHANTOM_CASES = {"smoke": 6, "default": 24, "paper": 24}
"""Phantom cases written for each profile when the book runs on the built-in phantom."""

PHANTOM_SEED = 0


def phantom_cases(profile: str) -> int:
    """Number of phantom cases for a profile (:data:`PHANTOM_CASES`).

    Raises:
        ValueError: unknown profile.
    """
    if profile not in PHANTOM_CASES:
        raise ValueError(f"--profile {profile!r}: choose one of {sorted(PHANTOM_CASES)}")
    return PHANTOM_CASES[profile]


BOOK_SEEDS = {"smoke": (0,), "default": (0, 1, 2), "paper": (0,)}
"""The ``train.seed`` values chapters 4 and 6 train each method over when their ``seeds``
parameter is ``None``. One run is an anecdote, so ``default``, which trains in minutes on a CPU,
trains three; ``smoke`` (the tests' profile) and ``paper`` (days per run on a GPU) train one."""


def book_seeds(profile: str, seeds: Sequence[int] | None = None) -> list[int]:
    """The seeds a chapter trains over: ``seeds`` when given, else the profile's
    (:data:`BOOK_SEEDS`).

    Raises:
        ValueError: unknown profile (with ``seeds`` ``None``), no seeds, or a repeated seed.
    """
    from fuse4seg.study import check_seeds

    if seeds is None:
        if profile not in BOOK_SEEDS:
            raise ValueError(f"profile {profile!r}: choose one of {sorted(BOOK_SEEDS)}")
        seeds = BOOK_SEEDS[profile]
    return check_seeds(seeds)


def book_seeds_of(config: Config, seeds: Sequence[int] | None, overrides: Mapping[str, Any]
                  ) -> list[int]:
    """The seeds of chapters 4 and 6: :func:`book_seeds`, where a ``train.seed`` in
    ``overrides`` (which each run's own seed would replace) stands for ``seeds = [that
    seed]``, so that both chapters train the same runs and chapter 6 reuses chapter 4's.

    Args:
        config: the chapter's :class:`~fuse4seg.config.Config` (its profile and overrides).
        seeds: the chapter's ``seeds`` parameter (``None``: the profile's).
        overrides: the chapter's ``overrides`` parameter.

    Raises:
        ValueError: ``seeds`` and a ``train.seed`` override that disagree; as
            :func:`book_seeds`.
    """
    from fuse4seg.config import dotted_name

    if not any(dotted_name(str(name)) == "train.seed" for name in overrides):
        return book_seeds(config.profile, seeds)
    seed = config.train.seed
    if seeds is not None and list(seeds) != [seed]:
        raise ValueError(f"seeds={list(seeds)} and overrides train.seed={seed} disagree: this "
                         "chapter trains one run per seed of `seeds`; give the seeds there")
    return book_seeds(config.profile, [seed])


def chapter_device(device: str, config: Config) -> str:
    """The device a chapter runs on: its ``device`` parameter, or, where that is ``"auto"``,
    the config's ``train.device`` (a ``train.device`` in the chapter's ``overrides``, as
    ``book/build.py --set train.device=cpu`` passes it). Before, chapters 2, 3, 5 and 7 ran
    on ``device`` alone and recorded the override; chapter 4 trained on the override only
    when ``device`` was ``"auto"``.

    Args:
        device: the chapter's ``device`` parameter (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
        config: the chapter's :class:`~fuse4seg.config.Config` (its profile and overrides).

    Raises:
        ValueError: ``device`` and the override name two devices.
    """
    setting = config.train.device
    if device not in ("auto", setting) and setting != "auto":
        raise ValueError(f"device={device!r} and overrides train.device={setting!r} disagree: "
                         "give one (the chapter's `device` parameter)")
    return setting if device == "auto" else device


def chapter_workers(workers: int, device: str) -> int:
    """How many runs a chapter trains at once (:func:`fuse4seg.study.train_parallel`).

    On a CPU, ``workers`` (0: one per core), each run in its own process on
    ``cores // workers`` torch threads; on a GPU (``device`` ``cuda``, ``cuda:N``, or
    ``auto`` where CUDA is available) one, in the chapter's process. Chapters 4 and 6 train
    through this, so every run the two chapters show, chapter 6's reuse of chapter 4's runs
    included, trains on the same number of threads: a run's numbers depend on its thread
    count, and a comparison of two runs trained on different counts would include that
    difference (:func:`fuse4seg.results.thread_note` says which count a table's runs had).

    The device is read as training reads it (:func:`fuse4seg.utils.resolve_device`), so a
    chapter that asks for CUDA on a machine without it stops here, before any run starts.

    Raises:
        ValueError: ``workers`` is negative or not an integer; ``device`` is not a device, or
            asks for CUDA where none is available.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers={workers!r}: give a whole number >= 0 (0: one run per core)")
    from fuse4seg.utils import resolve_device

    if resolve_device(device).type == "cuda":
        return 1
    return workers or os.cpu_count() or 1


def run_hours(config: Config, n_slices: int, t_warm: float, t_outer: float,
              methods: Sequence[str], ablations: Sequence[str] = (), world: int = 1,
              t_leader_forward: float | None = None) -> list[dict[str, Any]]:
    """The projected training time of each run chapters 4 and 6 train for one seed, at
    ``config``'s schedule on ``n_slices`` training slices (chapter 7: the GPU hours ``make
    full`` asks for, on one GPU). With ``world`` W > 1 each run is a ``torchrun`` run on W
    GPUs: its ``hours`` are then wall-clock hours, W times as many GPU hours, and no run
    shares a warm-up (:func:`fuse4seg.train.trainer.train` shares one in a single process
    only).

    Every stage of a run has S = :func:`~fuse4seg.train.bilevel.steps_per_epoch` steps per
    epoch. A step's time in seconds comes from the measured steps where the step is one of
    them, and is estimated from them where it is not (each row names its estimates):

    - a warm-up step: ``t_warm`` (measured, the ConvNeXt follower on one fused channel);
    - a rollout step of a bi-level method: ``t_outer`` (measured);
    - a rollout step of a fixed rule (``average``, ``max``, ``direct2ch``, ``monai_unet``)
      or of the disjoint pipeline: K follower updates on D_tr's B/2 slices, estimated as K
      warm-up steps on B slices (an overestimate where a step's time grows with its batch);
    - a fusion step (the disjoint pipeline's first stage): the leader's forward and backward
      on B slices with the physical losses, estimated as one outer step (which runs the
      leader forward on B/2 + B/2 slices and backward on B/2, plus K follower updates:
      likely an overestimate);
    - the disjoint pipeline's frozen leader: its x_f is kept per slice when all the run's
      slices fit in :data:`Engine.FROZEN_CACHE_BYTES
      <fuse4seg.train.bilevel.Engine.FROZEN_CACHE_BYTES>` (here the ``n_slices`` training
      slices at 4 bytes a pixel; the validation slices the engine counts too are left out,
      which matters only at the edge); otherwise every batch is fused at every step
      (:meth:`~fuse4seg.train.bilevel.Engine.frozen_prior`), which adds
      ``t_leader_forward`` (one forward on B slices, no gradient) to each warm-up step and
      half of it (B/2 slices) to each rollout step;
    - ``direct2ch``'s follower reads two channels and ``monai_unet``'s is another network:
      their steps are not the follower measured, so their whole runs are estimates.

    A Table 3 variant without loss switches (``full``) is its method's run when the method
    is among ``methods`` (as :func:`fuse4seg.results.collect` reuses it); ``A`` and ``B``
    continue from the ``fuse4seg`` warm-up (:func:`fuse4seg.train.runs.shared_warmup`), so
    they add their rollout only; ``baseline`` is a whole ``disjoint_ae`` run with loss
    switches.

    Returns:
        One row per run: ``run``, ``stages`` (``[(stage, epochs)]``), ``steps``, ``hours``
        and ``estimates`` (the kinds of step estimated for the row; empty: every step of the
        run is a measured one).

    Raises:
        ValueError: a count or time is not positive, or a disjoint run needs
            ``t_leader_forward`` (its x_f do not fit the cache) and it is not given.
    """
    from fuse4seg.train.bilevel import Engine, steps_per_epoch
    from fuse4seg.train.methods import get_ablation, get_method

    t = config.train
    times = {"t_warm": t_warm, "t_outer": t_outer, "t_leader_forward": t_leader_forward}
    if n_slices < 1 or world < 1 or any(v is not None and v <= 0 for v in times.values()):
        raise ValueError(f"n_slices={n_slices}, world={world}, "
                         + ", ".join(f"{k}={v}" for k, v in times.items())
                         + ": each must be positive")
    S = steps_per_epoch(config, n_slices, world)
    K = t.inner_steps
    # x_f of one training slice: one float32 channel of the crop
    refused = not Engine.frozen_cache_holds(n_slices, config.data.crop_size ** 2 * 4)

    def row(name: str, method: str, shared_warmup: bool = False) -> dict[str, Any]:
        spec = get_method(method)
        stages = [(stage, epochs) for stage, epochs in spec.plan(t.warmup_epochs,
                                                                  t.rollout_epochs)
                  if epochs and not (shared_warmup and stage == "warmup")]
        estimates = []
        if spec.follower != "convnext" or spec.in_channels != 1:
            estimates.append(f"its follower ({spec.follower}, {spec.in_channels} channels) "
                             "timed as the measured one")
        frozen = {stage for stage, _ in stages if refused and spec.reads_frozen_leader(stage)}
        if frozen:
            if t_leader_forward is None:
                raise ValueError(f"{name}: {n_slices:,} slices of x_f do not fit the frozen "
                                 "leader's cache; give t_leader_forward")
            estimates.append("the frozen leader's forward every step")
        seconds = 0.0
        for stage, epochs in stages:
            if stage == "warmup":
                step = t_warm + (t_leader_forward if stage in frozen else 0.0)
            elif stage == "rollout" and spec.learns_leader_from_follower:
                step = t_outer
            elif stage == "rollout":
                step = K * t_warm + (t_leader_forward / 2 if stage in frozen else 0.0)
                estimates.append("a rollout step as K warm-up steps")
            else:  # the fusion stage
                step = t_outer
                estimates.append("a fusion step as an outer step")
            seconds += epochs * S * step
        return {"run": name, "stages": stages, "steps": S * sum(e for _, e in stages),
                "hours": seconds / 3600, "estimates": estimates}

    rows, warmed = [], set()
    runs = [(m, m) for m in methods]
    for name in ablations:
        variant = get_ablation(name)
        if not (not variant.overrides and variant.method in methods):  # else: that run
            runs.append((name, variant.method))
    for name, method in runs:
        # a bi-level run's warm-up is trained once and shared by its method's later runs
        # (Trainer.can_share_warmup: one process, a warm-up followed by a rollout)
        shares = (get_method(method).warmup_rule is not None and world == 1
                  and t.warmup_epochs > 0 and t.rollout_epochs > 0)
        rows.append(row(name, method, shared_warmup=shares and method in warmed))
        if shares:
            warmed.add(method)
    return rows


def phantom_case_count(data_dir: Path) -> int | None:
    """Number of phantom cases (``Phantom_NNNNN`` folders) in ``data_dir``.

    Returns:
        The count when ``data_dir`` holds phantom case folders and nothing else (hidden files
        aside), ``None`` when it holds anything else (then it is someone's own data).
    """
    names = [p.name for p in Path(data_dir).iterdir() if not p.name.startswith(".")]
    if all(re.fullmatch(r"Phantom_\d{5}", n) and (Path(data_dir) / n).is_dir() for n in names):
        return len(names)
    return None


def prepare_phantom(data_dir: str | Path, cases: int, seed: int = PHANTOM_SEED,
                    workers: int = 1) -> str:
    """Make ``data_dir`` hold the phantom dataset with ``cases`` cases.

    A missing folder is written; a folder holding only phantom cases, but another number of
    them (say, from a build with another profile), is rewritten, so a profile always sees the
    same data; a folder holding anything else is left alone (it is the user's data). Writing
    goes to a temporary sibling folder that is renamed into place, so ``data_dir`` is never
    half-written. ``workers`` processes write the cases (byte-identical to one worker's:
    :func:`fuse4seg.data.phantom.write_phantom_dataset`); ``book/build.py`` uses up to 4.

    Returns:
        ``"written"``, ``"rewritten"``, ``"kept"`` (already right) or ``"foreign"`` (not a
        phantom folder; left as it is).

    Raises:
        ValueError: ``data_dir`` is a file.
    """
    from fuse4seg.data import phantom

    data_dir = Path(data_dir)
    if data_dir.exists():
        if not data_dir.is_dir():
            raise ValueError(f"--data-dir {data_dir} exists and is not a folder")
        count = phantom_case_count(data_dir)
        if count is None:
            return "foreign"
        if count == cases:
            return "kept"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.new-", dir=data_dir.parent))
    old = data_dir.parent / f".{data_dir.name}.old-{os.getpid()}"
    status = "rewritten" if data_dir.exists() else "written"
    try:
        phantom.write_phantom_dataset(tmp, cases=cases, seed=seed, workers=workers)
        if data_dir.exists():
            os.replace(data_dir, old)
        os.replace(tmp, data_dir)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
    return status


def data_label(path: str | Path) -> str:
    """How a chapter names its data: ``"phantom (12 cases)"``, ``"BraTS data in DIR (N
    cases)"``; a prepared cache is named by the cases in its manifest."""
    path = Path(path)
    manifest = path / "manifest.json"
    if manifest.is_file():
        cases = json.loads(manifest.read_text()).get("cases", [])
        phantom = all(str(c).startswith("Phantom_") for c in cases) and cases
        what = "phantom" if phantom else f"data in {path}"
        return f"{what} ({len(cases)} cases)"
    if path.is_dir():
        count = phantom_case_count(path)
        if count is not None:
            return f"phantom ({count} cases)"
        n = sum(1 for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        return f"data in {path} ({n} case folders)"
    return f"data in {path}"


def ensure_data(data_dir: str | Path, profile: str) -> str:
    """A chapter's data step: write the profile's phantom into ``data_dir`` when it is missing
    (or holds a phantom of another size), leave anything else alone; returns
    :func:`data_label`."""
    data_dir = Path(data_dir)
    if not data_dir.exists() or phantom_case_count(data_dir) is not None:
        prepare_phantom(data_dir, phantom_cases(profile))
    return data_label(data_dir)


# --------------------------------------------------------------------------------------------
# Parameters injected by papermill
# --------------------------------------------------------------------------------------------

PAPERMILL_MARKER = "# Parameters"
"""The first line of the cell papermill injects after the ``parameters`` cell (its
``codify``); a cell run in the kernel that starts with it is taken for an injected one."""

PAPERMILL_PATH_NAMES = frozenset({"PAPERMILL_INPUT_PATH", "PAPERMILL_OUTPUT_PATH"})
"""Names ``papermill --inject-paths`` adds to every notebook: always accepted."""


class UnknownParameterError(ValueError):
    """Papermill injected a name the chapter's ``parameters`` cell does not declare."""


def _assigned_names(source: str) -> list[str]:
    """Names assigned at the top level of a cell, in order (``[]`` when it does not parse)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names: list[str] = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name) and name.id not in names:
                    names.append(name.id)
    return names


def check_parameters(namespace: Mapping[str, Any]) -> None:
    """Refuse parameters injected into a chapter under a name it does not declare.

    Each chapter calls ``check_parameters(globals())`` in a small cell right after its cell
    tagged ``parameters``. Papermill runs ``-p NAME VALUE`` as a cell of assignments that it
    inserts after the ``parameters`` cell, and only *warns* when ``NAME`` is not declared
    there; ``-p profil smoke`` would then run the whole chapter with the default profile. The
    kernel's input history (IPython's ``In``, which papermill's executions keep) holds the
    cells in the order they ran: when the cells just before this one are papermill's injected
    cells (they start with ``PAPERMILL_MARKER``, papermill's ``# Parameters`` line), the cell
    before those is the ``parameters`` cell, and every name the injected cells assign must be
    assigned there too.

    Nothing was injected when the chapter is run in JupyterLab, by nbval, by
    ``jupyter nbconvert --execute`` or as a plain script: then there is nothing to check.
    ``book/build.py`` passes each chapter only the names it declares, so a build never fails
    here.

    Args:
        namespace: the kernel's globals (``globals()`` in the chapter).

    Raises:
        UnknownParameterError: names injected but not declared; the message lists them (with
            the nearest declared name) and every name the chapter declares.
    """
    history = namespace.get("In")
    if not isinstance(history, list) or len(history) < 2:
        return
    before = [str(source) for source in history[:-1]]  # history[-1]: the cell running now
    injected: list[str] = []
    index = len(before) - 1
    while index > 0 and before[index].lstrip().split("\n", 1)[0].strip() == PAPERMILL_MARKER:
        injected = _assigned_names(before[index]) + injected
        index -= 1
    if not injected:
        return
    declared = _assigned_names(before[index]) if index > 0 else []
    unknown = [
        name
        for name in dict.fromkeys(injected)
        if name not in declared and name not in PAPERMILL_PATH_NAMES
    ]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, declared, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    valid = ", ".join(declared) if declared else "none (this notebook has no parameters cell)"
    raise UnknownParameterError(
        f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(hints)} passed to "
        f"this chapter (papermill -p). The valid names are: {valid}"
    )
