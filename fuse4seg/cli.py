"""The ``fuse4seg`` command line.

Each verb lives in the module that owns its logic, as a pair of functions
``<name>_arguments(parser)`` and ``<name>_main(args) -> int``; this file only wires them up, so
``fuse4seg <verb> --help`` always matches the code that runs. Expected failures (bad input,
missing files, invalid settings) print one ``fuse4seg: error: ...`` line naming the file or
parameter and exit with status 2; nothing is left half-written (outputs go through
``fuse4seg.utils.atomic_write_*``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb path -> "module:prefix" (the module defines prefix_arguments and prefix_main)
COMMANDS: dict[tuple[str, ...], str] = {
    ("data", "phantom"): "fuse4seg.data.phantom:phantom",
    ("data", "check"): "fuse4seg.data.layouts:check",
    ("data", "prepare"): "fuse4seg.data.slices:prepare",
    ("train",): "fuse4seg.train.cli:train",
    ("evaluate",): "fuse4seg.train.cli:evaluate",
    ("predict",): "fuse4seg.train.cli:predict",
    ("metrics",): "fuse4seg.metrics.fusion_cli:metrics",
    ("fusion", "train"): "fuse4seg.train.fusion_only:fusion_train",
    ("fusion", "evaluate"): "fuse4seg.train.fusion_only:fusion_evaluate",
}

GROUP_HELP = {
    "data": "find, check, prepare BraTS data; make the built-in phantom",
    "fusion": "fusion-only training and evaluation on image pairs (Harvard, GFP-PC)",
}


def _resolve(target: str):
    module_name, prefix = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, f"{prefix}_arguments"), getattr(module, f"{prefix}_main")


def build_parser() -> argparse.ArgumentParser:
    from fuse4seg import __version__

    parser = argparse.ArgumentParser(
        prog="fuse4seg",
        description="Fuse4Seg: image fusion for multi-modal medical segmentation "
        "via bi-level optimisation.",
    )
    parser.add_argument("--version", action="version", version=f"fuse4seg {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, target in COMMANDS.items():
        add_arguments, run = _resolve(target)
        doc = (run.__doc__ or "").strip().splitlines()
        help_text = doc[0] if doc else None
        if len(path) == 1:
            sub = top.add_parser(path[0], help=help_text, description=run.__doc__)
        else:
            if path[0] not in groups:
                group = top.add_parser(path[0], help=GROUP_HELP.get(path[0]))
                groups[path[0]] = group.add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True
                )
            sub = groups[path[0]].add_parser(path[1], help=help_text, description=run.__doc__)
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        add_arguments(sub)
        sub.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("fuse4seg: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        message = str(exc) if not isinstance(exc, KeyError) else str(exc.args[0])
        print(f"fuse4seg: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
