"""Time filling the frozen leader's cache (``Engine.frozen_prior``) for every training slice
of a prepared cache: one slice at a time, as the engine fills it since 5bbb760 (so a resumed
run refills it bit for bit), against batches of ``train.batch_size`` (the fill before).

``python benchmarks/bench_frozen_fill.py --cache _build/cache/ch04-default`` (the default
profile's phantom cache that ``make book`` prepares); one torch thread, two rounds.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from fuse4seg.config import get_config
from fuse4seg.train.trainer import Trainer
from fuse4seg.train.validation import collate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="a prepared slice cache")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = get_config(args.profile)
    with tempfile.TemporaryDirectory() as run:
        trainer = Trainer(config, "disjoint_ae", args.cache, run, progress=False)
        engine, data, B = trainer.engine, trainer.train_set, config.train.batch_size
        n = len(data)

        def fuse(groups) -> float:
            start = time.perf_counter()
            for group in groups:
                batch = collate(data, np.asarray(group), engine.device)
                engine.prior(batch["x1"], batch["x2"], "warmup", ema=False)
            return time.perf_counter() - start

        for _ in range(args.rounds):
            alone = fuse([[i] for i in range(n)])
            batched = fuse([range(s, min(s + B, n)) for s in range(0, n, B)])
            print(f"{n} training slices, 1 thread: one at a time {alone:.1f} s, "
                  f"batches of {B} {batched:.1f} s")


if __name__ == "__main__":
    main()
