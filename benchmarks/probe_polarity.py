"""Measurement behind ``model.source_skip`` (chapter 2): the polarity of x_f under the physical
losses, with and without the decoder's skip on the anchor (x1 + x2)/2.

    python benchmarks/probe_polarity.py [--data DIR] [--steps 60] [--profile default]

Trains a fresh leader (the profile's variant) for ``--steps`` AdamW steps (lr 1e-3, batch 8) on
α·L_decomp + β·L_grad + γ·L_recon alone, on the training slices of the phantom (12 cases, seed 0,
made in a temporary folder unless ``--data`` is given), once per setting, and prints the Pearson
correlation of x_f with x_avg on each batch. A negative value is a contrast-inverted x_f.
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


def run(cache: Path, config, source_skip: bool, steps: int) -> list[float]:
    torch.manual_seed(0)
    data = SliceDataset(cache, "train")
    leader = create_fusion(config.model.fusion, source_skip=source_skip)
    opt = torch.optim.AdamW(leader.parameters(), lr=1e-3, weight_decay=1e-5)
    rng = np.random.default_rng(0)
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
    args = parser.parse_args()
    config = get_config(args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from fuse4seg.data.phantom import write_phantom_dataset

            data = Path(tmp) / "phantom"
            write_phantom_dataset(data, cases=12, seed=0, progress=False)
        cache = Path(tmp) / "cache"
        prepare_cache(data, cache, config.data, progress=False)
        print(f"data: {args.data or 'phantom (12 cases, seed 0)'}; profile {args.profile}; "
              f"leader {config.model.fusion}; {args.steps} steps of the physical losses\n")
        print("| source_skip | corr(x_f, x_avg) at step 1 | at the last step |")
        print("|---|---|---|")
        for skip in (False, True):
            corr = run(cache, config, skip, args.steps)
            print(f"| {skip} | {corr[0]:+.3f} | {corr[-1]:+.3f} |")


if __name__ == "__main__":
    main()
