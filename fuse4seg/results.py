"""The paper's comparisons from run folders: Tables 1 and 3, per-case scores, paired intervals.

Chapter 6 (``book/06_results.md``) calls these functions; nothing in it is typed by hand:

- :func:`collect` trains (or reuses) every method of Table 1 and every variant of Table 3 once
  per seed with :func:`fuse4seg.study.train_seeds`, and scores each on the test split (kept in
  the run folder, :func:`fuse4seg.study.evaluate_cached`);
- :func:`summary_rows` reduces the seeds of each method to mean ± sd of NCR, ED, ET and mean
  Dice and IoU; :func:`table1_markdown` and :func:`table3_markdown` lay those rows out in the
  paper's order with the paper's numbers beside them, labelled "the paper reports";
- :func:`per_case_markdown` gives the per-test-case mean Dice the paired intervals are built
  from, and :func:`compare` the paired differences (:func:`fuse4seg.study.paired_difference`);
- Figures 3 and 4 are drawn from the same run folders by :mod:`fuse4seg.figures`.

Choices: the spread over seeds is the sample standard deviation (``ddof=1``) and is not shown
for one seed (one run has no spread); a method's Table 1 "mean" is the paper's Mean Dice / IoU,
the mean over NCR, ED and ET of the per-case means
(:func:`~fuse4seg.metrics.segmentation.tumour_mean`); Table 3's ``full`` variant is the
``fuse4seg`` method itself (same config, same run folder), so it is reused, never trained twice.

Explained in chapter 6 (``book/06_results.md``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fuse4seg.formatting import format_mean_sd, format_signed
from fuse4seg.paper import TABLE1, TABLE3
from fuse4seg.study import SeedResult, case_scores, paired_difference
from fuse4seg.train.methods import ABLATIONS, METHODS, SPECS

__all__ = [
    "FAMILIES",
    "PAPER_FAMILIES",
    "REGIONS",
    "TABLE1_ORDER",
    "checkpoint_stamps",
    "collect",
    "compare",
    "comparison_markdown",
    "drift_note",
    "mean_sd",
    "per_case_markdown",
    "per_case_table",
    "run_ids",
    "runs_markdown",
    "scale_note",
    "seed_scores",
    "shared_cache",
    "summary_rows",
    "table1_markdown",
    "table3_markdown",
    "thread_note",
    "warmup_end_dice",
]

REGIONS = ("NCR", "ED", "ET", "mean")
"""Table 1 and 3 columns: the three tumour classes and their mean."""

TABLE1_ORDER = ("average", "max", "disjoint_ae", "direct2ch", "monai_unet", "fuse4seg")
"""Our methods in the paper's order of families (fusion + segmentation pipelines, direct
multi-channel segmentation, the proposed method)."""

FAMILIES = {
    "average": "fixed-rule fusion + seg.",
    "max": "fixed-rule fusion + seg.",
    "disjoint_ae": "disjoint fusion + seg.",
    "direct2ch": "direct multi-channel",
    "monai_unet": "direct multi-channel",
    "fuse4seg": "bi-level (proposed)",
}
"""Which family of Table 1 each method belongs to (the paper has no fixed-rule row)."""

PAPER_FAMILIES = {
    **{name: "disjoint fusion + seg." for name in list(TABLE1)[:6]},
    **{name: "direct multi-channel" for name in list(TABLE1)[6:10]},
    "Fuse4Seg": "bi-level (proposed)",
}
"""The family of each row of the paper's Table 1 (its italic section headings)."""


def shared_cache(cache_dir: str | Path, profile: str) -> Path:
    """The prepared slice cache chapters 4 and 6 share: ``CACHE_DIR/ch04-<profile>``.

    A run folder's name hashes the cache's manifest, so chapter 6 finds chapter 4's runs only
    when it trains on the same cache; both chapters call this function.
    """
    return Path(cache_dir) / f"ch04-{profile}"


PAPER_SCALE_CASES = 1000
"""Fewer cases than this (BraTS 2021 has 1,251 training cases) and a run is a small-scale
check, whatever its profile."""


def scale_note(data_label: str, n_cases: int, profile: str) -> str:
    """One plain sentence on what data and scale the chapter ran on and what that supports.

    Args:
        data_label: :func:`fuse4seg.book.data_label` of the data.
        n_cases: the number of cases in the prepared cache.
        profile: the config profile.
    """
    if "phantom" in data_label:
        return (
            f"These numbers come from the synthetic {data_label} with the `{profile}` profile: "
            "they show that every method, table and figure runs end to end, and they rank the "
            "methods on this phantom at this profile only; they do not reproduce the paper's "
            "BraTS 2021 result."
        )
    if profile != "paper" or n_cases < PAPER_SCALE_CASES:
        return (
            f"These numbers come from {data_label} with the `{profile}` profile: a small run, "
            "far from the paper's BraTS 2021 experiment (1,251 cases, the `paper` profile), so "
            "it does not reproduce the paper's result."
        )
    return (
        f"These numbers come from {data_label} with the `paper` profile, the scale of the "
        "paper's BraTS 2021 experiment; the seeds and intervals below say how far they carry."
    )


# --------------------------------------------------------------------------------------------
# Training and scoring
# --------------------------------------------------------------------------------------------


def collect(
    config,
    data: str | Path,
    runs_dir: str | Path,
    methods: Sequence[str] = METHODS,
    ablations: Sequence[str] = tuple(ABLATIONS),
    seeds: Sequence[int] = (0,),
    device: str | None = None,
    on_start=None,
    workers: int = 1,
) -> tuple[dict[str, list[SeedResult]], dict[str, list[SeedResult]]]:
    """Train (or reuse) and score every method and ablation variant over ``seeds``.

    Args:
        config: the resolved config (chapter 4's: the same config finds the same run folders).
        data: the prepared cache (or raw folder) the runs train on.
        runs_dir: the runs folder.
        methods: Table 1 methods (:data:`fuse4seg.train.methods.METHODS`).
        ablations: Table 3 variants (:data:`fuse4seg.train.methods.ABLATIONS`); a variant
            without loss switches on a method already in ``methods`` (``full`` = ``fuse4seg``)
            reuses that method's results.
        seeds: ``train.seed`` values.
        device: passed to the trainer (``None`` = the config's).
        on_start: called with ``(name, seeds)`` before each method or variant (a progress line).
        workers: runs trained at a time (:func:`fuse4seg.study.train_parallel`: on a CPU, one
            process per worker with ``cores // workers`` threads; 1 = one after the other in
            this process).

    Returns:
        ``(by_method, by_ablation)``: ``{name: [SeedResult per seed]}`` in the order given.

    Raises:
        ValueError: an unknown method or variant (the message lists the valid ones), or
            seeds that are empty or repeat.
    """
    from fuse4seg.study import check_seeds, train_parallel
    from fuse4seg.train.methods import get_ablation, get_method

    for m in methods:
        get_method(m)
    for a in ablations:
        get_ablation(a)
    seeds = check_seeds(seeds)
    common = {"config": config, "data": data, "out": runs_dir, "device": device}

    def trained(names: list[tuple[str, str, str | None]]) -> dict[str, list[SeedResult]]:
        # (row name, method, ablation) -> {row name: [SeedResult per seed]}, in parallel
        for name, _, _ in names:
            if on_start:
                on_start(name, seeds)
        jobs = [{**common, "method": m, "ablation": a, "seed": s}
                for _, m, a in names for s in seeds]
        done = iter(train_parallel(jobs, workers))
        return {name: [next(done) for _ in seeds] for name, _, _ in names}

    by_method = trained([(m, m, None) for m in methods])
    # Table 3's A and B continue from the fuse4seg run's warm-up (train(): warmup.pt), so the
    # variants start once every method is done
    by_ablation: dict[str, list[SeedResult]] = {}
    todo = []
    for a in ablations:
        variant = ABLATIONS[a]
        if not variant.overrides and variant.method in by_method:
            by_ablation[a] = [
                dataclasses.replace(r, method=f"ablation {a}") for r in by_method[variant.method]
            ]
        else:
            todo.append((f"ablation {a}", variant.method, a))
            by_ablation[a] = []  # keeps the order given
    for name, results in trained(todo).items():
        by_ablation[name.removeprefix("ablation ")] = results
    return by_method, by_ablation


def seed_scores(result: SeedResult) -> dict[str, tuple[float, float]]:
    """``{region: (Dice, IoU)}`` of one seed's test evaluation, for NCR, ED, ET and the mean.

    Raises:
        ValueError: the seed has no test evaluation (a split without test cases).
    """
    if not result.test:
        raise ValueError(f"{result.method}, seed {result.seed}: no test evaluation")
    mean = result.test["mean"]
    scores = {r: (float(mean[r]["dice"]), float(mean[r]["iou"])) for r in REGIONS[:3]}
    scores["mean"] = (float(result.test["mean_dice"]), float(result.test["mean_iou"]))
    return scores


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``ddof=1``); the sd is ``None`` for one value.

    Raises:
        ValueError: no values.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("mean_sd: no values")
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


def summary_rows(
    results: Mapping[str, Sequence[SeedResult]], order: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """One row per method: mean ± sd over seeds of each region's test Dice and IoU.

    Args:
        results: ``{name: [SeedResult per seed]}`` (:func:`collect`).
        order: the names in the order wanted (default: ``results``' order); names not in
            ``results`` are skipped.

    Returns:
        ``[{"name", "seeds", "runs", "NCR_dice": (mean, sd), "NCR_iou": ..., ...,``
        ``"mean_dice", "mean_iou"}]``; ``sd`` is ``None`` for a single seed.

    Raises:
        ValueError: a method with no seeds or a seed without a test evaluation.
    """
    names = [n for n in (order or list(results)) if n in results]
    rows = []
    for name in names:
        seeds = list(results[name])
        if not seeds:
            raise ValueError(f"{name}: no seeds")
        per_seed = [seed_scores(r) for r in seeds]
        row: dict[str, Any] = {
            "name": name,
            "seeds": [r.seed for r in seeds],
            "runs": [r.run_dir.name for r in seeds],
        }
        for region in REGIONS:
            for i, key in enumerate(("dice", "iou")):
                row[f"{region}_{key}"] = mean_sd([s[region][i] for s in per_seed])
        rows.append(row)
    return rows


def run_ids(results: Mapping[str, Sequence[SeedResult]]) -> str:
    """``"name: run, run; name: run"`` for a caption."""
    return "; ".join(
        f"{name}: {', '.join(f'`{r.run_dir.name}`' for r in seeds)}"
        for name, seeds in results.items()
    )


def thread_note(groups: Sequence[Mapping[str, Sequence[SeedResult]]]) -> str:
    """One sentence on what the runs of ``groups`` trained on, from each ``run.json``: the
    number of torch threads of a CPU run, or its GPU.

    A run's numbers depend on its thread count (the float sums split differently, and every
    later update builds on the difference), so two rows whose runs trained on different counts
    differ by that too, which the seeds' spread covers only as far as it acts like another
    seed. The sentence says whether that applies to the rows it stands under; chapters 4 and 6
    train every run through :func:`fuse4seg.book.chapter_workers`, so it should not.
    """
    from fuse4seg.train.runs import read_run_json

    kinds: dict[str, list[str]] = {}
    seen: set[Path] = set()
    for group in groups:
        for name, results in group.items():
            for r in results:
                if r.run_dir in seen:  # Table 3's full is the fuse4seg run
                    continue
                seen.add(r.run_dir)
                info = read_run_json(r.run_dir)
                threads = info.get("threads")
                # "gpu" names the machine's GPU even for a CPU run; "device" is the run's own
                # (run.json before it was recorded: a GPU where the machine had one)
                device = info.get("device") or ("cuda" if info.get("gpu") else "cpu")
                if device.startswith("cuda"):
                    kind = f"a GPU ({info.get('gpu') or device})"
                elif threads:
                    kind = f"{threads} torch thread{'s' if threads != 1 else ''}"
                else:
                    kind = "an unrecorded thread count"
                kinds.setdefault(kind, []).append(f"`{name}` {r.seed}")
    if not kinds:
        return ""
    if len(kinds) == 1:
        return (f"Every run here trained on {next(iter(kinds))}, so no difference between "
                "rows comes from a different thread count.")
    listed = "; ".join(f"on {kind}: {', '.join(runs)}" for kind, runs in kinds.items())
    return ("**The runs here did not all train alike** (method and seed): " + listed
            + ". A difference between rows of two groups includes that of the thread count, "
            "which the seeds' spread, and so the intervals, cover only as far as it acts like "
            "another seed; retrain them alike (`workers`) to remove it.")


def drift_note(drifts: Sequence[Mapping[str, Any] | None], method: str = "fuse4seg") -> str:
    """What a comparison of ``method``'s bi-level runs with ``average`` can show, given how far
    their leaders moved x_f from x_avg (:func:`fuse4seg.train.validation.leader_drift` of each
    seed's run; ``None`` entries, runs without a leader, are left out).

    It states the EMA leader's and the live leader's mean ``|x_f − x_avg|`` (means over seeds)
    beside the ``max`` rule's, another fixed fusion, for scale. When the EMA leader, which
    the test scores use, moved x_f less than a tenth of the way the ``max`` rule lies from
    x_avg, the followers compared read nearly the same image, and the sentence says that
    the comparison cannot show what a leader that reshapes x_f does (§4.3): at that scale an
    equal score is the expected outcome, not evidence about the bi-level idea.
    """
    drifts = [d for d in drifts if d]
    if not drifts:
        return ""

    def mean(leader: str) -> float:
        return float(np.mean([next(r["from_x_avg"] for r in d["rows"] if r["leader"] == leader)
                              for d in drifts]))

    ema, live = mean("EMA"), mean("live")
    scale = float(np.mean([d["max_from_x_avg"] for d in drifts]))
    share = ema / scale if scale > 0 else float("inf")
    runs = f"over {len(drifts)} runs" if len(drifts) > 1 else "in this run"
    text = (f"Mean |x_f − x_avg| {runs}: {ema:.4f} for the EMA leader (which validation and "
            f"the test scores use), {live:.4f} for the live leader; the `max` rule's image "
            f"lies {scale:.4f} from x_avg, so the EMA leader moved x_f {share:.0%} of that "
            "distance.")
    if share < 0.1:
        text += (" **At this scale the leader has barely moved x_f**: a comparison of "
                 f"`{method}` with `average` compares followers that read nearly the same image, "
                 "so it cannot show what a leader that reshapes x_f does (the paper's §4.3), "
                 "and equal scores are the expected outcome, not evidence about the bi-level "
                 "idea.")
    return text


def checkpoint_stamps(runs_dir: str | Path) -> dict[str, int]:
    """``{run folder name: mtime (ns) of checkpoints/last.pt}`` of a runs folder; compared
    before and after :func:`collect`, it tells the runs trained now from the runs reused."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return {}
    return {
        p.parent.parent.name: p.stat().st_mtime_ns
        for p in runs_dir.glob("*/checkpoints/last.pt")
    }


def runs_markdown(
    groups: Sequence[Mapping[str, Sequence[SeedResult]]],
    before: Mapping[str, int],
    after: Mapping[str, int],
) -> tuple[str, dict[str, Any]]:
    """The run folders behind the tables: one row per distinct folder, with its epochs, its
    recorded training time (``elapsed_s`` of the last ``metrics.jsonl`` row; for a run that
    continued another run's warm-up, ``run.json``'s ``warmup_from``, its own part, with the
    shared warm-up's time and the row it came from named apart and left out of the totals)
    and whether this call trained it (its ``last.pt`` is new or changed between ``before``
    and ``after``, :func:`checkpoint_stamps`) or reused it.

    Returns:
        ``(markdown, {"runs", "trained", "seconds", "trained_seconds"})``.
    """
    from fuse4seg.train.runs import read_metrics, read_run_json

    lines = ["| method / variant | seed | run | epochs | training time | this build |",
             "|---|---|---|---|---|---|"]
    seen: dict[Path, str] = {}
    totals = {"runs": 0, "trained": 0, "seconds": 0.0, "trained_seconds": 0.0}
    for group in groups:
        for name, seeds in group.items():
            for r in seeds:
                if r.run_dir in seen:
                    lines.append(f"| {name} | {r.seed} | `{r.run_dir.name}` | | | same run "
                                 f"as {seen[r.run_dir]} |")
                    continue
                seen[r.run_dir] = name
                rows = read_metrics(r.run_dir)
                elapsed = float(rows[-1].get("elapsed_s", 0.0)) if rows else 0.0
                # a run that continued another's warm-up (Table 3's A, B) carries its clock
                donor = read_run_json(r.run_dir).get("warmup_from")
                warm = [row for row in rows if row.get("stage") == "warmup"]
                shared = float(warm[-1].get("elapsed_s", 0.0)) if donor and warm else 0.0
                own = elapsed - shared
                key = r.run_dir.name
                trained = key in after and before.get(key) != after[key]
                totals["runs"] += 1
                totals["seconds"] += own
                if trained:
                    totals["trained"] += 1
                    totals["trained_seconds"] += own
                # the donor by its row's name: a folder name here would widen the column
                # past the page (it does not wrap) and hide the last one
                giver = next((n for d, n in seen.items() if d.name == donor), f"`{donor}`")
                time_cell = (f"{own:.0f} s (+ {shared:.0f} s: {giver}'s warm-up)"
                             if shared else f"{elapsed:.0f} s")
                lines.append(f"| {name} | {r.seed} | `{key}` | {len(rows)} | {time_cell} | "
                             f"{'trained' if trained else 'reused'} |")
    return "\n".join(lines), totals


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

_HEAD = "| NCR Dice | NCR IoU | ED Dice | ED IoU | ET Dice | ET IoU | mean Dice | mean IoU |"
_RULE = "---|" * 8


def _cells(row: Mapping[str, Any]) -> str:
    return " | ".join(format_mean_sd(row[f"{r}_{k}"]) for r in REGIONS for k in ("dice", "iou"))


def _paper_cells(values: Mapping[str, tuple[float, float]]) -> str:
    return " | ".join(f"*{values[r][i]:.3f}*" for r in REGIONS for i in (0, 1))


def table1_markdown(rows: Sequence[Mapping[str, Any]], paper=TABLE1) -> str:
    """Table 1 as Markdown: our methods (:func:`summary_rows`) and the paper's rows, grouped by
    family in the paper's order (fusion + segmentation pipelines, direct multi-channel, the
    proposed method) under a bold heading row per family, as the paper's italic headings; the
    paper's rows are in italics and labelled "the paper reports". Nine columns, so the table
    fits the book's page (the seeds and runs go in the caption)."""
    ours = {r["name"]: r for r in rows}
    lines = ["| method " + _HEAD, "|---|" + _RULE]
    families = list(dict.fromkeys([*FAMILIES.values(), *PAPER_FAMILIES.values()]))
    for family in families:
        body = [f"| **{SPECS[name].label}** (`{name}`) | {_cells(ours[name])} |"
                for name in TABLE1_ORDER if FAMILIES[name] == family and name in ours]
        body += [f"| *the paper reports: {name}* | {_paper_cells(values)} |"
                 for name, values in paper.items() if PAPER_FAMILIES.get(name) == family]
        if body:
            lines.append(f"| ***{family}*** |" + " |" * 8)
            lines += body
    return "\n".join(lines)


_COMPONENTS = {  # Table 3's ✓/✗ columns: bi-level, L_decomp, L_grad
    "baseline": ("✗", "✗", "✗"),
    "A": ("✓", "✗", "✗"),
    "B": ("✓", "✓", "✗"),
    "full": ("✓", "✓", "✓"),
}


def table3_markdown(rows: Sequence[Mapping[str, Any]], paper=TABLE3) -> str:
    """Table 3 as Markdown: each variant of ours (:func:`summary_rows` keyed by ablation name)
    followed by the paper's row for it, in the paper's order (baseline, A, B, full), labelled
    by name (the chapter's prose says what each is); the components column reads bi-level,
    L_decomp, L_grad as ✓ or ✗. Ten columns, so the table fits the book's page."""
    ours = {r["name"]: r for r in rows}
    lines = ["| variant | bi-level, L_decomp, L_grad " + _HEAD, "|---|---|" + _RULE]
    for name in ABLATIONS:
        marks = " ".join(_COMPONENTS[name])
        if name in ours:
            lines.append(f"| **{name}** | {marks} | {_cells(ours[name])} |")
        if name in paper:
            lines.append(f"| *the paper reports: {name}* | {marks} | "
                         f"{_paper_cells(paper[name])} |")
    return "\n".join(lines)


def per_case_table(
    results: Mapping[str, Sequence[SeedResult]],
) -> tuple[list[str], list[tuple[str, int, list[float]]]]:
    """Per-test-case mean Dice (over NCR, ED, ET) of every method and seed.

    Returns:
        ``(cases, [(name, seed, [score per case])])``.

    Raises:
        ValueError: a seed without test scores, or methods/seeds scored on different cases
            (the paired comparison needs the same cases everywhere).
    """
    cases: list[str] | None = None
    rows = []
    for name, seeds in results.items():
        for r in seeds:
            if not r.test:
                raise ValueError(f"{name}, seed {r.seed}: no test evaluation")
            scores = case_scores(r.test)
            if cases is None:
                cases = sorted(scores)
            elif sorted(scores) != cases:
                raise ValueError(
                    f"{name}, seed {r.seed}: scored on cases {sorted(scores)}, others on {cases}"
                )
            rows.append((name, r.seed, [scores[c] for c in cases]))
    return cases or [], rows


def _shared_prefix(ids: Sequence[str]) -> str:
    """The part up to the last ``_``/``-`` that every id of several shares (``"Phantom_"``,
    ``"BraTS2021_"``), so a narrow table can name it once; ``""`` when there is none."""
    if len(ids) < 2:
        return ""
    common = os.path.commonprefix(list(ids))
    cut = max(common.rfind("_"), common.rfind("-"))
    return common[: cut + 1] if cut >= 0 else ""


def per_case_markdown(results: Mapping[str, Sequence[SeedResult]]) -> str:
    """:func:`per_case_table` as Markdown, narrow enough for a book page: a row per test case
    (and seed, when there are several: the caption names a single one), a column per method,
    and per seed a last row with the mean over the cases."""
    cases, rows = per_case_table(results)
    names = list(dict.fromkeys(name for name, _, _ in rows))
    seeds = list(dict.fromkeys(seed for _, seed, _ in rows))
    score = {(name, seed): values for name, seed, values in rows}
    several = len(seeds) > 1

    def line(label: str, seed: int, value) -> str:
        cells = ["–" if (n, seed) not in score else value(score[(n, seed)]) for n in names]
        return f"| {label} | " + (f"{seed} | " if several else "") + " | ".join(cells) + " |"

    prefix = _shared_prefix(cases)  # "Phantom_" of Phantom_00001, ...: said once, in the header
    header = f"test case ({prefix}…)" if prefix else "test case"
    lines = [f"| {header} | " + ("seed | " if several else "")
             + " | ".join(names) + " |",
             "|---|" + ("---|" if several else "") + "---|" * len(names)]
    for seed in seeds:
        for i, case in enumerate(cases):
            lines.append(line(case[len(prefix):], seed, lambda v, i=i: f"{v[i]:.3f}"))
        lines.append(line("**mean**", seed, lambda v: f"**{np.mean(v):.3f}**"))
    return "\n".join(lines)


def compare(
    results: Mapping[str, Sequence[SeedResult]],
    reference: str = "fuse4seg",
    against: Sequence[str] = ("average", "disjoint_ae"),
    n_boot: int = 10_000,
) -> list[dict[str, Any]]:
    """Paired differences of ``reference`` against each of ``against``
    (:func:`fuse4seg.study.paired_difference`: per-case mean Dice, paired by seed and case,
    bootstrap over both, and its one-sentence verdict).

    Returns:
        ``[{"a", "b", "mean", "low", "high", ..., "verdict"}]``; a pair with a method missing
        from ``results`` is left out.

    Raises:
        ValueError: seeds or cases that differ between the two methods.
    """
    out = []
    for other in against:
        if reference not in results or other not in results:
            continue
        a = {r.seed: r.per_case for r in results[reference]}
        b = {r.seed: r.per_case for r in results[other]}
        names = (SPECS[reference].label if reference in SPECS else reference,
                 f"`{other}`")
        diff = paired_difference(a, b, n_boot=n_boot, names=names)
        out.append({"a": reference, "b": other, **diff})
    return out


def comparison_markdown(comparisons: Sequence[Mapping[str, Any]]) -> str:
    """:func:`compare`'s differences as a Markdown table, then each one's verdict as a list."""
    lines = [
        "| comparison | mean difference | 95 % interval | test cases × seeds |",
        "|---|---|---|---|",
    ]
    for c in comparisons:
        lines.append(
            f"| `{c['a']}` − `{c['b']}` | {format_signed(c['mean'])} | "
            f"[{format_signed(c['low'])}, {format_signed(c['high'])}] | "
            f"{c['n_cases']} × {c['n_seeds']} |"
        )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {c['verdict']}" for c in comparisons)


def warmup_end_dice(run_dir: str | Path) -> float | None:
    """The validation mean Dice of a run's last warm-up validation (``metrics.jsonl``), or
    ``None`` when its warm-up logged none. Runs of one seed whose warm-ups are the same
    (``fuse4seg`` and ``average``: :func:`fuse4seg.train.bilevel.init_seed`) show the same
    value, so a difference between them at the end comes from the rollout."""
    from fuse4seg.train.runs import read_metrics

    rows = [r for r in read_metrics(Path(run_dir)) if r.get("stage") == "warmup" and "val" in r]
    return float(rows[-1]["val"]["mean_dice"]) if rows else None
