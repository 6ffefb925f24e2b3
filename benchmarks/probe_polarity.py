"""Measurement behind ``model.source_skip`` (chapter 2): the polarity of x_f under the physical
losses, with and without the decoder's skip on the anchor (x1 + x2)/2.

    python benchmarks/probe_polarity.py [--data DIR] [--steps 60] [--profile default]
        [--fusion NAME] [--seeds 0 1 2 3 4]

Trains a fresh leader (the profile's variant, or ``--fusion``) for ``--steps`` AdamW steps
(lr 1e-3, batch 8) on α·L_decomp + β·L_grad + γ·L_recon alone, on the training slices of the
phantom (12 cases, seed 0, made in a temporary folder unless ``--data`` is given), once per
setting and seed (the seed draws the initial weights and the batches), and prints the Pearson
correlation of x_f with x_avg on the first and the last batch. A negative value is a
contrast-inverted x_f. The leader is built as :func:`fuse4seg.models.create_fusion` builds it,
so ``model.anchor_range`` is off here: the probe compares the decoder with and without its skip
alone.
Not a timing benchmark: an experiment whose printed numbers the docs quote.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from fuse4seg.config import get_config
from fuse4seg.data.slices import SliceDataset, prepare_cache
from fuse4seg.losses import physical_loss
from fuse4seg.models import create_fusion


def run(cache: Path, config, fusion: str, source_skip: bool, steps: int,
        seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    data = SliceDataset(cache, "train")
    leader = create_fusion(fusion, source_skip=source_skip)
    opt = torch.optim.AdamW(leader.parameters(), lr=1e-3, weight_decay=1e-5)
    rng = np.random.default_rng(seed)
    corr = []
    for _ in range(steps):
        idx = rng.choice(len(data), 8, replace=False)
        x1 = torch.stack([data[int(i)]["x1"] for i in idx])
        x2 = torch.stack([data[int(i)]["x2"] for i in idx])
        x_fused, feats = leader(x1, x2)
        loss, _ = physical_loss(x_fused, x1, x2, feats, config.loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        avg = (x1 + x2) / 2
        corr.append(float(np.corrcoef(x_fused.detach().flatten(), avg.flatten())[0, 1]))
    return corr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="BraTS-layout folder (default: a phantom)")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--fusion", help="leader variant (default: the profile's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    config = get_config(args.profile)
    fusion = args.fusion or config.model.fusion
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from fuse4seg.data.phantom import write_phantom_dataset

            data = Path(tmp) / "phantom"
            write_phantom_dataset(data, cases=12, seed=0, progress=False)
        cache = Path(tmp) / "cache"
        prepare_cache(data, cache, config.data, progress=False)
        print(f"data: {args.data or 'phantom (12 cases, seed 0)'}; profile {args.profile}; "
              f"leader {fusion}; {args.steps} steps of the physical losses\n")
        print("| source_skip | seed | corr(x_f, x_avg) at step 1 | at the last step |")
        print("|---|---:|---:|---:|")
        for skip in (False, True):
            for seed in args.seeds:
                corr = run(cache, config, fusion, skip, args.steps, seed)
                print(f"| {skip} | {seed} | {corr[0]:+.3f} | {corr[-1]:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
