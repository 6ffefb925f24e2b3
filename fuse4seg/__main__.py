"""``python -m fuse4seg`` is the ``fuse4seg`` command (also what ``torchrun -m`` starts)."""

import sys

from fuse4seg.cli import main

if __name__ == "__main__":
    sys.exit(main())
