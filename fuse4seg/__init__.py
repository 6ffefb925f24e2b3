"""fuse4seg: image fusion for multi-modal medical segmentation via bi-level optimisation.

The reference implementation of Guo et al., *Fuse4Seg* (the paper's §3), with a tutorial book.
The package owns the logic; the chapters in ``book/`` import it.
"""

__version__ = "0.1.0"
