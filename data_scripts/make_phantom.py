"""Write the built-in MNI152 phantom dataset (same as ``fuse4seg data phantom``).

Usage: ``python data_scripts/make_phantom.py --out _data/phantom --cases 8 --seed 0``.
A thin wrapper around :func:`fuse4seg.data.phantom.write_phantom_dataset`; see chapter 1.
"""

from __future__ import annotations

import argparse
import sys

from fuse4seg.cli.data import phantom_arguments, phantom_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=phantom_main.__doc__)
    phantom_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return phantom_main(args)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"make_phantom: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
