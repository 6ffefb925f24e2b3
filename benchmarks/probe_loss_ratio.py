"""Why does the follower's training loss jump at the stage change? (issue 10, part 1)

    python benchmarks/probe_loss_ratio.py RUN_DIR [RUN_DIR ...] [--steps 8] [--threads N]

Each RUN_DIR is a finished ``fuse4seg`` run folder with ``checkpoints/warmup.pt`` (the state at
the end of the warm-up, which the trainer saves; ``benchmarks/learning_curves.py --workdir``
keeps its runs). From that one state, with no update, the follower's loss L_lower (the training
loss, Eq. 2) is measured over the first rollout epoch's ``--steps`` outer steps on three kinds
of batch:

- ``warm``: the warm-up's batch of B slices, drawn for that epoch and step as the warm-up draws
  them, on x_avg (what the warm-up's logged loss measures);
- ``D_tr x_avg``: the rollout's D_tr of that step (B/2 slices from half the patients), still on
  x_avg;
- ``D_tr x_f``: the same D_tr on x_f of the leader at the end of the warm-up (what the first
  rollout update sees).

So ``D_tr x_avg / warm`` is the part of the jump due to the batch (its size and its patients:
the soft Dice of a smaller batch meets more absent classes), and ``D_tr x_f / D_tr x_avg`` the
part due to the change of input. The logged ratio L_lower(first rollout epoch) / L_lower(last
warm-up epoch) is printed beside them; it also contains the K updates of the first epoch.
Per run and pooled (mean over runs). Not a timing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch


def measure(run_dir: Path, steps: int) -> dict[str, float]:
    from fuse4seg.config import load_config
    from fuse4seg.train.checkpoint import load_checkpoint
    from fuse4seg.train.runs import read_metrics, read_run_json
    from fuse4seg.train.trainer import Trainer

    info = read_run_json(run_dir)
    config = load_config(run_dir / "config.yaml")
    state = run_dir / "checkpoints" / "warmup.pt"
    if not state.is_file():
        raise SystemExit(f"{run_dir}: no checkpoints/warmup.pt (trained before the trainer "
                         "saved the warm-up's end, or not a warm-up + rollout method)")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, info["method"], info["cache"], Path(tmp) / "run",
                          progress=False, device="cpu")
        trainer.load_state(load_checkpoint(state, map_location="cpu"))
    eng, epoch = trainer.engine, trainer.warmup_end + 1
    net = eng.follower.net
    net.eval()
    sums = {"warm": [], "D_tr x_avg": [], "D_tr x_f": []}
    with torch.no_grad():
        for step in range(min(steps, trainer.steps_per_epoch)):
            warm = trainer.batches.single("warmup", epoch, step)
            x = eng.prior(warm["x1"], warm["x2"], "warmup", ema=False)
            sums["warm"].append(float(eng.lower_loss(net(x), warm["seg"])))
            tr, _ = trainer.batches.split(epoch, step, False)
            x = eng.prior(tr["x1"], tr["x2"], "warmup", ema=False)
            sums["D_tr x_avg"].append(float(eng.lower_loss(net(x), tr["seg"])))
            x = eng.prior(tr["x1"], tr["x2"], "rollout", ema=False)
            sums["D_tr x_f"].append(float(eng.lower_loss(net(x), tr["seg"])))
    rows = {r["epoch"]: r for r in read_metrics(run_dir)}
    logged = rows[epoch]["L_lower"] / rows[epoch - 1]["L_lower"]
    out = {k: float(np.mean(v)) for k, v in sums.items()}
    out["logged ratio"] = logged
    out["seed"] = config.train.seed
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    print("| run | seed | L warm | L D_tr x_avg | L D_tr x_f | D_tr x_avg / warm | "
          "D_tr x_f / D_tr x_avg | D_tr x_f / warm | logged ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        r = measure(run, args.steps)
        results.append(r)
        print(f"| `{run.name}` | {r['seed']} | {r['warm']:.3f} | {r['D_tr x_avg']:.3f} | "
              f"{r['D_tr x_f']:.3f} | {r['D_tr x_avg'] / r['warm']:.2f} | "
              f"{r['D_tr x_f'] / r['D_tr x_avg']:.2f} | {r['D_tr x_f'] / r['warm']:.2f} | "
              f"{r['logged ratio']:.2f} |", flush=True)
    if len(results) > 1:
        m = {k: float(np.mean([r[k] for r in results])) for k in results[0] if k != "seed"}
        print(f"| mean of {len(results)} | | {m['warm']:.3f} | {m['D_tr x_avg']:.3f} | "
              f"{m['D_tr x_f']:.3f} | {m['D_tr x_avg'] / m['warm']:.2f} | "
              f"{m['D_tr x_f'] / m['D_tr x_avg']:.2f} | {m['D_tr x_f'] / m['warm']:.2f} | "
              f"{m['logged ratio']:.2f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
