"""``fuse4seg train`` under ``torchrun``, recording what each rank saw and ended with
(``test_ddp``): run as ``python -m torch.distributed.run ... tests/ddp_ranks.py OUT ARGS``.

Each rank writes ``OUT/rank<R>.pt``: the warm-up batches it trained on (their dataset
indices) and its leader's and follower's parameters before and after training. Without the
gradients' all-reduce the ranks' parameters part ways after their first step on different
batches; with it they stay equal.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from fuse4seg.cli import main
from fuse4seg.train import trainer as trainer_module

out, argv = Path(sys.argv[1]), sys.argv[2:]
seen: list[list[int]] = []
single, fit = trainer_module.SliceBatches.single, trainer_module.Trainer.fit


def recording_single(self, stage, epoch, step):
    batch = single(self, stage, epoch, step)
    if stage == "warmup":
        seen.append(list(batch["index"]))
    return batch


def params(trainer) -> dict[str, torch.Tensor]:
    nets = {"leader": trainer.engine.leader_module, "follower": trainer.engine.follower_module}
    return {f"{name}.{key}": value.detach().cpu().clone()
            for name, net in nets.items() for key, value in net.state_dict().items()}


def recording_fit(self, *args, **kwargs):
    before = params(self)
    result = fit(self, *args, **kwargs)
    torch.save({"warmup_batches": seen, "before": before, "params": params(self)},
               out / f"rank{os.environ['RANK']}.pt")
    return result


trainer_module.SliceBatches.single = recording_single
trainer_module.Trainer.fit = recording_fit
sys.exit(main(argv))
