"""Does a speed change alter training? Whole runs with and without it, over seeds (issue 9, part 1).

    python benchmarks/equiv_train.py --data _data/phantom
        [--change grn|adamw|layout|convnext|gate|norm|attention] [--profile default]
        [--method fuse4seg] [--seeds 0 1 2] [--workdir DIR] [--threads N] [--set NAME=VALUE ...]

Issue 9 asks that a change made for speed keep training "numerically equivalent: the same loss
curve within noise over 3 seeds". Seven adopted changes compute differently from the code before
them: GRN's hand-written backward (``--change grn``; ``fuse4seg.models.segmentation.
_GRNFunction``, commit 25bd028: the same values as the formula to float rounding, but summed in
another order), the fused AdamW on a CPU (``--change adamw``;
:func:`fuse4seg.train.engine.adamw`: the same update, rounded differently in the last bit of
some weights), the leader's channels-last weights on a CPU (``--change layout``;
:func:`fuse4seg.models.place_leader`: the same convolutions through oneDNN's channels-last
kernels, which sum in another order), and the follower's ConvNeXt blocks on a CPU
(``--change convnext``; ``ConvNeXtBlock``: GRN folded into pw2 and the depthwise gradients as
forward convolutions, the same maths in another order), the leader's gate copied dense before
GELU on a CPU (``--change gate``; ``GatedFeedForward``: GELU's vectorised kernel rounds
differently), GRN's norm in the folded MLP as a sum of squares (``--change norm``;
``segmentation._pixel_norm`` in place of ``torch.linalg.vector_norm``) and the leader's
attention with a hand-written backward on a CPU (``--change attention``;
``fusion._ChannelAttention``: the normalisation moved onto the Gram matrix, the same maths
in another order). (The allocator setting,
:func:`fuse4seg.train.engine.tune_malloc`, computes nothing: ``bench_malloc.py --train``
shows the same logged losses with and without it.)

For each seed this trains ``--method`` twice with the profile, one run after the other in this
process, on the same data: ``shipped`` (what the package runs) and the code before the change:
``formula`` (GRN as :func:`~fuse4seg.models.segmentation.grn_formula`, differentiated by
autograd), ``loop`` (torch's default AdamW, ``FUSE4SEG_ADAMW=loop``), ``nchw`` (the leader's
weights in NCHW, ``FUSE4SEG_LEADER_LAYOUT=nchw``) or ``autograd`` (the blocks as written,
``FUSE4SEG_CONVNEXT=autograd``), ``strided`` (``FUSE4SEG_GATE=strided``), ``vector_norm``
(``FUSE4SEG_GRN_NORM=vector_norm``), and for ``--change attention`` ``autograd`` again (the
attention per head, differentiated by autograd: ``FUSE4SEG_ATTENTION=autograd``).
CPU runs are bit-for-bit repeatable for a seed, so the only
difference between the two runs of a seed is the change's rounding, which training then
amplifies.
Printed, per seed: the gap between its two runs, as the root mean square over the epochs of
the difference of the epoch means of L_lower (the follower's loss) and of the validation mean
Dice (at the validated epochs), and as the largest difference; and the final validation Dice
of both. Then the noise they are compared with: the same root mean square difference between
the ``shipped`` runs of two different seeds, for each pair of seeds. Float rounding is
amplified by training until the two runs of a seed drift apart like two draws, so their gap
is not zero; "the same curve within noise" means the gaps within a seed are smaller than the
differences between seeds, and the last line says whether every one is.

Not a timing benchmark (the runs' times are printed but the two variants share the machine in
turn, not in alternation).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import sys
import tempfile
from pathlib import Path

from fuse4seg.utils import env_switches


@contextlib.contextmanager
def _env_switch(name: str, before: str, variant: str):
    """The code as shipped (``name`` unset), or as before the change (``name=before``, when
    ``variant == before``), for the runs built inside; the environment as it was, on exit."""
    with env_switches({name: before if variant == before else ""}):
        yield


def adamw(variant: str):
    """AdamW as shipped (fused on a CPU), or torch's default loop (``FUSE4SEG_ADAMW=loop``,
    which :func:`fuse4seg.train.engine.adamw` reads when a run builds its optimisers)."""
    return _env_switch("FUSE4SEG_ADAMW", "loop", variant)


def layout(variant: str):
    """The leader's weights channels-last on a CPU as shipped, or NCHW
    (``FUSE4SEG_LEADER_LAYOUT=nchw``, which :func:`fuse4seg.models.place_leader` reads when a
    run builds its leader)."""
    return _env_switch("FUSE4SEG_LEADER_LAYOUT", "nchw", variant)


def convnext(variant: str):
    """The follower's ConvNeXt blocks as shipped (on a CPU: GRN folded into pw2, the depthwise
    gradients as forward convolutions), or as written and differentiated by autograd
    (``FUSE4SEG_CONVNEXT=autograd``, which the blocks read at each call)."""
    return _env_switch("FUSE4SEG_CONVNEXT", "autograd", variant)


def gate(variant: str):
    """The leader's gate copied dense before GELU on a CPU as shipped, or GELU on the strided
    half (``FUSE4SEG_GATE=strided``, which ``GatedFeedForward`` reads at each call)."""
    return _env_switch("FUSE4SEG_GATE", "strided", variant)


def norm(variant: str):
    """GRN's ‖a‖ in the folded MLP as a sum of squares as shipped, or as
    ``torch.linalg.vector_norm`` (``FUSE4SEG_GRN_NORM=vector_norm``, read at each call)."""
    return _env_switch("FUSE4SEG_GRN_NORM", "vector_norm", variant)


def attention(variant: str):
    """The leader's attention as shipped (on a CPU, ``fusion._ChannelAttention``), or per
    head as autograd differentiates it (``FUSE4SEG_ATTENTION=autograd``, which
    ``TransposedAttention`` reads at each call)."""
    return _env_switch("FUSE4SEG_ATTENTION", "autograd", variant)


@contextlib.contextmanager
def grn(variant: str):
    """GRN as shipped, or as the formula differentiated by autograd (``formula``). Both with
    the blocks as written (``FUSE4SEG_CONVNEXT=autograd``): on a CPU the shipped block folds
    GRN into pw2 and calls neither."""
    from fuse4seg.models import segmentation

    with env_switches({"FUSE4SEG_CONVNEXT": "autograd"}):
        if variant == "shipped":
            yield
            return
        shipped = segmentation.GRN.forward

        def formula(self, x):
            return segmentation.grn_formula(x, self.gamma, self.beta, self.eps)

        segmentation.GRN.forward = formula
        try:
            yield
        finally:
            segmentation.GRN.forward = shipped


CHANGES = {
    "grn": (grn, ("shipped", "formula")),
    "adamw": (adamw, ("shipped", "loop")),
    "layout": (layout, ("shipped", "nchw")),
    "convnext": (convnext, ("shipped", "autograd")),
    "gate": (gate, ("shipped", "strided")),
    "norm": (norm, ("shipped", "vector_norm")),
    "attention": (attention, ("shipped", "autograd")),
}
"""Per change: the switch, and its two variants (what ships, then the code before it)."""


def series(curve: list[dict], key: str) -> list[float | None]:
    return [row[key] for row in curve]


def gaps(a: list[float | None], b: list[float | None]) -> tuple[float, float]:
    """Root mean square and largest absolute difference where both curves have a value."""
    diffs = [x - y for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not diffs:
        return float("nan"), float("nan")
    return math.sqrt(sum(d * d for d in diffs) / len(diffs)), max(abs(d) for d in diffs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True,
                        help="a raw BraTS/phantom folder or a prepared slice cache")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--method", default="fuse4seg")
    parser.add_argument("--change", choices=sorted(CHANGES), default="grn",
                        help="the change to compare with the code before it (grn, adamw, "
                             "layout, convnext, gate, norm: see above)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], help="NAME=VALUE overrides")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the slice cache and the runs here (default: a temporary "
                             "folder; finished runs in it are reused)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("--seeds: at least 2, to compare with the differences between seeds")
    data = Path(args.data)
    if not data.is_dir():
        parser.error(f"--data {data}: no such folder")
    import torch

    from fuse4seg.config import get_config, parse_overrides
    from fuse4seg.curves import curve
    from fuse4seg.train.runs import resolve_cache
    from fuse4seg.train.trainer import train
    from fuse4seg.utils import git_commit

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    switch, variants = CHANGES[args.change]
    print(f"# equiv_train: change {args.change} ({' vs '.join(variants)}), {args.method}, "
          f"profile {args.profile} {args.set}, data {data}, "
          f"seeds {args.seeds}, commit {git_commit()}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores", flush=True)
    curves: dict[str, list[list[dict]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        # one cache for every run; a kept --workdir's follows --profile, --set and --data
        cache = data if (data / "manifest.json").exists() else resolve_cache(
            data, get_config(args.profile, overrides), cache=work / "cache", progress=False,
            replace_other=True)
        for seed in args.seeds:
            cfg = get_config(args.profile, {**overrides, "train.seed": seed})
            for variant in variants:
                with switch(variant):
                    result = train(cfg, args.method, data=cache, out=work / args.change / variant,
                                   progress=False, device="cpu", resume=True,
                                   restart_if_code_changed=True)
                c = curve(result.run_dir)
                curves[variant].append(c)
                last_val = next(r["val"] for r in reversed(c) if r["val"] is not None)
                print(f"seed {seed} {variant}: {len(c)} epochs, {c[-1]['elapsed_s']:.0f} s, "
                      f"final val {last_val:.4f}", flush=True)

    keys = (("L_lower", "L_lower"), ("val", "validation Dice"))
    print("\n| seed | L_lower gap, RMS / largest | validation Dice gap, RMS / largest "
          f"| final validation Dice, {' / '.join(variants)} |")
    print("|---:|---|---|---|")
    within: dict[str, list[float]] = {key: [] for key, _ in keys}
    for i, seed in enumerate(args.seeds):
        a, b = curves[variants[0]][i], curves[variants[1]][i]
        cells = []
        for key, _ in keys:
            rms, largest = gaps(series(a, key), series(b, key))
            within[key].append(rms)
            cells.append(f"{rms:.4f} / {largest:.4f}")
        va = [v for v in series(a, "val") if v is not None][-1]
        vb = [v for v in series(b, "val") if v is not None][-1]
        print(f"| {seed} | {cells[0]} | {cells[1]} | {va:.4f} / {vb:.4f} |")
    pairs = list(itertools.combinations(range(len(args.seeds)), 2))
    print("\nnoise: RMS difference between the shipped runs of two seeds, per pair "
          f"({', '.join(f'{args.seeds[i]}-{args.seeds[j]}' for i, j in pairs)})")
    verdict = []
    for key, label in keys:
        across = [gaps(series(curves["shipped"][i], key), series(curves["shipped"][j], key))[0]
                  for i, j in pairs]
        print(f"  {label}: {', '.join(f'{x:.4f}' for x in across)}")
        below = max(within[key]) < min(across)
        verdict.append(f"{label} {'yes' if below else 'no'} (largest within a seed "
                       f"{max(within[key]):.4f}, smallest between seeds {min(across):.4f})")
    print("every gap within a seed below every difference between seeds: " + "; ".join(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
