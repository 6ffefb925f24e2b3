"""Learning curves over seeds: does a profile's training reach a plateau, and does the rollout
keep what the warm-up learned? (issue 10; chapter 4, ``benchmarks/learning_curves.py``)

A *curve* is one run's list of epochs, each ``{"epoch", "stage", "L_lower", "val",
"elapsed_s"}`` with ``val`` the validation mean Dice over NCR, ED and ET (:func:`curve` reads
it from a run folder trained with ``train.val_every=1``). A *report* is what
``benchmarks/learning_curves.py`` writes: ``{"data", "profile", "overrides", "commit", "cpu",
"cores", "methods": {method: {"runs": [{"seed", "seconds", "curve", ...}], ...}}}``.

Two tests, both over seeds:

- :func:`plateau` — the change of the validation Dice over the last quarter of the epochs
  (mean over seeds) against the seed-to-seed standard deviation at the end. A change within the
  sd is a plateau: more epochs of the same schedule would not move the result by more than a
  change of seed does. (Our reading of issue 10's criterion; with a cosine schedule that ends at
  zero the last quarter learns slowly by construction, so the test is a floor, not proof of
  convergence.)
- :func:`rollout_targets` — at the change from warm-up to rollout: the follower's training
  loss in the first rollout epoch over its last warm-up epoch (target ≤ 1.15), and the largest
  fall of any rollout validation below the last warm-up validation against the seed-to-seed sd
  of that last warm-up validation. :func:`warmup_noise` says how much of that fall is the
  epoch-to-epoch noise of the one validation it starts from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fuse4seg.formatting import format_mean_sd, format_signed
from fuse4seg.results import mean_sd

__all__ = ["config_differences", "curve", "load_report", "plateau", "plot_learning_curves",
           "rollout_targets", "same_seed_markdown", "summary_markdown", "warmup_noise"]


def curve(run_dir: str | Path) -> list[dict[str, Any]]:
    """One run's curve from its ``metrics.jsonl`` (epochs without validation have ``val``
    ``None``)."""
    from fuse4seg.train.runs import read_metrics

    return [
        {"epoch": r["epoch"], "stage": r["stage"], "L_lower": r.get("L_lower"),
         "val": r["val"]["mean_dice"] if "val" in r else None, "elapsed_s": r.get("elapsed_s"),
         **{k: r[k] for k in ("L_lower_first", "L_lower_ref_next") if k in r}}
        for r in read_metrics(run_dir)
    ]


def _vals(curves: Sequence[Sequence[Mapping[str, Any]]]) -> np.ndarray:
    """seeds × epochs array of validation Dice (NaN where an epoch was not validated)."""
    lengths = {len(c) for c in curves}
    if len(lengths) != 1:
        raise ValueError(f"curves of different lengths {sorted(lengths)}: one profile per test")
    return np.array([[np.nan if r["val"] is None else r["val"] for r in c] for c in curves],
                    dtype=float)


def plateau(curves: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """The change of validation Dice over the last quarter of the epochs against the seed sd.

    Returns ``from_epoch``/``to_epoch`` (1-based), ``change_mean`` and ``change_per_seed``,
    ``sd_end`` (sample sd over seeds of the last validation) and ``plateau`` (``None`` with a
    single seed, which has no sd).

    Raises:
        ValueError: no curves, curves of different lengths, or an epoch of the comparison that
            was not validated.
    """
    if not curves:
        raise ValueError("plateau: no curves")
    vals = _vals(curves)
    n = vals.shape[1]
    start = n - max(1, n // 4) - 1  # index of the epoch a quarter of the run before the end
    if np.isnan(vals[:, [start, -1]]).any():
        raise ValueError(f"plateau: epochs {start + 1} and {n} must be validated "
                         "(train with train.val_every=1)")
    change = vals[:, -1] - vals[:, start]
    single = len(curves) == 1
    sd = float("nan") if single else float(vals[:, -1].std(ddof=1))
    return {"from_epoch": start + 1, "to_epoch": n, "change_mean": float(change.mean()),
            "change_per_seed": change.tolist(), "sd_end": sd,
            "plateau": None if single else bool(abs(change.mean()) <= sd)}


def rollout_targets(curves: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any] | None:
    """Issue 10's targets at the stage change (``None`` for a method without both stages).

    The follower's training loss at the stage change is compared **on the same slices**:
    ``loss_ratio`` (per seed) is the mean ``L_lower_first`` of the first rollout epoch (each
    step's loss on its fresh D_tr before the K updates on it) over ``L_lower_ref_next`` of the
    last warm-up epoch (the warmed-up follower's loss on those same D_tr slices, fed the
    warm-up's prior, before any rollout update:
    :meth:`~fuse4seg.train.bilevel.Engine.stage_change_reference`). ``loss_ratio_logged`` is
    the ratio of the two epochs' logged
    ``L_lower``, which compares different batches: B random slices in the warm-up, B/2 slices
    from half the patients in D_tr, on which the batch soft Dice is higher for the same follower
    (``benchmarks/probe_loss_ratio.py``). Runs written before the reference was logged have
    only the logged ratio, and ``loss_ratio`` is then that one (``same_slices`` says which, per
    run; ``loss_basis`` for all of them).

    Also ``drop`` (per seed: last warm-up validation − lowest rollout validation), ``sd_warm``
    (seed sd of the last warm-up validation), ``loss_ok`` (every ``loss_ratio`` ≤ 1.15;
    ``None`` when the basis is mixed, since a logged ratio carries the batch effect above and
    a same-slice one does not, so one verdict over both would judge unlike things) and
    ``drop_ok`` (every drop ≤ ``sd_warm``; ``None`` with one seed).
    """
    ratios, logged, drops, warm_vals, same_slices = [], [], [], [], []
    for c in curves:
        warm = [r for r in c if r["stage"] == "warmup"]
        roll = [r for r in c if r["stage"] == "rollout"]
        if not warm or not roll:
            return None
        warm_val = next((r["val"] for r in reversed(warm) if r["val"] is not None), None)
        roll_vals = [r["val"] for r in roll if r["val"] is not None]
        logged.append(roll[0]["L_lower"] / warm[-1]["L_lower"])
        ref, first = warm[-1].get("L_lower_ref_next"), roll[0].get("L_lower_first")
        same_slices.append(ref is not None and first is not None)
        ratios.append(first / ref if same_slices[-1] else logged[-1])
        if warm_val is not None and roll_vals:
            warm_vals.append(warm_val)
            drops.append(warm_val - min(roll_vals))
    sd = float(np.std(warm_vals, ddof=1)) if len(warm_vals) > 1 else float("nan")
    basis = ("same D_tr slices" if all(same_slices)
             else "logged L_lower" if not any(same_slices) else "mixed")
    loss_ok = None if basis == "mixed" else bool(max(ratios) <= 1.15)
    return {"loss_ratio": ratios, "loss_ratio_logged": logged, "loss_basis": basis,
            "same_slices": same_slices,
            "drop": drops, "sd_warm": sd, "loss_ok": loss_ok,
            "drop_ok": bool(max(drops) <= sd) if len(drops) > 1 else None}


def warmup_noise(curves: Sequence[Sequence[Mapping[str, Any]]], window: int = 5,
                 cadence: int = 5) -> dict[str, Any] | None:
    """How much of :func:`rollout_targets`' drop is the noise of one validation, per run.

    The drop target compares the rollout's validations with the **single** last warm-up
    validation. On one validation patient, with the warm-up's rate still high at its end, that
    one value swings from epoch to epoch within a run. For runs validated every epoch
    (``train.val_every=1``) this gives, per run: ``last`` (the last warm-up validation),
    ``level`` and ``epoch_sd`` (mean and sample sd of the last ``window`` warm-up
    validations), ``rollout_min`` (the lowest rollout validation a run validated every
    ``cadence`` epochs would see: epochs divisible by ``cadence`` and the last), and the two
    drops ``drop_last = last − rollout_min`` (the target's) and ``drop_level = level −
    rollout_min``, and ``within_noise`` (``drop_level ≤ epoch_sd``: the rollout ends no
    further below the warm-up's level than the warm-up's own validations scatter around it).
    ``None`` for a method without both stages.

    Raises:
        ValueError: one of the last ``window`` warm-up epochs was not validated.
    """
    out: dict[str, list[float]] = {k: [] for k in
                                   ("last", "level", "epoch_sd", "rollout_min", "drop_last",
                                    "drop_level", "within_noise")}
    for c in curves:
        warm = [r for r in c if r["stage"] == "warmup"]
        roll = [r for r in c if r["stage"] == "rollout"]
        if not warm or not roll:
            return None
        tail = [r["val"] for r in warm[-window:]]
        if len(tail) < window or any(v is None for v in tail):
            raise ValueError(f"warmup_noise: the last {window} warm-up epochs must be validated "
                             "(train with train.val_every=1)")
        last_epoch = roll[-1]["epoch"]
        seen = [r["val"] for r in roll if r["val"] is not None
                and (r["epoch"] % cadence == 0 or r["epoch"] == last_epoch)]
        level, low = float(np.mean(tail)), float(min(seen))
        for k, v in (("last", tail[-1]), ("level", level),
                     ("epoch_sd", float(np.std(tail, ddof=1))), ("rollout_min", low),
                     ("drop_last", tail[-1] - low), ("drop_level", level - low)):
            out[k].append(float(v))
        out["within_noise"].append(bool(out["drop_level"][-1] <= out["epoch_sd"][-1]))
    return out


def load_report(path: str | Path) -> dict[str, Any]:
    """A report written by ``benchmarks/learning_curves.py``. A relative ``path`` missing from
    the working folder is also looked for in the source checkout this package was imported from
    (a chapter run from ``book/`` in JupyterLab, or by nbval, has another working folder).

    Raises:
        FileNotFoundError: no such file (the message says how to make it).
    """
    path = Path(path)
    checkout = Path(__file__).resolve().parents[1] / path
    if not path.is_file() and not path.is_absolute() and checkout.is_file():
        path = checkout
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no learning-curve report; make one with "
            "`python benchmarks/learning_curves.py --out " + str(path) + "`"
        )
    return json.loads(path.read_text())


PER_RUN_SETTINGS = ("train.seed", "train.val_every", "train.device")
"""Settings a learning-curve report varies per run or by design (every epoch validated)."""


def config_differences(report: Mapping[str, Any], config) -> list[str]:
    """The settings in which the configuration of ``report`` (``benchmarks/learning_curves.py``
    records it in ``config``) differs from ``config``, as ``"name: report value, here value"``
    lines, ``PER_RUN_SETTINGS`` (the seed, the validation interval, the device) left out; a
    setting the report predates counts at its
    default. A report without its configuration (written by an older script) gives one line
    that says so. Chapter 4 prints them under the plot, so curves
    measured with another geometry or schedule are never shown as this profile's."""
    from fuse4seg.config import Config
    from fuse4seg.train.runs import flatten

    theirs = report.get("config")
    if theirs is None:
        return ["the report does not record its configuration (an older learning_curves.py)"]
    ours = {k: v for k, v in flatten(config).items() if k not in PER_RUN_SETTINGS}
    theirs = {k: v for k, v in theirs.items() if k not in PER_RUN_SETTINGS}
    # a setting added after the report was written ran at its default there
    defaults = flatten(Config())
    theirs.update({k: defaults[k] for k in ours if k not in theirs and k in defaults})

    def norm(value):  # JSON turns tuples into lists
        return list(value) if isinstance(value, tuple) else value

    return [f"{k}: {theirs.get(k, '(unset)')!r} in the report, {ours.get(k, '(unset)')!r} here"
            for k in sorted(set(ours) | set(theirs)) if norm(ours.get(k)) != norm(theirs.get(k))]


def _stage_change(runs: Sequence[Mapping[str, Any]]) -> int | None:
    """The last warm-up epoch of a method with a rollout (``None`` otherwise)."""
    c = runs[0]["curve"]
    warm = [r["epoch"] for r in c if r["stage"] == "warmup"]
    return warm[-1] if warm and any(r["stage"] == "rollout" for r in c) else None


def plot_learning_curves(report: Mapping[str, Any], axes=None):
    """Validation mean Dice (left) and the follower's training loss L_lower (right) per epoch:
    one thin line per seed, the mean over seeds bold, a band of ± one sd; a dotted line at the
    end of each bi-level method's warm-up. Each method's mean has its own dash pattern, so a
    method whose curve lies on another's (two methods that share a warm-up) still shows.
    Returns the figure."""
    import matplotlib.pyplot as plt

    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    fig = axes[0].figure
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dashes = ("-", (0, (5, 3)), (0, (1, 2)), (0, (6, 2, 1, 2)))
    for i, (method, entry) in enumerate(report["methods"].items()):
        colour = colours[i % len(colours)]
        runs = entry["runs"]
        for ax, key in zip(axes, ("val", "L_lower"), strict=True):
            epochs = np.array([r["epoch"] for r in runs[0]["curve"]])
            values = np.array([[np.nan if r[key] is None else r[key] for r in run["curve"]]
                               for run in runs], dtype=float)
            for row in values:
                ax.plot(epochs, row, color=colour, lw=0.6, alpha=0.45)
            mean = np.nanmean(values, axis=0)
            ax.plot(epochs, mean, color=colour, lw=2, ls=dashes[i % len(dashes)],
                    label=f"{method} (mean of {len(runs)})")
            if len(runs) > 1:
                sd = np.nanstd(values, axis=0, ddof=1)
                ax.fill_between(epochs, mean - sd, mean + sd, color=colour, alpha=0.15, lw=0)
            change = _stage_change(runs)
            if change is not None:
                ax.axvline(change + 0.5, color=colour, ls=":", lw=1)
    axes[0].set(title="validation mean Dice (NCR, ED, ET)", xlabel="epoch", ylabel="Dice")
    axes[1].set(title="follower's training loss L_lower", xlabel="epoch", ylabel="loss")
    axes[0].legend(fontsize=8, loc="lower right")
    return fig


def summary_markdown(report: Mapping[str, Any]) -> str:
    """Two Markdown tables (narrow enough for a book page): per method the seconds per run and
    the validation Dice at each quarter of training (mean ± sd over seeds) with the plateau
    test and the number of seeds whose validation Dice still rose over the last quarter; then,
    for the methods with a stage change, its two targets (:func:`rollout_targets`) and whether
    each is met: the ratio's verdict "not judged" where the ratios' basis is mixed, and marked
    "(logged)" where no run logged the same-slice reference; the drop's "not judged" with one
    seed (no seed sd).

    The plateau cell reads "yes" (a change within the seed sd), "no" (beyond it), or "not
    yet" when the change is within the sd but every seed still rose: the seeds then differ
    more than the last quarter moves them, yet training has not stopped gaining."""
    lines = ["| method | s per run | val. Dice at 1/4 | 1/2 | 3/4 | end | change over the last "
             "1/4 (sd at end) | plateau; seeds still rising |",
             "|---|---|---|---|---|---|---|---|"]
    stage = ["| method | L_lower ratio at the stage change, same slices (logged), per seed "
             "| largest val. drop in the rollout (last warm-up val. − lowest rollout val.; "
             "below 0: never below the warm-up), per seed (seed sd) | targets: ratio ≤ 1.15; "
             "every drop ≤ seed sd |", "|---|---|---|---|"]
    met = {True: "met", False: "missed", None: "not judged"}
    for method, entry in report["methods"].items():
        curves = [run["curve"] for run in entry["runs"]]
        vals = _vals(curves)
        n = vals.shape[1]
        cells = []
        for q in (n // 4, n // 2, 3 * n // 4, n):
            col = vals[:, q - 1]
            col = col[~np.isnan(col)]
            cells.append(format_mean_sd(mean_sd(col)) if len(col) else "–")
        p = plateau(curves)
        rising = sum(change > 0 for change in p["change_per_seed"])
        verdict = {True: "yes", False: "no", None: "– (one seed)"}[p["plateau"]]
        if p["plateau"] and rising == len(curves):
            verdict = "not yet"
        secs = np.mean([run["seconds"] for run in entry["runs"]])
        lines.append(
            f"| `{method}` | {secs:.0f} | " + " | ".join(cells)
            + f" | {format_signed(p['change_mean'])}, epochs {p['from_epoch']}→{p['to_epoch']} "
            f"({p['sd_end']:.3f}) | {verdict}; {rising} of {len(curves)} |"
        )
        t = rollout_targets(curves)
        if t is not None:
            ratio = ", ".join(
                f"{r:.2f} ({g:.2f})" if same else f"– ({g:.2f})"
                for r, g, same in zip(t["loss_ratio"], t["loss_ratio_logged"],
                                      t["same_slices"], strict=True))
            drop = ", ".join(format_signed(d) for d in t["drop"]) + f" ({t['sd_warm']:.3f})"
            basis = " (logged)" if t["loss_basis"] == "logged L_lower" else ""
            stage.append(f"| `{method}` | {ratio} | {drop} | {met[t['loss_ok']]}{basis}; "
                         f"{met[t['drop_ok']]} |")
    if len(stage) > 2:
        lines += ["", *stage]
    return "\n".join(lines)


def same_seed_markdown(report: Mapping[str, Any], method: str,
                       run_dirs: Mapping[int, str | Path]) -> str | None:
    """Runs of ``method`` trained elsewhere (a chapter's, ``{seed: run folder}``) beside the
    same seeds' curves in ``report``: the validation mean Dice at the last warm-up validation
    and at the last validation of each run, at the same epochs of the curve, with each side's
    torch thread count (``run.json``), and the seed sd of the curves there.

    The two sides share config, data and seed but may differ in thread count or machine, so
    the gap shows how far those alone move a run. ``None`` when no seed or epoch is shared.
    """
    from fuse4seg.train.runs import read_metrics, read_run_json

    entry = report.get("methods", {}).get(method)
    if not entry:
        return None
    by_seed = {r["seed"]: r for r in entry["runs"]}
    vals = _vals([r["curve"] for r in entry["runs"]])
    rows = []
    for seed, run_dir in sorted(run_dirs.items()):
        if seed not in by_seed:
            continue
        logged = [r for r in read_metrics(Path(run_dir)) if "val" in r]
        warm = [r for r in logged if r.get("stage") == "warmup"]
        picks = ([("end of warm-up", warm[-1])] if warm else []) + (
            [("end", logged[-1])] if logged else [])
        theirs = {r["epoch"]: r["val"] for r in by_seed[seed]["curve"]}
        threads = read_run_json(Path(run_dir)).get("threads", "?")
        for label, row in picks:
            epoch = row["epoch"]
            if theirs.get(epoch) is None:
                continue
            ours = row["val"]["mean_dice"]
            column = vals[:, epoch - 1]
            sd = float(np.std(column, ddof=1)) if len(column) > 1 else float("nan")
            rows.append(f"| {seed} | {label} (epoch {epoch}) | {ours:.3f} ({threads}) | "
                        f"{theirs[epoch]:.3f} ({by_seed[seed].get('threads', '?')}) | "
                        f"{format_signed(ours - theirs[epoch])} | {sd:.3f} |")
    if not rows:
        return None
    return ("| seed | validation | this run (torch threads) | the curve (torch threads) | "
            "difference | seed sd of the curves |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows))
