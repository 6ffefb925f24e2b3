"""What the verbs of :mod:`fuse4seg.cli` share: argument types, ``--set``, the config, and the
inputs an output is checked against."""

from __future__ import annotations

import argparse
from pathlib import Path

PROFILES = "smoke, default or paper"
PAIR_KINDS = ["CT-MRI", "PET-MRI", "SPECT-MRI", "GFP-PC"]


def _integer(text: str, least: int, rule: str) -> int:
    """``text`` as an integer >= ``least``; else an argparse error with ``rule`` and the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{rule}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count or a size), refused otherwise with its value."""
    return _integer(text, 1, "must be at least 1")


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer >= 0 (numpy's generators refuse negative seeds)."""
    return _integer(text, 0, "a seed must be >= 0")


def add_set(parser: argparse.ArgumentParser, example: str) -> None:
    """The repeatable ``--set NAME=VALUE`` override, with ``example`` in its help."""
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE",
        help=f"override a setting, e.g. --set {example} (repeatable)",
    )


def add_json(parser: argparse.ArgumentParser, what: str) -> None:
    """``--json [FILE]``: ``what`` as JSON, written to FILE (atomically) or, with no FILE,
    printed instead of the table; as ``--json FILE`` of ``evaluate`` and ``study``."""
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="FILE",
        help=f"{what} as JSON: written to FILE, or printed instead of the table without FILE",
    )


def write_json(value, target: str) -> None:
    """Print ``value`` as JSON (``target`` ``"-"``, a bare ``--json``) or write it to the file
    ``target`` atomically, and say so."""
    import json

    from fuse4seg.utils import atomic_write_json

    if target == "-":
        print(json.dumps(value, indent=2))
    else:
        atomic_write_json(Path(target), value)
        print(f"wrote {target}")


def config_of(profile: str, pairs: list[str]):
    """The profile's config with the ``--set`` overrides ``pairs`` applied (checked)."""
    from fuse4seg.config import get_config, parse_overrides

    return get_config(profile, parse_overrides(pairs))


def given(args: argparse.Namespace, *names: str) -> list[tuple[str, Path | None]]:
    """``(name, value)`` of the arguments ``names`` as the user wrote them (``"--data"`` reads
    ``args.data``, ``"--t1ce"`` ``args.t1ce``, a positional ``"RUN"`` ``args.run``): the
    ``inputs`` and ``runs`` of :func:`fuse4seg.utils.check_output_file`. Naming an argument
    once, for both its label and its value, keeps an error's flag and the path it checked
    together.

    Raises:
        AttributeError: a name that is not one of the verb's arguments (a programming error).
    """
    return [(name, getattr(args, name.lstrip("-").replace("-", "_").lower())) for name in names]
