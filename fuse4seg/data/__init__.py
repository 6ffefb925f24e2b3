"""The data layer: BraTS layouts and label schemes, the MNI152 phantom, the slice cache, pairs.

- :mod:`fuse4seg.data.labels`: canonical labels (0 bg, 1 NCR, 2 ED, 3 ET), schemes, regions.
- :mod:`fuse4seg.data.layouts`: find and read BraTS 2018-2021, 2023+, 2013/2015 and MSD cases.
- :mod:`fuse4seg.data.phantom`: the built-in synthetic dataset (default data of the book).
- :mod:`fuse4seg.data.slices`: the prepared slice cache and :class:`SliceDataset`.
- :mod:`fuse4seg.data.pairs`: Harvard and GFP-PC fusion pairs (PNG).

Explained in chapter 1 (``book/01_data.md``).
"""

from fuse4seg.data.layouts import (  # noqa: F401
    Case,
    DataError,
    check_dataset,
    find_cases,
    load_case,
    normalize_intensity,
)
