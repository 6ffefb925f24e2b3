"""Training and inference: Algorithm 1, the baselines and ablations, run folders, checkpoints.

- :mod:`fuse4seg.train.bilevel`: :func:`train` and the :class:`Trainer` (Algorithm 1).
- :mod:`fuse4seg.train.baselines`: the methods (``fuse4seg``, ``disjoint_ae``, ``average``,
  ``max``, ``direct2ch``, ``monai_unet``) and Table 3's ablations.
- :mod:`fuse4seg.train.sampling`: warm-up batches and the patient-level D_tr / D_val split.
- :mod:`fuse4seg.train.checkpoint`: atomic, ``weights_only`` checkpoints, RNG states, the EMA.
- :mod:`fuse4seg.train.runs`: run folders and the data they were trained on.
- :mod:`fuse4seg.train.inference`: ``predict`` and ``evaluate``.
- :mod:`fuse4seg.train.cli`: the ``train``, ``evaluate`` and ``predict`` verbs.

Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

from fuse4seg.train.baselines import ABLATIONS, METHODS  # noqa: F401
from fuse4seg.train.bilevel import NonFiniteLossError, Trainer, TrainResult, train  # noqa: F401
from fuse4seg.train.inference import evaluate_run, load_bundle, predict_files  # noqa: F401
from fuse4seg.train.runs import read_metrics  # noqa: F401
