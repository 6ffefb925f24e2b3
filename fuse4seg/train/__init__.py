"""Training: Algorithm 1, the baselines and ablations, fusion-only training, run folders.

=========================================  ==================================================
module                                     its one job
=========================================  ==================================================
:mod:`fuse4seg.train.methods`              every method and ablation as a ``MethodSpec``
:mod:`fuse4seg.train.bilevel`              Algorithm 1's steps (the ``Engine``)
:mod:`fuse4seg.train.engine`               optimiser step, cosine schedule, EMA, NaN guard
:mod:`fuse4seg.train.trainer`              the epoch loop, checkpoints, resume; ``train()``
:mod:`fuse4seg.train.validation`           validation and the glass-box snapshots
:mod:`fuse4seg.train.sampling`             warm-up batches, the patient-level D_tr / D_val
:mod:`fuse4seg.train.runs`                 run folders, code digests, metrics files
:mod:`fuse4seg.train.checkpoint`           atomic ``weights_only`` checkpoints, RNG states
:mod:`fuse4seg.train.distributed`          ranks and the process group under ``torchrun``
:mod:`fuse4seg.train.fusion_only`          the leader alone on image pairs (chapter 5)
=========================================  ==================================================

Names below are imported on first use, so ``import fuse4seg.train.methods`` needs no torch.
Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

import importlib

_LAZY = {
    "ABLATIONS": "fuse4seg.train.methods",
    "METHODS": "fuse4seg.train.methods",
    "NonFiniteLossError": "fuse4seg.train.engine",
    "Trainer": "fuse4seg.train.trainer",
    "TrainResult": "fuse4seg.train.trainer",
    "train": "fuse4seg.train.trainer",
    "read_metrics": "fuse4seg.train.runs",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fuse4seg.train' has no attribute {name!r}")
