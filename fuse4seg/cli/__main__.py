"""``python -m fuse4seg.cli``: the ``fuse4seg`` command, as ``python -m fuse4seg``."""

import sys

from fuse4seg.cli import main

if __name__ == "__main__":
    sys.exit(main())
